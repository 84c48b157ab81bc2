"""What keeps a run folder safe from the ways people really use it, shared by uft.py and sft_go.py:

- one owner per run folder: the process that trains, resumes or evaluates into it holds an OS lock on
  `<folder>/.lock` (fcntl.flock: the kernel drops it when the process ends, even on kill -9); a second
  process is refused with one line; default folders carry the process id, so two runs started in the same
  second never share one;
- a resume that refuses what it cannot honour: a config.json whose values have the wrong type or an unknown
  value, one edited after the run started (each checkpoint keeps a copy of the config it was trained with,
  `checkpoint/run.json`), a data file that changed (config.json records each file's absolute path and
  sha256);
- --overwrite never deletes what the run reads (`--eval_only --model RUN --output_dir RUN --overwrite`);
- a full disk during a save is an OSError (ENOSPC) whatever library raised it, and the half-written copy
  is removed: the last good checkpoint stays whole;
- Ctrl-C while the libraries load (the first seconds) exits 130 without a traceback;
- empty strings are refused where a path or a name is expected (`--output_dir ''`, `UFT_CACHE=''`).

Nothing here is part of UFT or SFT-GO. Only the standard library at import time: uft.py imports this module
before torch, to catch Ctrl-C while torch loads. Every refusal is a `common.UserError` (one line, exit 2).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:       # Windows: no flock; a folder is then not locked
    fcntl = None


def user_error(message: str) -> Exception:
    from common import UserError      # common imports torch: not at this module's import time
    return UserError(message)


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C before the run starts
# ----------------------------------------------------------------------------------------------------------

def exit_quietly_on_ctrl_c() -> None:
    """Until `common.run_cli` installs its own handler, SIGINT ends the process at once with status 130 and
    one line (nothing is written before then). Called by the scripts as __main__ only, before torch loads:
    Python's default would print a KeyboardInterrupt traceback from inside an import."""
    def stop(signum, frame):
        os.write(2, b"stopped by SIGINT while starting: nothing was written\n")
        os._exit(128 + signum)
    signal.signal(signal.SIGINT, stop)


# ----------------------------------------------------------------------------------------------------------
# One owner per run folder
# ----------------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}     # resolved folder -> the open lock file (closing it releases the lock)


def own_folder(folder: Path, flag: str = "--output_dir") -> None:
    """Lock `folder` for this process (an exclusive, non-blocking flock on folder/.lock, which holds the
    owner's pid), or a UserError naming the process that holds it. The folder must exist."""
    key = str(Path(folder).resolve())
    if key in _HELD or fcntl is None:
        return
    fd = os.open(Path(key) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        other = ", or choose another --output_dir" if flag == "--output_dir" else ""
        raise user_error(f"{flag} {folder}: in use by another process (pid {owner}) that trains, resumes or "
                         f"evaluates into it; wait for it to end{other}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd


def release_folders() -> None:
    """Give up every folder this process locked (the kernel does the same when the process ends). The scripts'
    `main` does it when the run ends; a direct call of `uft.train` keeps its folder until then."""
    while _HELD:
        os.close(_HELD.popitem()[1])


@contextlib.contextmanager
def owned_folders():
    """The body may lock run folders (`own_folder`); all of them are released when it ends, however."""
    try:
        yield
    finally:
        release_folders()


def is_first_rank() -> bool:
    """Rank 0 of a torchrun job, or the only process (readable before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def default_output_dir(name: str) -> str:
    """runs/<name>-<date>-<time>-<pid>: two runs started in the same second get two folders. (Under torchrun
    the ranks share their launcher's pid, so they agree on the folder.)"""
    pid = os.getppid() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else os.getpid()
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{pid}")


# ----------------------------------------------------------------------------------------------------------
# Empty strings where a path or a name goes
# ----------------------------------------------------------------------------------------------------------

def refuse_empty_values(parser, args) -> None:
    """Every text flag given as '' (or blanks), and UFT_CACHE set to '', is an argparse error (exit 2):
    an empty path means the current folder to Python, which is never what was meant."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is str and isinstance(value, str) and not value.strip() and action.default != value:
            parser.error(f"{action.option_strings[0]} {value!r}: empty; give a value, or leave the flag out "
                         "for its default")
    if "UFT_CACHE" in os.environ and not os.environ["UFT_CACHE"].strip():
        parser.error("UFT_CACHE is set but empty: set it to the folder for the built-in models, or unset it "
                     "(default ~/.cache/uft)")


# ----------------------------------------------------------------------------------------------------------
# Resume: the config must be the one the checkpoint was trained with, and the data the same files
# ----------------------------------------------------------------------------------------------------------

RECORD = "run.json"                                    # in each checkpoint: the config it was trained with
NOT_SETTINGS = ("resume", "output_dir", "overwrite",   # how a run was started or continued, not what it trains
                "run_id")                              # (its identity: restore_checkpoint says whose it is)
DATA_FLAGS = ("data", "test_data")                     # flags that may name data files
EXTRA_KEYS = {"run_id": (str, type(None)), "data_files": (dict,)}   # keys of config.json that are not flags


def write_json(path: Path, data: dict) -> None:
    """A JSON file replaced at once (a kill leaves the old file or the new one, never half of one)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_config(folder: Path, config: dict) -> None:
    """config.json, replaced at once."""
    write_json(Path(folder) / "config.json", config)


def write_record(checkpoint: Path, config: dict) -> None:
    """Beside a checkpoint's weights: the config it was trained with (`check_resume` compares config.json
    with it)."""
    (Path(checkpoint) / RECORD).write_text(json.dumps({"config": config}, indent=2))


KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def expected_type(action) -> str | None:
    """What a flag's value must be in config.json, from the parser: 'bool', 'int', 'float', 'str' or None
    (a flag this check does not know how to type)."""
    if action.nargs == 0 and isinstance(action.const, bool):          # store_true / store_false
        return "bool"
    return {int: "int", float: "float", str: "str"}.get(action.type)


def value_error(key: str, value, action) -> str | None:
    """Why `value` cannot be flag `key`'s value (its type, its choices), or None if it can."""
    kind = expected_type(action)
    if value is None:
        return None if action.default is None and kind != "bool" else f"is null, but --{key} needs a value"
    ok = {"bool": isinstance(value, bool), "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), None: True}[kind]
    if not ok:
        return f"is {json.dumps(value)}, but --{key} takes {KINDS[kind]}"
    if action.choices is not None and value not in action.choices:
        return f"is {json.dumps(value)}, not one of {', '.join(map(str, action.choices))} (--{key})"
    return None


def check_config(config: dict, parser, path: Path) -> None:
    """Every key of a run's config.json is a flag of `parser` (or one of EXTRA_KEYS) with a value of the
    flag's type and choices; otherwise a UserError naming the key. The allowed keys and types come from the
    parser, so a new flag needs nothing here."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    for key, value in config.items():
        if key in actions:
            problem = value_error(key, value, actions[key])
        elif key in EXTRA_KEYS:
            problem = None if isinstance(value, EXTRA_KEYS[key]) else f"is {json.dumps(value)}, not valid"
        else:
            problem = f"is not a flag of {parser.prog}"
        if problem:
            raise user_error(f"{path}: '{key}' {problem}; config.json must hold the values the run started "
                             "with (was it edited, or written by another version?)")


def edited_keys(config: dict, trained: dict, defaults: dict) -> list[str]:
    """The settings in which config.json differs from the config a checkpoint was trained with (a flag
    missing from either, e.g. one added to the script since, counts as its default)."""
    a, b = {**defaults, **config}, {**defaults, **trained}
    return sorted(k for k in a.keys() | b.keys() if k not in NOT_SETTINGS and a.get(k) != b.get(k))


def check_resume(folder: Path, config: dict, parser) -> None:
    """Before a resume loads anything: config.json is well typed (`check_config`), equal to the config its
    checkpoint was trained with, and names data files that have not changed since. A UserError otherwise."""
    folder = Path(folder)
    check_config(config, parser, folder / "config.json")
    record = folder / "checkpoint" / RECORD
    if record.exists():       # checkpoints written before this check have no record
        try:
            trained = json.loads(record.read_text())["config"]
        except (ValueError, KeyError, TypeError):
            raise user_error(f"{record}: damaged (not the JSON this script writes); the checkpoint cannot "
                             "be checked against config.json") from None
        defaults = vars(parser.parse_args([]))
        edited = edited_keys(config, trained, defaults)
        if edited:
            shown = ", ".join(f"'{k}' {json.dumps(config.get(k, defaults.get(k)))} (trained with "
                              f"{json.dumps(trained.get(k, defaults.get(k)))})" for k in edited[:3])
            raise user_error(f"{folder / 'config.json'}: edited after the run started: {shown}; a resumed "
                             "run keeps its own settings: put the values back, or start a new run with "
                             "--output_dir")
    check_data_files(config.get("data_files") or {})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pin_data_files(args, generated=()) -> None:
    """A new run's data files by absolute path (a resume from another folder reads the same files), and
    `args.data_files`: flag -> {absolute path: sha256}, which config.json records."""
    pinned = {}
    for flag in DATA_FLAGS:
        value = getattr(args, flag, None)
        if not value or value in generated:
            continue
        paths = [str(Path(p.strip()).expanduser().resolve()) for p in value.split(",") if p.strip()]
        setattr(args, flag, ",".join(paths))
        pinned[flag] = {p: file_sha256(Path(p)) for p in paths if Path(p).is_file()}
    args.data_files = pinned


def check_data_files(pinned: dict) -> None:
    """Each data file a run recorded is still there with the same content, or a UserError naming it."""
    for flag, files in pinned.items():
        for path, digest in (files or {}).items():
            if not Path(path).is_file():
                raise user_error(f"--{flag} {path}: no longer there; the run trained on it: put it back "
                                 "(or start a new run)")
            if file_sha256(Path(path)) != digest:
                raise user_error(f"--{flag} {path}: changed since the run started (sha256 {digest[:12]}… "
                                 "recorded in config.json); resuming needs the rows it trained on: put the "
                                 "file back, or start a new run")


# ----------------------------------------------------------------------------------------------------------
# --overwrite and what the run reads
# ----------------------------------------------------------------------------------------------------------

def inputs(args, flags=("model", "gguf_file", "data", "test_data", "ref_model", "classifier")) -> list:
    """(flag, value, path read) for everything a run may read from disk; a --model folder is also read as
    its checkpoint/ (--eval_only of a run folder)."""
    found = []
    for flag in flags:
        value = getattr(args, flag, None)
        for path in (value.split(",") if flag in DATA_FLAGS else [value]) if value else []:
            found.append((flag, path.strip(), path.strip()))
            if flag == "model":
                found.append((flag, path, str(Path(path) / "checkpoint")))
    return found


def check_overwrite(targets: list[Path], reads: list) -> None:
    """--overwrite is about to delete `targets`: refused (a UserError) if a path the run reads (`inputs`) is
    one of them or lies inside one."""
    for flag, given, path in reads:
        read = Path(path).expanduser().resolve()
        for target in targets:
            target = Path(target).resolve()
            if read == target or target in read.parents:
                raise user_error(f"--overwrite would delete {target}, which --{flag} {given} reads; choose "
                                 "another --output_dir")


# ----------------------------------------------------------------------------------------------------------
# A full disk during a save
# ----------------------------------------------------------------------------------------------------------

def looks_like_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether an exception from a save means the disk is full: an OSError with ENOSPC, a library's error
    whose text says so (safetensors: "IoError(Os { code: 28, kind: StorageFull ...})"; torch.save: "file write
    failed"), or under 1 MB left on the folder's file system."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    text = str(err)
    if "code: 28" in text or "StorageFull" in text or "No space left" in text:
        return True
    try:
        stats = os.statvfs(folder)
        return stats.f_bavail * stats.f_frsize < 1 << 20
    except OSError:
        return False


@contextlib.contextmanager
def removed_if_it_fails(tmp: Path, final: Path):
    """Writing `tmp` (a temp copy of `final`): on any error it is removed, and a full disk is re-raised as
    OSError(ENOSPC) naming `final`, whatever library raised it (the run then ends with one line, exit 1)."""
    try:
        yield
    except Exception as err:
        full = looks_like_disk_full(err, Path(tmp).parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(err, OSError):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from None
        raise


if __name__ == "__main__":
    sys.exit("guards.py is a support module of uft.py and sft_go.py; run those")
