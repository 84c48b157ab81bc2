"""The experiments runner end to end on its tiny grid: runs, skips finished runs, writes a report and a plot."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import reproduce  # noqa: E402


def test_quick_grid_runs_resumes_and_reports(tmp_path, capsys):
    assert reproduce.main(["quick", "--out", str(tmp_path), "--jobs", "2"]) == 0
    runs = sorted((tmp_path / "runs" / "quick").glob("*/seed*/done.json"))
    assert len(runs) == 4                                    # 2 cells x 2 seeds
    done = json.loads(runs[0].read_text())
    assert done["threads_per_process"] == 1 and done["torch"] and "uft.py" in done["command"]
    assert not list((tmp_path / "runs" / "quick").glob("*/seed*/checkpoint"))   # only the metrics are kept
    report = (tmp_path / "results" / "quick.md").read_text()
    assert "Runs finished: 4 of 4" in report and "| uft − rft |" in report and "Machine:" in report
    assert (tmp_path / "results" / "quick.png").stat().st_size > 1000
    capsys.readouterr()
    assert reproduce.main(["quick", "--out", str(tmp_path), "--jobs", "2"]) == 0   # a second sweep skips them
    assert capsys.readouterr().out.count("skip ") == 4


def test_sft_go_grid_runs_and_reports(tmp_path):
    assert reproduce.main(["quick-go", "--out", str(tmp_path), "--jobs", "2"]) == 0
    done = sorted((tmp_path / "runs" / "quick-go").glob("*/seed*/done.json"))
    assert len(done) == 4 and "sft_go.py" in json.loads(done[0].read_text())["command"]
    report = (tmp_path / "results" / "quick-go.md").read_text()
    assert "| L_important |" in report and "| go-tfidf − ce |" in report and "Runs finished: 4 of 4" in report
    run = reproduce.load_run(done[0].parent)
    assert run["test_rewards"] and len(run["test_rewards"][-1]) == 4     # per-problem rewards, 4 problems


def test_pooled_comparison_pairs_seed_by_seed():
    base = [{"test_rewards": [[1.0, 0.0, 0.1]]}, {"test_rewards": [[0.0, 0.0]]}]
    ours = [{"test_rewards": [[1.0, 1.0, 1.0]]}, {"test_rewards": [[1.0, 0.1]]}]
    c = reproduce.pooled_comparison(base, ours)
    assert (c["n"], c["wins"], c["losses"]) == (5, 3, 0) and abs(c["gain"] - 0.6) < 1e-9


def test_format_table_shows_base_and_final_and_averages_rl_steps_only():
    def run(final_format, rewards):
        rl = [{"phase": "rl", "reward_mean": r, "train_format_rate": r, "formatted_groups": 1.0,
               "solved_groups": 0.0, "step_seconds": 10.0} for r in rewards]
        evals = [{"eval_accuracy": 0.0, "eval_format_rate": 0.0},
                 {"eval_accuracy": 0.25, "eval_format_rate": final_format}]
        return {"metrics": [{"phase": "sft", "step_seconds": 30.0}] + rl, "evals": evals}
    lines = reproduce.format_table({"uft": [run(0.5, [0.2, 0.4]), run(0.7, [0.4, 0.6])], "rft": [None]})
    assert len(lines) == 3                                   # header, rule, one finished cell
    row = lines[2].split(" | ")
    assert row[0] == "| uft" and row[1] == "2"
    assert row[2] == "0.000 ± 0.000 → **0.250 ± 0.000**"
    assert row[3] == "0.000 ± 0.000 → **0.600 ± 0.141**"
    assert row[4] == "0.40 ± 0.14"                          # per-seed means over RL steps 0.3 and 0.5
    assert row[-1] == "10 |"                                # the median over every step, the SFT one too
