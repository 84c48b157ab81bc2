"""Realistic misuse of a run folder (issue 32): two processes on one folder, an edited config.json or a changed
data file under --resume, --overwrite of the folder a run reads, a full disk in a checkpoint or a log, Ctrl-C while
the libraries load, empty paths, and sft_go.py's messages and reference cache. Each case ends in one line without a
traceback and leaves the last good checkpoint whole."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
import guards
import runs
import sft_go
import tasks
import uft
from conftest import uft_flags

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(call, capsys, status=2) -> str:
    """Run a script's main (argparse's usage errors raise SystemExit); the status and the last stderr line."""
    try:
        code = call()
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == status, err[-2000:]
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def stopped(tiny_dir, tmp_path_factory):
    """A run on data files given by relative paths, stopped by Ctrl-C in step 3 (checkpoint at step 2 of 4)."""
    root = tmp_path_factory.mktemp("stopped")
    rows = tasks.generate_countdown(40, seed=9, min_nums=3, max_nums=3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        m.setenv("UFT_CRASH_AT", "step:3")
        m.setenv("UFT_CRASH_WITH", "SIGINT")
        argv = uft_flags(tiny_dir, "run", "--data", "train.jsonl", "--test_data", "test.jsonl")
        assert uft.main(argv) == 130
    return root


def copy_of(stopped: Path, dest: Path) -> Path:
    """A copy of the stopped run with its data files, at the same relative places."""
    shutil.copytree(stopped, dest)
    run = dest / "run"
    config = json.loads((run / "config.json").read_text())     # the copy's absolute data paths: the copy's
    for flag in ("data", "test_data"):
        config[flag] = config[flag].replace(str(stopped), str(dest))
    config["data_files"] = {flag: {p.replace(str(stopped), str(dest)): h for p, h in files.items()}
                            for flag, files in config.get("data_files", {}).items()}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    if (run / "checkpoint" / guards.RECORD).exists():
        record = json.loads((run / "checkpoint" / guards.RECORD).read_text())
        record["config"].update({k: config[k] for k in ("data", "test_data", "data_files")})
        (run / "checkpoint" / guards.RECORD).write_text(json.dumps(record))
    return run


# --- 1. one owner per run folder ------------------------------------------------------------------------------

def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that owns `folder` (as a training run does) until it is killed."""
    code = f"import guards, time; guards.own_folder({str(folder)!r}); print('ready', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    return holder


def test_a_run_folder_has_one_owner_and_kill_9_frees_it(tiny_dir, stopped, tmp_path, capsys):
    run = copy_of(stopped, tmp_path / "copy")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for folder in (run, fresh):
        holder = hold_lock(folder)
        try:
            if folder == run:                  # --resume of a run that is still training
                line = refused(lambda: uft.main(["--resume", str(run)]), capsys)
                assert f"--resume {run}: in use by another process (pid {holder.pid})" in line
            else:                              # a second run started into the folder of a running one
                line = refused(lambda: uft.main(uft_flags(tiny_dir, fresh)), capsys)
                assert f"--output_dir {fresh}: in use by another process (pid {holder.pid})" in line
                line = refused(lambda: sft_go.main(["--output_dir", str(fresh), "--model", str(tiny_dir)]), capsys)
                assert "in use by another process" in line
                assert sorted(p.name for p in fresh.iterdir()) == [guards.LOCK_FILE]     # nothing written
        finally:
            holder.send_signal(signal.SIGKILL)                                          # kill -9
            holder.wait()
    assert uft.main(["--resume", str(run)]) == 0            # the kernel dropped the dead owner's lock
    assert [m["step"] for m in common.read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert uft.main(uft_flags(tiny_dir, fresh, "--T", "1", "--T_hint", "1")) == 0


def test_default_run_folders_started_in_the_same_second_differ(monkeypatch):
    code = "import guards; print(guards.default_output_dir('uft'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    names = [p.communicate()[0].strip() for p in procs]
    assert names[0] != names[1]
    assert uft.parse_args([]).output_dir.endswith(f"-{os.getpid()}")          # the scripts use it
    assert sft_go.parse_args([]).output_dir.endswith(f"-{os.getpid()}")


# --- 2. --resume runs the run that was started, or refuses -----------------------------------------------------

EDITS = {   # config.json edit -> what the refusal names
    "learning_rate": (0.5, "'learning_rate' 0.5 (trained with 0.001)"),
    "algo": ("sft", "'algo' \"sft\" (trained with \"uft\")"),
    "T": ("4", "'T' is \"4\", but --T takes an integer"),
    "num_train": (None, "'num_train' is null, but --num_train needs a value"),
    "lr_scheduler": ("warm", "'lr_scheduler' is \"warm\", not one of constant, cosine"),
    "bf16": (1, "'bf16' is 1, but --bf16 takes true or false"),
    "lerning_rate": (0.1, "'lerning_rate' is not a flag of uft.py"),
}


@pytest.mark.parametrize("key", EDITS)
def test_resume_refuses_an_edited_config(stopped, tmp_path, capsys, key):
    run = copy_of(stopped, tmp_path / "copy")
    value, named = EDITS[key]
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, key: value}))
    line = refused(lambda: uft.main(["--resume", str(run)]), capsys)
    assert f"{run / 'config.json'}: " in line and named in line


def test_resume_reads_the_data_it_trained_on_from_any_folder(stopped, tmp_path, monkeypatch, capsys):
    run = copy_of(stopped, tmp_path / "copy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = tasks.generate_countdown(30, seed=1, min_nums=3, max_nums=3)
    (elsewhere / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))   # same name, other rows
    monkeypatch.chdir(elsewhere)
    assert uft.main(["--resume", str(run)]) == 0
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    trained = json.loads((run / "checkpoint" / guards.RECORD).read_text())["config"]
    assert config["data"] == str(tmp_path / "copy" / "train.jsonl")                    # absolute: the run's file
    assert guards.edited_keys(config, trained, {}) == []                               # config.json: what ran


@pytest.mark.parametrize("change", ["rows replaced", "test file shrank", "file gone"])
def test_resume_refuses_a_changed_data_file(stopped, tmp_path, capsys, change):
    run = copy_of(stopped, tmp_path / "copy")
    train, test = tmp_path / "copy" / "train.jsonl", tmp_path / "copy" / "test.jsonl"
    if change == "rows replaced":
        train.write_text(train.read_text().replace('"target": ', '"target": 1', 1))
    elif change == "test file shrank":
        test.write_text("".join(test.read_text().splitlines(keepends=True)[:3]))
    else:
        train.unlink()
    line = refused(lambda: uft.main(["--resume", str(run)]), capsys)
    flag, path = ("--test_data", test) if change == "test file shrank" else ("--data", train)
    assert line.startswith(f"uft.py: error: {flag} {path}: ")
    assert ("no longer there" if change == "file gone" else "changed since the run started") in line


# --- 4. nothing destroys what the run needs --------------------------------------------------------------------

def test_overwrite_never_deletes_the_checkpoint_that_eval_only_reads(stopped, tmp_path, capsys):
    run = copy_of(stopped, tmp_path / "copy")
    argv = ["--eval_only", "--model", str(run), "--output_dir", str(run), "--overwrite", "--device", "cpu"]
    line = refused(lambda: uft.main(argv), capsys)
    assert f"--overwrite would delete {run / 'checkpoint'}, which --model {run} reads" in line
    assert (run / "checkpoint" / "trainer_state.pt").exists() and (run / "metrics.jsonl").exists()


def test_a_full_disk_while_safetensors_writes_a_checkpoint_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """safetensors reports ENOSPC as its own exception (not an OSError): the step-4 checkpoint hits it."""
    import transformers.modeling_utils as modeling
    from safetensors import SafetensorError
    real, calls = modeling.safe_save_file, []

    def filling_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\0" * 100)                             # part of it, then no space
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(modeling, "safe_save_file", filling_disk)
    out = tmp_path / "run"
    line = refused(lambda: uft.main(uft_flags(tiny_dir, out)), capsys, status=1)
    assert line.startswith(f"error: No space left on device: {out / 'checkpoint'}; the last checkpoint is ")
    assert "(step 2)" in line
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint"]   # no half copy
    assert common.load_state(out / "checkpoint" / "trainer_state.pt")["step"] == 2
    monkeypatch.setattr(modeling, "safe_save_file", real)
    assert uft.main(["--resume", str(out)]) == 0


def test_a_full_disk_while_a_log_line_is_written_is_one_line_and_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    real = runs.append_jsonl

    def filling_disk(path, record):
        if Path(path).name == "metrics.jsonl" and record.get("step") == 3:
            with open(path, "a") as f:
                f.write(json.dumps(record)[:20])                                 # a torn line, then no space
            raise OSError(28, os.strerror(28), str(path))
        real(path, record)
    monkeypatch.setattr(runs, "append_jsonl", filling_disk)
    out = tmp_path / "run"
    line = refused(lambda: uft.main(uft_flags(tiny_dir, out)), capsys, status=1)
    assert line.startswith("error: No space left on device: ") and "(step 2)" in line
    monkeypatch.setattr(runs, "append_jsonl", real)
    assert uft.main(["--resume", str(out)]) == 0
    assert [m["step"] for m in common.read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def wait_for_torch_to_load(proc: subprocess.Popen) -> None:
    """Until the process maps torch's libraries: it is past the interpreter's own start, inside `import torch`."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 60
    while "libtorch" not in maps.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
@pytest.mark.parametrize("script, delay", [("uft.py", 0.0), ("uft.py", 1.0), ("sft_go.py", 0.0)])
def test_ctrl_c_while_the_libraries_load_exits_130_without_a_traceback(tmp_path, script, delay):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, script, "--output_dir", str(tmp_path / "run")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_torch_to_load(proc)           # (a Ctrl-C before Python runs the script's first line is Python's)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped by SIGINT")


# --- 5. empty paths, sft_go.py's own flags, its reference cache --------------------------------------------------

@pytest.mark.parametrize("script", [uft, sft_go])
@pytest.mark.parametrize("argv, env, named", [
    (["--output_dir", ""], {}, "--output_dir '': empty"),
    (["--data", " "], {}, "--data ' ': empty"),
    (["--model", ""], {}, "--model '': empty"),
    ([], {"UFT_CACHE": ""}, "UFT_CACHE is set but empty"),
])
def test_empty_paths_are_refused(script, argv, env, named, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        script.parse_args(argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err


def flags_named(text: str) -> set[str]:
    import re
    return set(re.findall(r"(--[a-z_]+)", text))


def test_sft_go_messages_name_only_its_own_flags(tiny_dir, tmp_path, monkeypatch, capsys):
    own = {s for a in sft_go.build_parser()._actions for s in a.option_strings}
    out = tmp_path / "used"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    line = refused(lambda: sft_go.main(["--output_dir", str(out), "--model", str(tiny_dir), "--num_train", "8",
                                        "--num_test", "4"]), capsys)
    assert "already holds a run" in line and flags_named(line) <= own, line
    assert flags_named(sft_go.where_to_restart(sft_go.parse_args(["--output_dir", str(out)]))) <= own


def reference_key(tokenizer, argv, rows=None):
    args = sft_go.parse_args(["--num_train", "16", "--num_test", "4", *argv])
    train = rows if rows is not None else sft_go.load_rows(args)[0]
    enc = sft_go.encode_rows(tokenizer, train, args.max_prompt_length, args.max_response_length, offsets=False)
    return sft_go.reference_folder(args, "some/model", enc)


def test_sft_go_reference_cache_key_follows_the_training_data(tokenizer, tmp_path):
    small = reference_key(tokenizer, ["--data", "kk", "--min_people", "2", "--max_people", "3"])
    assert small == reference_key(tokenizer, ["--data", "kk", "--min_people", "2", "--max_people", "3"])
    assert small != reference_key(tokenizer, ["--data", "kk", "--min_people", "6", "--max_people", "8"])
    rows = [{"prompt": f"{a} + {a} =", "response": f" {a + a}"} for a in range(20)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = reference_key(tokenizer, ["--data", str(data)], tasks.load_sft_rows(str(data))[4:])
    data.write_text("".join(json.dumps({**r, "response": r["response"] + " ok"}) + "\n" for r in rows))
    assert before != reference_key(tokenizer, ["--data", str(data)], tasks.load_sft_rows(str(data))[4:])
    assert before != reference_key(tokenizer, ["--data", str(data), "--micro_batch_size", "8"],
                                   tasks.load_sft_rows(str(data))[4:])


def test_a_run_records_the_weights_it_started_from(tiny_dir, tmp_path):
    import models
    import uft
    from conftest import uft_flags
    out = tmp_path / "run"
    assert uft.main(uft_flags(tiny_dir, out)) == 0
    base = json.loads((out / "base.json").read_text())
    model = uft.load_model(str(tiny_dir), device="cpu")[0]
    assert base["model"] == str(tiny_dir) and base["weights_sha256"] == models.weights_digest(model)
    trained = uft.load_model(str(out / "checkpoint"), device="cpu")[0]
    assert models.weights_digest(trained) != base["weights_sha256"]


def test_a_built_in_base_is_recorded_with_its_recipe_and_thread_count(tiny_dir, tmp_path):
    import argparse
    import models
    import uft
    recipe = models.BASE_RECIPES["builtin"]
    folder = tmp_path / f"{recipe['name']}-v{recipe['version']}" / "base"
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text(json.dumps({**recipe, "built_with_threads": 2}))
    model = uft.load_model(str(tiny_dir), device="cpu")[0]
    args = argparse.Namespace(model="builtin", gguf_file=None)
    record = models.base_record(args, model, cache_dir=tmp_path)
    assert record["recipe"]["built_with_threads"] == 2 and record["recipe"]["steps"] == recipe["steps"]
    (folder / "recipe.json").write_text(json.dumps(recipe))                 # built before the count was kept
    assert models.base_record(args, model, cache_dir=tmp_path)["recipe"]["built_with_threads"] is None
