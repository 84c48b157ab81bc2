"""The SFT-GO grids of experiments/reproduce.py: validation comparisons, per-group loss tables, and the link
between the committed validation runs, the retest grids and sft_go.py's defaults."""
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import reproduce  # noqa: E402

import sft_go  # noqa: E402


def test_validation_comparisons_use_the_validation_rewards_and_give_each_seed_its_change():
    base = [{"test_rewards": [[1.0, 1.0]], "val_rewards": [[0.0, 0.0, 1.0]]},
            {"test_rewards": [[1.0]], "val_rewards": [[1.0, 0.1]]}]
    ours = [{"test_rewards": [[0.0, 0.0]], "val_rewards": [[1.0, 0.0, 1.0]]},
            {"test_rewards": [[0.0]], "val_rewards": [[1.0, 1.0]]}]
    c = reproduce.pooled_comparison(base, ours, "val")
    assert (c["n"], c["wins"], c["losses"]) == (5, 2, 0)
    assert c["per_seed"] == pytest.approx([1 / 3, 1 / 2])
    assert reproduce.pooled_comparison(base, ours)["per_seed"] == [-1.0, -1.0]     # held-out: all lost
    row = reproduce.comparison_table({"ce": base, "go": ours}, [("go", "ce")], "val")[-1]
    assert row.startswith("| go − ce | 5 | +0.400") and row.endswith("| +0.333, +0.500 |")


def test_group_loss_table_averages_training_losses_between_evaluations():
    def run(shift):
        metrics = [{"step": 0, "eval_loss_important": 1.0 + shift, "eval_loss_unimportant": 0.5, "eval_ce": 0.7}]
        metrics += [{"step": t, "loss_important": float(t) + shift, "loss_unimportant": 0.1 * t}
                    for t in (1, 2, 3, 4)]
        metrics[-1].update(eval_loss_important=0.8 + shift, eval_loss_unimportant=0.6, eval_ce=0.65)
        evals = [m for m in metrics if "eval_ce" in m]
        return {"metrics": metrics, "evals": evals}
    lines = reproduce.go_group_losses({"go": [run(0.0), run(0.2), None]})
    assert lines[2].startswith("| go | 0 | 1.100 ± 0.141 | 0.500 ± 0.000 | 0.700 ± 0.000 | – | – |")
    # steps 1-4: mean of 1..4 = 2.5 (+ 0.2 for the second seed); unimportant 0.25 for both
    mean_important = statistics.mean([2.5, 2.7])
    assert lines[3].startswith(f"| go | 4 | 0.900 ± 0.141 | 0.600 ± 0.000 | 0.650 ± 0.000 | "
                               f"{mean_important:.3f} ± 0.141 | 0.250 ± 0.000 |")


def test_the_retest_grids_use_the_chosen_setting_and_sft_go_defaults_to_it():
    args = sft_go.parse_args([])
    chosen = dict(zip(reproduce.GO_CHOSEN[::2], reproduce.GO_CHOSEN[1::2]))
    assert (args.grouping, str(args.lam), str(args.eta)) == (chosen["--grouping"], chosen["--lam"], chosen["--eta"])
    assert args.losses == ["ce", "go"]
    confirm = reproduce.GRIDS["go-confirm"]
    assert confirm["cells"]["go"] == ["--loss", "go", *reproduce.GO_CHOSEN]
    assert args.T == int(confirm["flags"][confirm["flags"].index("--T") + 1])      # the default is a cell
    for grid in ("go-kk", "smollm-go-chat"):
        assert " ".join(reproduce.GO_CHOSEN[2:]) in " ".join(reproduce.GRIDS[grid]["flags"])


def test_the_retest_seeds_hold_problems_no_countdown_sft_go_grid_has_scored():
    """A countdown seed fixes the held-out (and validation) problems, so fresh seeds mean fresh problems."""
    used = set()
    for name, g in reproduce.GRIDS.items():
        if name != "go-confirm" and g.get("script") == "sft_go.py" and "--data" not in g["flags"]:
            used |= {int(p.name[4:]) for p in (reproduce.RUNS / name).glob("*/seed*")}
    assert used and not used & set(reproduce.GRIDS["go-confirm"]["seeds"])


def test_the_chosen_setting_is_the_best_validation_cell_of_the_committed_runs():
    runs = reproduce.load_grid("go-select", reproduce.GRIDS["go-select"]["seeds"])
    if not all(r for seeds in runs.values() for r in seeds):
        pytest.skip("go-select has unfinished runs")
    # validation accuracy pooled over seeds; a tie goes to the lower validation CE (mean over seeds)
    rank = {cell: (statistics.mean(x == 1.0 for r in seeds for x in r["val_rewards"][-1]),
                   -statistics.mean(r["evals"][-1]["val_ce"] for r in seeds))
            for cell, seeds in runs.items() if cell != "ce"}
    best = max(rank, key=rank.get)
    assert reproduce.GRIDS["go-select"]["cells"][best] == ["--loss", "go", *reproduce.GO_CHOSEN]


@pytest.mark.parametrize("grid", [g for g, spec in reproduce.GRIDS.items()
                                  if spec.get("script") == "sft_go.py" and not g.startswith("quick")])
def test_each_grid_still_makes_its_committed_runs(grid):
    """A default may change (lambda 0.9 -> 0.3): the grid's command must still give each committed run's settings."""
    import json
    folders = sorted((reproduce.RUNS / grid).glob("*/seed*/config.json"))
    if not folders:
        pytest.skip(f"{grid}: no committed runs")
    for path in folders:
        cell, seed = path.parent.parent.name, int(path.parent.name[4:])
        args = vars(sft_go.parse_args(reproduce.run_command(grid, cell, seed, [])[0][2:]))
        config = json.loads(path.read_text())
        keys = ("loss", "grouping", "lam", "eta", "T", "batch_size", "learning_rate", "num_test", "data", "seed")
        assert {k: args[k] for k in keys} == {k: config[k] for k in keys}, path
