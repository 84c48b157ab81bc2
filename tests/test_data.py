"""Data read through `datasets`: parquet, JSON, JSONL and CSV files, save_to_disk folders, Hub ids (offline:
one line), column mappings; malformed rows still named by file, row and field; a save_to_disk folder and a CSV
file train end to end; the released 8-source benchmark evaluates end to end, per source."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import common  # noqa: E402
import tasks  # noqa: E402
from conftest import uft_flags  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return tasks.generate_countdown(30, seed=11, min_nums=3, max_nums=3)


def as_csv(path, rows):
    """A CSV file as a user would write one: list and object cells as JSON text."""
    import pandas as pd
    cells = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]
    pd.DataFrame(cells).to_csv(path, index=False)
    return str(path)


def test_every_local_format_reads_the_same_rows(tmp_path, rows):
    import datasets
    import pandas as pd
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    as_csv(tmp_path / "rows.csv", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:20]),
                         test=datasets.Dataset.from_list(rows[20:])).save_to_disk(str(tmp_path / "splits"))
    for name in ("rows.parquet", "rows.json", "rows.jsonl", "rows.csv", "saved"):
        assert tasks.load_task_rows(str(tmp_path / name)) == rows, name
    assert tasks.load_task_rows(str(tmp_path / "splits")) == rows[:20]                  # split 'train'
    assert tasks.load_task_rows(str(tmp_path / "splits"), split="test") == rows[20:]
    with pytest.raises(ValueError, match=r"splits: .*no split 'validation'.*train, test"):
        tasks.load_task_rows(str(tmp_path / "splits"), split="validation")


def test_a_column_mapping_renames_a_datasets_fields(tmp_path, rows):
    renamed = [{"problem": r["question"], "hint": r["hint"], "solution": r["answer"], "numbers": r["nums"],
                "goal": r["target"]} for r in rows]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    columns = tasks.parse_columns("question=problem,answer=solution,nums=numbers,target=goal")
    assert tasks.load_task_rows(str(tmp_path / "other.jsonl"), columns=columns) == rows
    with pytest.raises(ValueError, match=r"other\.jsonl: no column 'numbrs'"):
        tasks.load_task_rows(str(tmp_path / "other.jsonl"), columns={"nums": "numbrs"})
    with pytest.raises(ValueError, match="ours=theirs"):
        tasks.parse_columns("nums")


@pytest.mark.parametrize("kind", ["parquet", "csv", "folder"])
def test_malformed_rows_are_named_by_file_row_and_field(tmp_path, rows, kind):
    import datasets
    import pandas as pd
    broken = [dict(r) for r in rows[:4]]
    broken[2]["target"] = 98.5
    path = {"parquet": tmp_path / "bad.parquet", "csv": tmp_path / "bad.csv", "folder": tmp_path / "bad"}[kind]
    if kind == "parquet":
        pd.DataFrame(broken).to_parquet(path)
    elif kind == "csv":
        as_csv(path, broken)
    else:
        datasets.Dataset.from_list(broken).save_to_disk(str(path))
    with pytest.raises(ValueError, match=rf"{path.name}: row 2 \(counting from 0\): field 'target' must be an "
                                         r"integer, got 98.5"):
        tasks.load_task_rows(str(path))


def test_csv_cells_that_are_not_lists_are_named(tmp_path, rows):
    path = tmp_path / "cells.csv"
    as_csv(path, [rows[0], {**rows[1], "nums": "44 19 35"}, rows[2]])      # not JSON text: not a list
    with pytest.raises(ValueError, match=r"row 1 .*'nums'"):
        tasks.load_task_rows(str(path))


def test_a_hub_id_offline_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^someone/no-such-dataset: could not load the Hub dataset "
                                         r"\(HF_HUB_OFFLINE=1") as err:
        tasks.load_task_rows("someone/no-such-dataset", split="test")
    assert "\n" not in str(err.value)


def test_what_is_not_data_is_refused_at_start(tmp_path):
    import uft
    assert tasks.data_location("openai/gsm8k") == "hub" and tasks.data_location(str(tmp_path)) == "folder"
    for value in ("nope", str(tmp_path / "missing.csv"), "a/b/c"):
        with pytest.raises(SystemExit):
            uft.parse_args(["--data", value, "--output_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit):
        uft.parse_args(["--data_columns", "nums", "--output_dir", str(tmp_path / "run")])


@pytest.mark.parametrize("kind", ["folder", "csv"])
def test_a_save_to_disk_folder_and_a_csv_file_train_end_to_end(tiny_dir, tmp_path, rows, kind):
    import datasets
    import uft
    data = tmp_path / "data"
    if kind == "folder":
        datasets.DatasetDict(train=datasets.Dataset.from_list(rows)).save_to_disk(str(data))
    else:
        data = as_csv(tmp_path / "data.csv", rows)
    out = tmp_path / "run"
    assert uft.main(uft_flags(tiny_dir, out, "--data", str(data), "--T", "2", "--T_hint", "1")) == 0
    metrics = common.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "eval_accuracy" in m] == [0, 2]


# --- the released 8-source benchmark ---------------------------------------------------------------------

SOURCES = {  # data_source -> (question text, target, a wrong answer), as the released benchmark names them
    "openai/gsm8k": ("Tom has 3 apples and buys 4. How many?", "7", "8"),
    "DigitalLearningGmbH/MATH-lighteval": ("What is 1/2 + 1/4?", "\\frac{3}{4}", "\\frac{1}{4}"),
    "olympiad_bench": ("Find x with 2x = 5.", "\\frac{5}{2}", "2"),
    "minerva": ("Give 10 to the 3.", "1000", "100"),
    "amc": ("What is 6 * 7?", "42", "41"),
    "aime": ("What is 100 + 11?", "111", "110"),
    "math500": ("Simplify \\sqrt{4}.", "2", "3"),
}


def benchmark_rows() -> list[dict]:
    """One or two rows per source, in the released benchmark's layout: reward_model.ground_truth.target a
    string for every source, and the countdown columns nums / target present on every row (a float column,
    NaN outside countdown)."""
    out = []
    for source, (question, target, _) in SOURCES.items():
        prompt = tasks.CONVERSATION + f"User: {question}\n" + tasks.ASSISTANT_START
        hint = [f"The answer is {target}."]
        out.append({"data_source": source, "question": prompt, "hint": hint,
                    "answer": hint[0] + " </think>\n<answer> " + target + " </answer>",
                    "nums": None, "target": float("nan"), "level": "Level 3",
                    "reward_model": {"ground_truth": {"target": target, "numbers": None}, "style": "rule"}})
    for r in tasks.generate_countdown(2, seed=4, heldout=True):
        out.append({**r, "data_source": "countdown", "target": float(r["target"]), "level": None,
                    "reward_model": {"ground_truth": {"target": str(r["target"]), "numbers": r["nums"]},
                                     "style": "rule"}})
    return out


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    import pandas as pd
    path = tmp_path_factory.mktemp("bench") / "benchmark.parquet"
    pd.DataFrame(benchmark_rows()).to_parquet(path)
    return path


def test_every_benchmark_row_is_scored_by_its_sources_rule(benchmark):
    loaded = tasks.load_task_rows(str(benchmark))
    assert [r.get("data_source") or "countdown" for r in loaded] == [r["data_source"] for r in benchmark_rows()]
    assert [type(r["target"]) for r in loaded if tasks.task_of(r) == "countdown"] == [int, int]  # 24.0 -> 24
    for row in loaded:
        source = row.get("data_source") or "countdown"
        right = row["question"] + row["answer"]
        assert tasks.reward(row, right) == 1.0, source
        assert tasks.reward(row, row["question"] + "no tag") == 0.0, source
        if source in SOURCES:
            wrong = row["question"] + "</think>\n<answer> " + SOURCES[source][2] + " </answer>"
            assert tasks.reward(row, wrong) == 0.1, source
    by_task = {r.get("data_source") or "countdown": tasks.task_of(r) for r in loaded}
    assert by_task == {"openai/gsm8k": "numeric", "amc": "numeric", "aime": "numeric", "countdown": "countdown",
                       "DigitalLearningGmbH/MATH-lighteval": "math", "olympiad_bench": "math", "minerva": "math",
                       "math500": "math"}


def test_eval_only_reports_each_source_of_the_benchmark(tiny_dir, benchmark, tmp_path, capsys):
    import uft
    out = tmp_path / "eval"
    flags = ["--model", str(tiny_dir), "--eval_only", "--test_data", str(benchmark), "--output_dir", str(out),
             "--device", "cpu", "--max_completion_length", "4", "--num_test", "100"]
    assert uft.main(flags) == 0
    printed = capsys.readouterr().out
    sources = [r["data_source"] for r in benchmark_rows()]
    for source in dict.fromkeys(sources):
        assert f"  {source}: accuracy " in printed, source
    assert "mean over sources: " in printed
    (metrics,) = common.read_jsonl(out / "metrics.jsonl")
    assert list(metrics["eval_accuracy_by_source"]) == list(dict.fromkeys(sources))
    assert metrics["eval_accuracy_source_mean"] == pytest.approx(
        sum(metrics["eval_accuracy_by_source"].values()) / 8)
    (per_row,) = common.read_jsonl(out / "eval_rewards.jsonl")
    assert per_row["sources"] == sources and len(per_row["rewards"]) == len(sources)
