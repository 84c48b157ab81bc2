"""Tasks for uft.py and sft_go.py in the released schema: the task interface, reading data, and per task its
prompt, generator, solver, row check and reward.

Read from the top: `Task`, `TASKS` and `reward` say what a task is and which one scores a row; then where the
released scorers find an answer; then how data is read (files, `save_to_disk` folders and Hub datasets, all
through `datasets`) and checked; then the tasks: countdown (generated, solved, rewarded by exact arithmetic),
Knights and Knaves (generated puzzles with one solution, a brute-force solver, the released deduction trace),
MATH (the standard answer normalisation), the numeric answers of GSM8K / AIME / AMC, the search tree of the
paper's theorem, and supervised {prompt, response} rows for sft_go.py.

A row is a dict with the released columns: `question` (raw prompt text), `hint` (the reference solution as a
list of fragments, one per reasoning step), `answer` (the full target: fragments + `</think>` + the answer
tag), plus what the task's reward needs (countdown: `nums`, `target`; K&K: `ground_truth`; MATH and numeric:
`target`). Every reward has the released three levels: 1.0 right, 0.1 an answer was extracted but is wrong,
0.0 none was; docs/method.md lists each scorer's rule in words.

    >>> row = generate_countdown(1, seed=0, min_nums=3, max_nums=3)[0]
    >>> TASKS["countdown"].reward(row, row["question"] + row["answer"])
    1.0
    >>> row = generate_kk(1, seed=0)[0]
    >>> reward(row, row["question"] + row["answer"])
    1.0
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import json
import math
import operator
import random
import re
import sys
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Callable

from common import UserError

# ----------------------------------------------------------------------------------------------------------
# The task interface: what a task gives the trainer, which task scores a row, the reward of a row
# ----------------------------------------------------------------------------------------------------------

REWARD_CORRECT, REWARD_WRONG, REWARD_NONE = 1.0, 0.1, 0.0  # released: right / extracted but wrong / none


# The released mapping from a row's data_source to its scorer (released names first; the project's own
# aliases after them). Countdown and K&K also take any data_source that contains their name, as released.
COUNTDOWN_SOURCE = "countdown"
KK_SOURCE = "kk_logic"
MATH_SOURCES = ("DigitalLearningGmbH/MATH-lighteval", "math500", "minerva", "olympiad_bench", "cais/hle",
                "lighteval/MATH", "math")
NUMERIC_SOURCES = ("openai/gsm8k", "aime", "amc")   # a number compared within 1e-5
TREE_SOURCE = "tree"


@dataclasses.dataclass(frozen=True)
class Task:
    """What training and evaluation need from a task."""
    name: str
    reward: Callable[[dict, str], float]              # (row, prompt + completion) -> 1.0 / 0.1 / 0.0
    check_row: Callable[[dict, int, str], dict]       # file row -> checked fields; ValueError names it
    split: Callable[..., tuple[list, list]]           # (num_train, num_test, seed, ...) -> generated rows
    sources: tuple[str, ...] = ()                     # the data_source values of its rows
    sample_fields: tuple[str, ...] = ()               # row fields written beside evaluation samples


# The functions named here are defined further down; a lambda looks each one up when it is called.
TASKS = {
    "countdown": Task("countdown",
                      reward=lambda row, text: countdown_reward(text, row["nums"], row["target"]),
                      check_row=lambda row, i, where: validate_countdown_row(row, i, where),
                      split=lambda *args, **kw: countdown_split(*args, **kw),
                      sources=(COUNTDOWN_SOURCE,), sample_fields=("nums", "target")),
    "kk": Task("kk",
               reward=lambda row, text: kk_reward(text, row["ground_truth"]),
               check_row=lambda row, i, where: validate_kk_row(row, i, where),
               split=lambda *args, **kw: kk_split(*args, **kw),
               sources=(KK_SOURCE, "kk"), sample_fields=("data_source", "ground_truth")),
    "math": Task("math",
                 reward=lambda row, text: math_reward(text, row["target"]),
                 check_row=lambda row, i, where: validate_math_row(row, i, where),
                 split=lambda *args, **kw: no_generator("math"),
                 sources=MATH_SOURCES, sample_fields=("data_source", "target", "level")),
    "numeric": Task("numeric",
                    reward=lambda row, text: numeric_reward(text, row["target"]),
                    check_row=lambda row, i, where: validate_numeric_row(row, i, where),
                    split=lambda *args, **kw: no_generator("numeric"),
                    sources=NUMERIC_SOURCES, sample_fields=("data_source", "target")),
    "tree": Task("tree",
                 reward=lambda row, text: tree_reward(text, row["ground_truth"]),
                 check_row=lambda row, i, where: validate_tree_row(row, i, where),
                 split=lambda *args, **kw: tree_split(*args, **kw),
                 sources=(TREE_SOURCE,), sample_fields=("data_source", "ground_truth")),
}


GENERATED = ("countdown", "kk", "tree")  # --data values that generate rows instead of reading a file


def no_generator(task: str):
    raise UserError(f"the {task} task has no built-in generator: pass --data <file, folder or Hub dataset> "
                    "(e.g. the released MATH parquet)")


def task_of(row: dict, default: str = "countdown") -> str | None:
    """The task that scores a row: by its data_source as released (an exact source name, or one containing
    'countdown' or 'kk_logic'), or a task's own name; `default` when it has none; None for a source no task
    scores.

    >>> [task_of({"data_source": s}) for s in ("openai/gsm8k", "math500", "countdown-3to4", "x")], task_of({})
    (['numeric', 'math', 'countdown', None], 'countdown')
    """
    source = row.get("data_source")
    if not source:
        return default
    exact = next((name for name, t in TASKS.items() if source == name or source in t.sources), None)
    if exact is not None:
        return exact
    return next((name for name, part in (("countdown", COUNTDOWN_SOURCE), ("kk", KK_SOURCE))
                 if isinstance(source, str) and part in source), None)


def row_source(row: dict, default: str = "countdown") -> str:
    """What per-source accuracy groups a row by: its data_source, else the name of its task."""
    return row.get("data_source") or default


def accuracy_by_source(rows: list[dict], rewards: list[float]) -> dict[str, float]:
    """Fraction of rewards exactly 1.0 among each source's rows (row_source), sources in order of appearance.

    >>> rows = [{"data_source": "a"}, {"data_source": "b"}, {}, {"data_source": "a"}]
    >>> accuracy_by_source(rows, [1, 0.1, 1, 0])
    {'a': 0.5, 'b': 0.0, 'countdown': 1.0}
    """
    hits: dict[str, list[bool]] = {}
    for row, r in zip(rows, rewards):
        hits.setdefault(row_source(row), []).append(r == REWARD_CORRECT)
    return {source: sum(h) / len(h) for source, h in hits.items()}


def has_reward(row: dict) -> bool:
    """Whether a row can be scored: its task (task_of) has one and the row has what it reads."""
    name = task_of(row)
    return name is not None and {"question", *TASKS[name].sample_fields} <= row.keys()


def reward(row: dict, text: str, task: str = "countdown") -> float:
    """The reward of prompt + completion `text` under the row's task (task_of; an unknown source: `task`)."""
    return TASKS[task_of(row, task) or task].reward(row, text)


def answer_pieces(row: dict, key: str = "answer") -> list[str]:
    """Pieces a row's answer is tokenised in: each hint fragment, then the tail (`</think>`, the answer).

    A hint is tokenised on its own when it joins the prompt; tokenising the SFT target piece by piece keeps
    SFT, hinted prompts and the hint NLL on the same token boundaries (BPE merges may cross fragments).
    An answer that does not start with its fragments is one piece.
    >>> answer_pieces({"answer": "1 + 2 = 3\\nSo 3 </think>", "hint": ["1 + 2 = 3\\n", "So 3"]})
    ['1 + 2 = 3\\n', 'So 3', ' </think>']
    """
    hint, answer = row.get("hint"), row[key]
    if isinstance(hint, list) and hint and answer.startswith("".join(hint)):
        tail = answer[len("".join(hint)):]
        return list(hint) + ([tail] if tail else [])
    return [answer]


def answer_token_ids(row: dict, encode) -> list[int]:
    """Token ids of the answer, piece by piece (`answer_pieces`): every hint's tokens are a prefix of them."""
    return [t for piece in answer_pieces(row) for t in encode(piece)]


# --- where the answer is: the released extraction, shared by the countdown, K&K, MATH and numeric scorers ----

ASSISTANT_MARKERS = ("Assistant:", "<|im_start|>assistant")  # the first one the text contains opens the answer


def assistant_part(text) -> str | None:
    """Everything after the first "Assistant:"; in a text without one, everything after the first
    "<|im_start|>assistant" (chat-template prompts); None when neither is there (then no answer: 0.0).

    >>> assistant_part("User: 2 + 2? Assistant: <answer> 4 </answer>"), assistant_part("<|im_start|>assistant\\n4")
    (' <answer> 4 </answer>', '\\n4')
    """
    if not isinstance(text, str):
        return None
    for marker in ASSISTANT_MARKERS:
        start = text.find(marker)
        if start >= 0:
            return text[start + len(marker):]
    return None


def last_answer_tag(text: str) -> str | None:
    """The last block of re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL), stripped; None if there is
    none. The blocks are lazy and do not overlap, scanned left to right: a stray <answer> starts a block that
    runs to the first </answer> after it. Linear time: an unclosed <answer> ends the scan (no later one can
    close either).

    >>> last_answer_tag("<answer> a <answer> b </answer> c </answer> <answer>")
    'a <answer> b'
    """
    found, pos = None, 0
    while (opened := text.find("<answer>", pos)) >= 0:
        closed = text.find("</answer>", opened + len("<answer>"))
        if closed < 0:
            break
        found, pos = text[opened + len("<answer>"):closed], closed + len("</answer>")
    return None if found is None else found.strip()


def extract_answer(text: str) -> str | None:
    """The released extraction of countdown, MATH and the numeric sources: in the assistant part (see
    assistant_part), the last line, the last <answer>...</answer> block on it, stripped; None if absent. So an
    answer followed by a newline is not extracted, as in the released scorers.

    >>> extract_answer("Assistant: Let me solve this.\\n<think> 3 * 4 = 12 </think>"
    ...                "\\n<answer> 3 * 4 </answer>")
    '3 * 4'
    """
    part = assistant_part(text)
    return None if part is None else last_answer_tag(part[part.rfind("\n") + 1:])


# --- prompts for instruct models: the chat template (--chat_template), the short countdown prompt ---------

def split_prompt(question: str) -> tuple[str, str]:
    """(the user's words, the assistant's opening) of a released prompt: the text before the last
    "Assistant:" without the system preamble (CONVERSATION) and its "User: ", and what follows it. A prompt
    without "Assistant:" is all user words.

    >>> split_prompt(CONVERSATION + "User: 2 + 2?\\nAssistant: Let me think.\\n<think> ")
    ('2 + 2?', 'Let me think.\\n<think> ')
    """
    at = question.rfind(ASSISTANT_MARKERS[0])
    if at < 0:
        return question, ""
    user = question[:at].removeprefix(CONVERSATION).strip()
    return user.removeprefix("User:").strip(), question[at + len(ASSISTANT_MARKERS[0]):].lstrip(" ")


def chat_question(question: str, apply_template: Callable[[list[dict]], str]) -> str:
    """The prompt in a chat template: the user's words as the user turn, then the generation prompt, then the
    assistant's opening, so hints continue the assistant's turn. The rewards find the answer after the
    template's "<|im_start|>assistant" (assistant_part), as the released scorers do.
    apply_template: messages -> text, e.g. the tokenizer's apply_chat_template(..., add_generation_prompt=True,
    tokenize=False)."""
    user, opening = split_prompt(question)
    return apply_template([{"role": "user", "content": user}]) + opening


SHORT_COUNTDOWN = (  # --prompt_style short: the released prompt without its preamble, for small instruct models
    "User: Using the numbers {nums}, create an equation that equals {target}. Use + - * / and each number "
    "once. Think in <think> </think> tags, then give the equation in <answer> </answer> tags.\n" +
    "{opening}")


def short_question(row: dict) -> str:
    """A countdown row's short prompt (SHORT_COUNTDOWN): the numbers as "4, 7, and 9", the released opening.

    >>> short_question({"nums": [4, 7, 9], "target": 19}).split("\\n")[0][:48]
    'User: Using the numbers 4, 7, and 9, create an e'
    """
    return SHORT_COUNTDOWN.format(nums=english_list([str(int(x)) for x in row["nums"]]),
                                  target=int(row["target"]), opening=ASSISTANT_START)


PROMPT_STYLES = ("released", "short")  # --prompt_style; short rewrites countdown questions only


def restyle(rows: list[dict], style: str = "released") -> list[dict]:
    """--prompt_style: 'released' keeps the rows; 'short' gives countdown rows short_question and makes the
    answer's closing tags (`</think>` and the answer tag) a last hint fragment, so that hints can show a model
    that never writes the tags how an answer ends (released hints hold the reasoning only). Answers and rewards
    are unchanged. A row of another task is a ValueError naming it."""
    if style == "released":
        return rows
    for i, row in enumerate(rows):
        if task_of(row) != "countdown":
            raise ValueError(f"--prompt_style {style}: countdown rows only (row {i} is "
                             f"{task_of(row) or 'of an unknown task'})")
    return [{**row, "question": short_question(row), "hint": answer_pieces(row)} for row in rows]


# ----------------------------------------------------------------------------------------------------------
# Reading data through `datasets`: files, save_to_disk folders, Hub datasets; row checks shared by the tasks
# ----------------------------------------------------------------------------------------------------------

DATA_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}  # suffix -> builder


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name (no nested quantifier: linear)


MIXED_COLUMN = re.compile(r"Column\(([^)]*)\) changed from (\w+) to (\w+) in row ([0-9]+)")  # pyarrow's message


CSV_STRUCTURED = ("hint", "nums", "reward_model", "ground_truth", "extra_info", "conversations")  # CSV: as text


def data_location(value: str) -> str:
    """How a --data / --test_data value is read: 'file' (an existing .parquet, .json, .jsonl or .csv file),
    'folder' (a save_to_disk folder, or a folder of data files) or 'hub' (an owner/name id that is no local
    path). A missing file or folder is a FileNotFoundError, a file of another kind a ValueError.

    >>> data_location("openai/gsm8k")
    'hub'
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in DATA_FORMATS:
        if path.is_file():
            return "file"
        raise FileNotFoundError(f"no such data file: {value}")
    if path.exists():
        raise ValueError(f"{value}: unknown data format; give a .parquet, .json, .jsonl or .csv file, a "
                         f"save_to_disk folder, a Hub dataset id (owner/name), or one of {', '.join(GENERATED)}")
    if HUB_ID.fullmatch(value):
        return "hub"
    raise FileNotFoundError(f"no such data file or folder: {value} (a Hub dataset id reads owner/name)")


def parse_columns(text: str | None) -> dict[str, str]:
    """A column mapping 'ours=theirs,...' (the project's field = the dataset's column) as a dict.

    >>> parse_columns("nums=numbers, target=answer")
    {'nums': 'numbers', 'target': 'answer'}
    """
    mapping = {}
    for pair in (text or "").split(","):
        ours, sep, theirs = (part.strip() for part in pair.partition("="))
        if not pair.strip():
            continue
        if not sep or not ours or not theirs or ours in mapping:
            raise ValueError(f"column mapping {text!r}: give ours=theirs pairs, comma-separated, each field "
                             "once, e.g. nums=numbers,target=answer")
        mapping[ours] = theirs
    return mapping


def _first_line(err: BaseException) -> str:
    """'Type: message' of the innermost cause (datasets wraps the reader's own error), first line only."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _load_records(value: str, where: str, split: str) -> list[dict]:
    """The rows, as dicts, of the `datasets` Dataset behind a value (see data_location). Local files are loaded
    with a throw-away cache (a rewritten file is never served stale, and nothing piles up); a Hub dataset uses
    the usual cache. A JSON column must have one type in every row (datasets would otherwise re-read a mixed
    one as JSON text and turn the string "98" into the number 98)."""
    import tempfile

    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # its error logs: read_records says it in one line
    datasets.disable_progress_bars()                             # a file of rows reads in a blink
    if where == "hub":
        return datasets.load_dataset(value, split=split).to_list()
    path = Path(value).expanduser()
    if where == "folder" and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"no split {split!r} in this DatasetDict (splits: {', '.join(loaded)}); "
                                 "choose one with --data_split / --test_split")
            return loaded[split].to_list()
        return loaded.to_list()
    with tempfile.TemporaryDirectory() as cache:
        if where == "folder":
            return datasets.load_dataset(str(path), split=split, cache_dir=cache, keep_in_memory=True).to_list()
        builder = DATA_FORMATS[path.suffix.lower()]
        extra = {"on_mixed_types": None} if builder == "json" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                     keep_in_memory=True, **extra).to_list()


def check_json_file(path: Path) -> None:
    """Refuse, in one line naming the file and line, a .json/.jsonl file that is not UTF-8 or does not hold
    JSON objects (JSONL: one per line, no blank line; .json: a list of them). This runs before `datasets`
    reads the file: pyarrow's JSON reader crashes the process (segmentation fault) on a first line `null`."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(value, list):
            raise ValueError(f"{path}: a .json file must hold a list of row objects, not a "
                             f"{type(value).__name__}")
        kinds = [(i, type(v).__name__) for i, v in enumerate(value) if not isinstance(v, dict)]
        if kinds:
            raise ValueError(f"{path}: row {kinds[0][0]} (counting from 0) is a JSON {kinds[0][1]}, not an object")
        return
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1] if text.endswith("\n") else lines, 1):
        if not line.strip():
            raise ValueError(f"{path}: line {number} is blank (JSONL: one JSON object per line)")
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object")


def _csv_cell(value):
    """A CSV cell that holds a list or an object (CSV has no such type) decoded from JSON text or a Python
    literal: '["a", "b"]' -> ['a', 'b']; anything else stays as it is (the row check then names the field)."""
    if not isinstance(value, str) or not value.lstrip().startswith(("[", "{")) or len(value) > 1_000_000:
        return value
    for decode in (json.loads, ast.literal_eval):   # literal_eval: Python literals only, never code
        try:
            return decode(value)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            continue
    return value


def read_records(value: str, split: str = "train", columns: dict[str, str] | None = None) -> list[dict]:
    """The rows of a .parquet/.json/.jsonl/.csv file, a save_to_disk folder or a Hub dataset (its `split`),
    read by `datasets`, as dicts; `columns` renames dataset columns to the project's fields (ours -> theirs).
    A source that cannot be read is one ValueError line naming it (a missing file: FileNotFoundError)."""
    where = data_location(value)
    if where == "file" and DATA_FORMATS[Path(value).suffix.lower()] == "json":
        check_json_file(Path(value))
    try:
        records = _load_records(value, where, split)
    except ConnectionError as err:   # datasets' offline and unreachable-Hub errors
        import os
        offline = " (HF_HUB_OFFLINE=1: only datasets already in the cache load)" \
            if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise ValueError(f"{value}: could not load the Hub dataset{offline} [{_first_line(err)}]") from None
    except Exception as err:  # datasets and pyarrow raise many types for a broken source; one clear line
        kind = DATA_FORMATS.get(Path(value).suffix.lower(), "a dataset") if where == "file" else where
        why = _first_line(err)
        if "corresponds to no data" in why:                    # datasets' words for a file without rows
            raise ValueError(f"{value}: no rows") from None
        if (mixed := MIXED_COLUMN.search(why)) is not None:   # pyarrow's words for a column of two types
            column, old, new, row = mixed.groups()
            raise _row_error(value, int(row), column.strip("/"), f"changed from {old} to {new} (every row "
                             "must give a column the same type)") from None
        raise ValueError(f"{value}: could not be read as {kind} [{why}]") from None
    if where == "file" and DATA_FORMATS[Path(value).suffix.lower()] == "csv":
        records = [{k: _csv_cell(v) if k in CSV_STRUCTURED else v for k, v in r.items()} for r in records]
    if not records:
        raise ValueError(f"{value}: no rows")
    return [_renamed(r, columns, value) for r in records] if columns else records


def _renamed(record: dict, columns: dict[str, str], value: str) -> dict:
    """A record with the dataset's columns under the project's names (see read_records)."""
    missing = [theirs for theirs in columns.values() if theirs not in record]
    if missing:
        raise ValueError(f"{value}: no column {missing[0]!r} (column mapping {columns}; columns: "
                         f"{', '.join(sorted(record))})")
    kept = {k: v for k, v in record.items() if k not in columns.values()}
    return {**kept, **{ours: record[theirs] for ours, theirs in columns.items()}}


def _row_error(source: str, index: int, field: str, why: str) -> ValueError:
    return ValueError(f"{source}: row {index} (counting from 0): field '{field}' {why}")


def _missing(x) -> bool:
    """None, or NaN: how a column a row does not use reads back from a mixed parquet or CSV file."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def _as_int(x) -> int | None:
    """int for ints and numpy integers; None for anything else: bools, strings and floats too."""
    if isinstance(x, (bool, float, str, bytes)):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _as_whole(x) -> int | None:
    """_as_int, and also a float that is a whole number: 24.0 -> 24 (a file that mixes sources stores the
    countdown target column as floats, NaN in the other rows); 24.5, NaN, '24' -> None."""
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        return int(x)
    return _as_int(x)


def _as_list(x) -> list | None:
    """A Python list from a list, tuple or numpy array; else None."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (str, bytes)) else None


def _text_fields(row: dict, index: int, source: str) -> dict:
    """question, hint (non-empty list of strings) and answer of a row, checked (every task has them)."""
    for field in ("question", "hint", "answer"):
        if _missing(row.get(field)):
            raise _row_error(source, index, field, "is missing")
    for field in ("question", "answer"):
        if not isinstance(row[field], str):
            raise _row_error(source, index, field, f"must be a string, got {type(row[field]).__name__}")
    hint = _as_list(row["hint"])
    if not hint or not all(isinstance(h, str) for h in hint):
        raise _row_error(source, index, "hint", "must be a non-empty list of strings")
    return {"question": row["question"], "hint": hint, "answer": row["answer"]}


def _ground_truth(row: dict, index: int, source: str):
    """A row's ground truth: its `ground_truth` column, or the released `reward_model.ground_truth`."""
    holder = None if _missing(row.get("reward_model")) else row["reward_model"]
    if holder is not None and not isinstance(holder, dict):
        raise _row_error(source, index, "reward_model", f"must be an object, got {type(holder).__name__}")
    own = row.get("ground_truth")
    return own if not _missing(own) else (holder or {}).get("ground_truth")


def _truth_field(row: dict, index: int, source: str, name: str, top_first: bool = False):
    """A value the reward needs: reward_model.ground_truth[name] (the released place) or the row's own column
    `name` (top_first: that one first); None when neither holds one."""
    truth = _ground_truth(row, index, source)
    places = [truth.get(name) if isinstance(truth, dict) else None, row.get(name)]
    return next((v for v in (places[::-1] if top_first else places) if not _missing(v)), None)


def check_rows(records: list[dict], source: str, task: str = "countdown",
               math_levels: set[int] | None = None) -> list[dict]:
    """Each record checked by its own task (task_of: its data_source, else `task`); sources without a task
    are skipped with one line each on stderr, and so are MATH rows outside math_levels (when given)."""
    rows, skipped, off_level = [], {}, 0
    for i, record in enumerate(records):
        if not isinstance(record.get("data_source") or "", str):
            raise _row_error(source, i, "data_source", f"must be a string, got {record['data_source']!r}")
        name = task_of(record, task)
        if name is None:
            skipped[record.get("data_source")] = skipped.get(record.get("data_source"), 0) + 1
            continue
        row = TASKS[name].check_row(record, i, source)
        if name == "math" and math_levels and row["level"] not in math_levels:
            off_level += 1
            continue
        rows.append(row)
    for data_source, count in skipped.items():
        print(f"{source}: {count} rows of data_source {data_source!r} skipped: no reward for it here "
              f"(tasks: {', '.join(TASKS)})", file=sys.stderr)
    if off_level:
        print(f"{source}: {off_level} MATH rows outside --math_levels {sorted(math_levels)} skipped",
              file=sys.stderr)
    return rows


def load_task_rows(path_or_name: str, split: str = "train", num_train: int = 10_240, num_test: int = 1_024,
                   seed: int = 0, task: str = "countdown", math_levels: set[int] | None = None,
                   columns: dict[str, str] | None = None) -> list[dict]:
    """Rows of the released schema: generated ('countdown', 'kk', 'tree') or read (read_records: a file, a
    save_to_disk folder, a Hub dataset; `split` picks the split of a folder or Hub dataset).

    num_train, num_test, seed: generated rows only. A source's rows are checked by their own task (see
    check_rows); extra columns are dropped. A source without a single row that can be scored is a ValueError.

    >>> load_task_rows("countdown_test.parquet")[0]["nums"]   # a released file   # doctest: +SKIP
    [47, 76, 55, 60]
    """
    if str(path_or_name) in GENERATED:
        train, test = TASKS[str(path_or_name)].split(num_train, num_test, seed)
        return {"train": train, "test": test}[split]
    records = read_records(str(path_or_name), split, columns)
    rows = check_rows(records, str(path_or_name), task, math_levels)
    if not rows:
        sources = sorted({str(r.get("data_source")) for r in records if task_of(r, task) is None})
        why = (f"data_source {', '.join(map(repr, sources))} has no reward here (tasks score "
               f"{', '.join(s for t in TASKS.values() for s in t.sources)})" if sources
               else f"no MATH row has a level in --math_levels {sorted(math_levels or ())}")
        raise ValueError(f"{path_or_name}: none of its {len(records)} rows can be scored: {why}")
    return rows

# ----------------------------------------------------------------------------------------------------------
# Countdown: the released prompt, a solver, a generator, the row check, the released three-level reward
# ----------------------------------------------------------------------------------------------------------

CONVERSATION = (  # how every released prompt begins: raw text for base models, no chat template
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer.\n")


ASSISTANT_START = "Assistant: Let me solve this step by step.\n<think> "  # how every released prompt ends


COUNTDOWN_TEMPLATE = (  # the released prompt; note the trailing space after <think>
    CONVERSATION +
    "User: Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n" +
    ASSISTANT_START)


FINAL_PREFIX = "Therefore, the final equation is "  # how the last hint fragment of the released data begins


NUM_RANGE = (1, 99)  # drawn uniformly from here (inclusive), repeats allowed, as in the released data


TARGET_RANGE = (10, 100)  # targets are picked among the reachable values in this range (inclusive)


HELDOUT_BUCKETS = 10  # 1 problem in 10 (stable hash of nums + target) may only appear in test splits


ROW_FIELDS = ("question", "hint", "answer", "nums", "target")  # the released columns the project uses


MAX_ANSWER_CHARS = 1_000  # a longer extracted answer scores 0.1 unparsed (bounds the reward's time)


MAX_PAREN_DEPTH = 100  # deeper parentheses are a ValueError (bounds recursion: 3 Python frames per level)


MAX_NUMBER_BITS = 4_096  # a larger numerator or denominator is a ValueError (bounds big-integer work)


# ASCII only: the released `\s` also passed unicode spaces (which eval then rejected)
ASCII_WHITESPACE = " \t\n\r\f\v"


ANSWER_CHARS = frozenset("0123456789+-*/()." + ASCII_WHITESPACE)  # the released character filter, ASCII only


def countdown_question(nums: list[int], target: int) -> str:
    """The released prompt for one problem: nums are shown as a Python list, e.g. [44, 19, 35]."""
    return COUNTDOWN_TEMPLATE.format(nums=[int(x) for x in nums], target=int(target))


def countdown_key(nums: list[int], target: int) -> tuple[tuple[int, ...], int]:
    """Identity of a problem: the order of the numbers does not make a new problem."""
    return tuple(sorted(int(x) for x in nums)), int(target)


# --- solver: combine two numbers at a time; every intermediate result is a non-negative integer ------
# A node is (value,) for a given number or (value, op, left, right) for one arithmetic step.

def _steps_from(x: tuple, y: tuple):
    """Allowed (left, op, right, value) steps on two nodes; '-' and '/' put the larger on the left."""
    big, small = (x, y) if x[0] >= y[0] else (y, x)
    yield x, "+", y, x[0] + y[0]
    yield big, "-", small, big[0] - small[0]
    yield x, "*", y, x[0] * y[0]
    if small[0] != 0 and big[0] % small[0] == 0:  # exact division only, never by zero
        yield big, "/", small, big[0] // small[0]


def _solve_dfs(nodes: list[tuple], target: int, allow_trivial: bool) -> tuple | None:
    """Depth-first: pick a pair, apply a step, recurse to one node; the first hit wins (deterministic)."""
    if len(nodes) == 1:
        return nodes[0] if nodes[0][0] == target else None
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            rest = nodes[:i] + nodes[i + 1:j] + nodes[j + 1:]
            for left, op, right, value in _steps_from(nodes[i], nodes[j]):
                if not allow_trivial and op in "*/" and 1 in (left[0], right[0]):
                    continue  # x * 1, x / 1 read badly in a worked solution: only if nothing else works
                found = _solve_dfs(rest + [(value, op, left, right)], target, allow_trivial)
                if found is not None:
                    return found
    return None


def _render(node: tuple, top: bool = True) -> tuple[str, list[str]]:
    """(expression, step lines) of a tree. Released style: each composite operand in parentheses, the whole
    expression without; one 'a op b = c' line per step, children first, so a line only uses values shown."""
    if len(node) == 1:
        return str(node[0]), []
    value, op, left, right = node
    (left_expr, left_steps), (right_expr, right_steps) = _render(left, False), _render(right, False)
    expr = f"{left_expr} {op} {right_expr}"
    return ((expr if top else f"({expr})"),
            left_steps + right_steps + [f"{left[0]} {op} {right[0]} = {value}\n"])


def solve_countdown(nums: list[int], target: int) -> list[str] | None:
    """Hint fragments of a solution that uses every number once, or None when there is none.

    >>> solve_countdown([44, 19, 35], 98)
    ['44 + 19 = 63\\n', '35 + 63 = 98\\n', 'Therefore, the final equation is 35 + (44 + 19)']
    """
    nodes = [(int(x),) for x in nums]
    if not nodes:
        return None
    tree = (_solve_dfs(nodes, int(target), allow_trivial=False)
            or _solve_dfs(nodes, int(target), allow_trivial=True))
    if tree is None:
        return None
    expr, steps = _render(tree)
    return steps + [FINAL_PREFIX + expr]


def _reachable(nums: tuple[int, ...]) -> set[int]:
    """Values of all allowed expressions using every number once: each split in two parts, combined under
    _steps_from's rules, so solve_countdown finds exactly these (values only: cheaper than _solve_dfs)."""
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for mask in range(1, 1 << len(nums) - 1):  # nums[0] always goes right: each unordered split once
        left = tuple(x for i, x in enumerate(nums[1:]) if mask >> i & 1)
        right = (nums[0],) + tuple(x for i, x in enumerate(nums[1:]) if not mask >> i & 1)
        right_values = _reachable(right)
        for a in _reachable(left):
            for b in right_values:
                big, small = max(a, b), min(a, b)
                out.update((a + b, big - small, a * b))
                if small != 0 and big % small == 0:
                    out.add(big // small)
    return out


def reachable_targets(nums: list[int]) -> list[int]:
    """Sorted targets in TARGET_RANGE that the solver can reach with all of nums, e.g. [3, 4] -> [12]."""
    low, high = TARGET_RANGE
    return sorted(v for v in _reachable(tuple(int(x) for x in nums)) if low <= v <= high)


# --- rows, generation, splits ----------------------------------------------------------------------

def make_countdown_row(nums: list[int], target: int, fragments: list[str]) -> dict:
    """A row of the released schema from a solution's fragments.

    >>> make_countdown_row([3, 4], 12, ['3 * 4 = 12\\n', 'Therefore, the final equation is 3 * 4'])['answer']
    '3 * 4 = 12\\nTherefore, the final equation is 3 * 4 </think>\\n<answer> 3 * 4 </answer>'
    """
    expr = fragments[-1].removeprefix(FINAL_PREFIX)
    return {"question": countdown_question(nums, target), "hint": list(fragments),
            "answer": "".join(fragments) + " </think>\n<answer> " + expr + " </answer>",
            "nums": [int(x) for x in nums], "target": int(target)}


def is_heldout(nums: list[int], target: int) -> bool:
    """Whether a problem is on the test side of every split (crc32 is stable across runs, unlike hash)."""
    return zlib.crc32(repr(countdown_key(nums, target)).encode()) % HELDOUT_BUCKETS == 0


def generate_countdown(n: int, seed: int | str, min_nums: int = 3, max_nums: int = 4,
                       heldout: bool | None = None, exclude: frozenset = frozenset()) -> list[dict]:
    """n distinct solvable problems with worked solutions; the same seed gives the same rows.

    Draw min_nums..max_nums numbers from NUM_RANGE, list the reachable targets in TARGET_RANGE, pick one
    uniformly. heldout=True keeps only held-out problems (see is_heldout), False only the others, None all;
    problems whose countdown_key is in `exclude` are skipped.

    >>> row = generate_countdown(1, seed=0)[0]
    >>> row["nums"], row["target"], row["hint"][-1]
    ([98, 54, 6, 34], 72, 'Therefore, the final equation is (98 - 54) + (34 - 6)')
    """
    if not 2 <= min_nums <= max_nums:
        raise ValueError(f"need 2 <= min_nums <= max_nums, got min_nums={min_nums}, max_nums={max_nums}")
    rng, rows, seen = random.Random(seed), [], set()
    for _ in range(100 * n + 1_000):  # a cap so an impossible request fails instead of looping forever
        if len(rows) == n:
            break
        nums = [rng.randint(*NUM_RANGE) for _ in range(rng.randint(min_nums, max_nums))]
        targets = [t for t in reachable_targets(nums) if heldout is None or is_heldout(nums, t) == heldout]
        if not targets:
            continue
        target = rng.choice(targets)
        key = countdown_key(nums, target)
        if key not in seen and key not in exclude:
            seen.add(key)
            rows.append(make_countdown_row(nums, target, solve_countdown(nums, target)))
    if len(rows) < n:
        raise ValueError(f"found only {len(rows)} distinct problems of {n} "
                         f"with {min_nums}-{max_nums} numbers")
    return rows


# The held-out problems every run before the final test set was scored or tuned on: the first USED_HELDOUT of
# the held-out stream of each seed in USED_SEEDS (uft.py: test 500 + validation 200; sft_go.py up to 400;
# countdown grids used seeds 0-5). They are now validation problems; the test set comes from a stream of its
# own and never contains one of them, whatever its seed (3-number streams of two seeds share 1-3%).
USED_HELDOUT, USED_SEEDS = 1_000, range(6)
TEST_SALT = "final-test-2026-12"   # seeds the test stream: problems no run had seen before this protocol


@functools.lru_cache(maxsize=8)
def used_heldout_keys(min_nums: int, max_nums: int) -> frozenset:
    """countdown_key of every problem the test set must avoid (see USED_HELDOUT)."""
    return frozenset(countdown_key(r["nums"], r["target"]) for seed in USED_SEEDS
                     for r in countdown_validation(USED_HELDOUT, seed, min_nums, max_nums))


def countdown_split(num_train: int, num_test: int, seed: int, min_nums: int = 3,
                    max_nums: int = 4) -> tuple[list[dict], list[dict]]:
    """(train, test) rows, disjoint by construction: test problems are held-out ones, train problems are not.

    The test side does not depend on num_train (runs with different budgets are evaluated on the same
    problems). It comes from its own salted stream minus every validation problem (used_heldout_keys);
    seed + 1 for the train side keeps it from drawing the validation stream's numbers.
    """
    test = generate_countdown(num_test, f"{TEST_SALT}-{seed}", min_nums, max_nums, heldout=True,
                              exclude=used_heldout_keys(min_nums, max_nums))
    train = generate_countdown(num_train, seed + 1, min_nums, max_nums, heldout=False)
    return train, test


def countdown_validation(num_val: int, seed: int, min_nums: int = 3, max_nums: int = 4) -> list[dict]:
    """Held-out problems for choosing settings, disjoint from countdown_split's test and train rows: the
    first num_val of the seed's held-out stream (at most USED_HELDOUT, the ones the test set avoids)."""
    if num_val > USED_HELDOUT:
        raise ValueError(f"at most {USED_HELDOUT} validation problems, got {num_val}")
    return generate_countdown(num_val, seed, min_nums, max_nums, heldout=True)


def validate_countdown_row(row: dict, index: int, source: str) -> dict:
    """question, hint, answer, nums and target of one countdown row, checked and converted; a ValueError names
    the source, row and field. nums and target are the row's own columns, else the released
    reward_model.ground_truth `numbers` and `target`. A whole float target (24.0, as a file that mixes
    sources stores it) is read as an int. No number may be negative: the released scorer reads an answer's
    numbers without their signs, so a row with one could never score 1.0. Whole floats in nums are read as
    ints too: a list column with one float in any row reads back as floats in every row."""
    truth = _ground_truth(row, index, source)
    truth = truth if isinstance(truth, dict) else {}
    values = {field: row.get(field) if not _missing(row.get(field)) else truth.get(alias)
              for field, alias in (("nums", "numbers"), ("target", "target"))}
    for field, value in values.items():
        if _missing(value):
            raise _row_error(source, index, field, "is missing")
    out = _text_fields(row, index, source)
    nums = [_as_whole(x) for x in _as_list(values["nums"]) or []]
    if not nums or None in nums:
        raise _row_error(source, index, "nums", "must be a non-empty list of integers")
    if min(nums) < 0:
        raise _row_error(source, index, "nums", f"must not hold a negative number (the released scorer reads "
                                                f"an answer's numbers without signs), got {nums}")
    target = _as_whole(values["target"])
    if target is None:
        raise _row_error(source, index, "target", f"must be an integer, got {values['target']!r}")
    return {**out, "nums": nums, "target": target}

# --- reward: exact arithmetic of the extracted answer (no eval) ---------------------------------------

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")  # a Python-style decimal literal: 7, 7., 7.5, .5


def _bounded(value: Fraction) -> Fraction:
    """The value itself, unless its numerator or denominator exceeds MAX_NUMBER_BITS (then ValueError)."""
    if value.numerator.bit_length() > MAX_NUMBER_BITS or value.denominator.bit_length() > MAX_NUMBER_BITS:
        raise ValueError("number too large")
    return value


def _arithmetic_tokens(expr: str) -> list:
    """Numbers as Fractions and the characters + - * / ( ); anything else is a ValueError."""
    out, i = [], 0
    while i < len(expr):
        ch = expr[i]
        if ch in ASCII_WHITESPACE:
            i += 1
        elif ch in "+-*/()":
            out.append(ch)
            i += 1
        elif (match := _NUMBER.match(expr, i)) is not None:
            out.append(_bounded(Fraction(match.group())))
            i = match.end()
        else:
            raise ValueError(f"unexpected character {ch!r} at position {i}")
    return out


class _Parser:
    """Recursive descent:  sum := product (('+'|'-') product)*;  product := factor (('*'|'/') factor)*;
    factor := ('+'|'-')* (NUMBER | '(' sum ')').  Loops make + - * / left-associative."""

    def __init__(self, tokens: list):
        self.tokens, self.pos = tokens, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        if self.pos == len(self.tokens):
            raise ValueError("unexpected end of expression")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def sum(self, depth: int) -> Fraction:
        value = self.product(depth)
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.product(depth)
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    def product(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor(depth)
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def factor(self, depth: int) -> Fraction:
        sign = 1
        while self.peek() in ("+", "-"):  # unary signs in a loop, not recursion: "-----5" cannot go deep
            sign = -sign if self.take() == "-" else sign
        token = self.take()
        if isinstance(token, Fraction):
            return sign * token
        if token != "(":
            raise ValueError(f"expected a number or '(', got {token!r}")
        if depth >= MAX_PAREN_DEPTH:
            raise ValueError(f"parentheses nested deeper than {MAX_PAREN_DEPTH}")
        value = self.sum(depth + 1)
        if self.take() != ")":
            raise ValueError("expected ')'")
        return sign * value


def parse_arithmetic(expr: str) -> Fraction:
    """Exact value of + - * / ( ) arithmetic with the usual precedence; no eval of model text.

    Unary + and - are allowed (Python's eval, which the released scorer used, allows them); '**' and '//' are
    not. Bad syntax raises ValueError, division by zero ZeroDivisionError.

    >>> parse_arithmetic("83 - ((78 / 39) - 1)"), parse_arithmetic("(1/3) * 3"), parse_arithmetic("7 / 2")
    (Fraction(82, 1), Fraction(1, 1), Fraction(7, 2))
    """
    parser = _Parser(_arithmetic_tokens(expr))
    value = parser.sum(0)
    if parser.peek() is not None:
        raise ValueError(f"unexpected {parser.peek()!r} after the expression")
    return value


def _is_correct(answer: str, nums: list[int], target: int) -> bool:
    """Cheap checks first (length, characters, numbers used), exact arithmetic last."""
    if len(answer) > MAX_ANSWER_CHARS or not set(answer) <= ANSWER_CHARS:
        return False
    if sorted(int(x) for x in re.findall(r"[0-9]+", answer)) != sorted(int(x) for x in nums):
        return False  # each given number exactly once; checked before parsing so the values stay small
    return abs(parse_arithmetic(answer) - int(target)) < Fraction(1, 100_000)


def countdown_reward(text: str, nums: list[int], target: int) -> float:
    """Released three-level reward of prompt + completion: 1.0 right, 0.1 extracted but wrong or invalid,
    0.0 nothing extracted (see extract_answer).

    >>> q = countdown_question([3, 4], 12)
    >>> [countdown_reward(q + c, [3, 4], 12)
    ...  for c in ("\\n<answer> 3*4 </answer>", "<answer>4*4</answer>", "12")]
    [1.0, 0.1, 0.0]
    """
    if not isinstance(text, str):
        return REWARD_NONE
    answer = extract_answer(text)
    if answer is None:
        return REWARD_NONE
    try:
        return REWARD_CORRECT if _is_correct(answer, nums, target) else REWARD_WRONG
    except (ValueError, ArithmeticError):  # bad syntax, division by zero, too-large numbers: all just wrong
        return REWARD_WRONG


# ----------------------------------------------------------------------------------------------------------
# Knights and Knaves: the released grammar and prompt, a brute-force solver, a generator, a deduction trace
# ----------------------------------------------------------------------------------------------------------
# A statement is a tuple of the released grammar: ('telling-truth', i) "person i is a knight", ('lying', i)
# "person i is a knave", ('not', s), and ('and' | 'or' | '->' | '<=>', s, t). Released puzzles use one
# connective at most, over leaves; a puzzle's `statements` field is the repr of one statement per person.

KK_TEMPLATE = (  # the released prompt around a puzzle (its frame is the countdown one)
    CONVERSATION + "User: A very special island is inhabited only by knights and knaves. Knights always tell "
    "the truth, and knaves always lie. {puzzle}So who is a knight and who is a knave? Show your work in "
    "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example <answer> (1) "
    "Zoey is a knight\n(2) Oliver is a knight\n(3)... </answer>.\n" + ASSISTANT_START)


KK_NAMES = (  # first names for generated puzzles; one word each, so "Name is a knight" parses
    "Ava", "Ben", "Chloe", "Daniel", "Emma", "Felix", "Grace", "Henry", "Isla", "Jack", "Kate", "Leo",
    "Mia", "Noah", "Olivia", "Peter", "Quinn", "Rose", "Sam", "Tara", "Uma", "Victor", "Wendy", "Xavier",
    "Yara", "Zoe", "Aaron", "Bella", "Caleb", "Diana", "Ethan", "Fiona", "George", "Hannah", "Ian", "Julia")


KK_SPEECH = (  # how a claim is introduced in a generated puzzle (the released data has a dozen such forms)
    '{name} said, "{claim}." ', '{name} stated, "{claim}". ', '"{claim}," {name} mentioned. ',
    'According to {name}, "{claim}". ', '{name} told you that {claim}. ', 'In {name}\'s words: "{claim}". ')


KK_KINDS = ("telling-truth", "lying", "not", "and", "or", "->", "<=>")  # the released grammar's tags


KK_CONNECTIVES = {"and": "{} and {}", "or": "{} or {}", "->": "If {} then {}", "<=>": "{} if and only if {}"}


KK_MAX_NESTING = 10  # deeper brackets in a `statements` field are refused unparsed (released: 3)


KK_PEOPLE = (2, 8)  # generated puzzles have this many inhabitants at most / at least (released: 3-7)


def kk_truth(statement: tuple, knights: tuple[bool, ...]) -> bool:
    """Truth of a statement when knights[i] says whether person i is a knight.

    >>> kk_truth(('->', ('lying', 0), ('telling-truth', 1)), (True, False))   # "if 0 is a knave then ..."
    True
    """
    kind = statement[0]
    if kind in ("telling-truth", "lying"):
        return knights[statement[1]] == (kind == "telling-truth")
    values = [kk_truth(s, knights) for s in statement[1:]]
    if kind == "not":
        return not values[0]
    if kind == "and":
        return all(values)
    if kind == "or":
        return any(values)
    if kind == "->":
        return not values[0] or values[1]
    if kind == "<=>":
        return values[0] == values[1]
    raise ValueError(f"unknown statement kind {kind!r}")


def solve_kk(statements: tuple) -> list[tuple[bool, ...]]:
    """Every assignment in which each knight's statement is true and each knave's false (brute force: 2^n).

    >>> solve_kk((('lying', 1), ('and', ('telling-truth', 0), ('telling-truth', 1))))
    [(True, False)]
    """
    n = len(statements)
    assignments = itertools.product((True, False), repeat=n)
    return [k for k in assignments if all(kk_truth(s, k) == k[i] for i, s in enumerate(statements))]


def kk_claim(statement: tuple, names: list[str]) -> str:
    """English for a statement of the released grammar, e.g. ('not', ('lying', 0)) -> 'Ava is not a knave'."""
    kind = statement[0]
    if kind in ("telling-truth", "lying"):
        return f"{names[statement[1]]} is a {'knight' if kind == 'telling-truth' else 'knave'}"
    if kind == "not" and statement[1][0] in ("telling-truth", "lying"):
        return kk_claim(statement[1], names).replace(" is a ", " is not a ", 1)
    flat = not {s[0] for s in statement[1:]} & set(KK_CONNECTIVES)   # no connective inside a connective
    if kind in KK_CONNECTIVES and len(statement) == 3 and flat:
        return KK_CONNECTIVES[kind].format(*(kk_claim(s, names) for s in statement[1:]))
    raise ValueError(f"statement {statement!r} is outside the released grammar (one connective, no nesting)")


def english_list(items: list[str]) -> str:
    """'A', 'A and B', 'A, B, and C' (the released lists use the serial comma)."""
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def kk_solution_text(names: list[str], knights: tuple[bool, ...]) -> str:
    """The released answer format: '(1) Ava is a knight\\n(2) Ben is a knave'."""
    return "\n".join(f"({i + 1}) {name} is a {'knight' if k else 'knave'}"
                     for i, (name, k) in enumerate(zip(names, knights)))


def kk_question(names: list[str], statements: tuple, speech: list[int]) -> str:
    """The released prompt for a puzzle; speech[i] picks how person i's claim is introduced (KK_SPEECH)."""
    said = "".join(KK_SPEECH[form].format(name=name, claim=kk_claim(s, names))
                   for name, s, form in zip(names, statements, speech))
    puzzle = f"You meet {len(names)} inhabitants: {english_list(list(names))}. {said}"
    return KK_TEMPLATE.format(puzzle=puzzle)


def kk_mentioned(statement: tuple) -> list[int]:
    """People a statement names, in order of mention (repeats kept)."""
    if statement[0] in ("telling-truth", "lying"):
        return [statement[1]]
    return [i for s in statement[1:] for i in kk_mentioned(s)]


@dataclasses.dataclass
class _Deduction:
    """State of the released-style depth-first search that kk_trace writes out, one person at a time."""
    statements: tuple
    names: list[str]
    value: dict = dataclasses.field(default_factory=dict)      # person -> knight? for those assumed so far
    order: list = dataclasses.field(default_factory=list)      # people in the order they were assumed
    fragments: list = dataclasses.field(default_factory=list)  # the trace
    exhausted: list = dataclasses.field(default_factory=list)  # people given up since the last "go back"

    def fits(self, speaker: int) -> bool:
        """Whether some choice for the unassumed people a speaker names makes their claim fit their role."""
        free = sorted({i for i in kk_mentioned(self.statements[speaker]) if i not in self.value})
        return any(kk_truth(self.statements[speaker], {**self.value, **dict(zip(free, choice))})
                   == self.value[speaker] for choice in itertools.product((True, False), repeat=len(free)))

    def next_person(self) -> int:
        """The first unassumed person named by the latest assumed claims (back to the first), else the lowest
        index: the search follows the claims, as the released traces do."""
        for q in reversed(self.order):
            for i in kk_mentioned(self.statements[q]):
                if i not in self.value:
                    return i
        return min(i for i in range(len(self.names)) if i not in self.value)

    def claim(self, speaker: int) -> str:
        """'claim that ...' ('false claim that ...' for a knave's claim), as the traces quote it."""
        false = "" if self.value[speaker] else "false "
        return f"{false}claim that {kk_claim(self.statements[speaker], self.names)}"

    def search(self) -> bool:
        """Assume each role of the next person in turn (knight first); True once everyone is assumed."""
        if len(self.order) == len(self.names):
            return True
        p = self.next_person()
        name = self.names[p]
        for knight in (True, False):
            role = "knight" if knight else "knave"
            self.value[p] = knight
            blocker = next((s for s in sorted(self.value) if not self.fits(s)), None)   # in puzzle order
            if blocker is not None:
                whose = "their own" if blocker == p else self.names[blocker]
                claim = self.claim(blocker).replace("claim that", f"claim of {whose} that", 1)
                self.fragments.append(f"{name} cannot be a {role}, because this would contradict the "
                                      f"{claim}.\n")
                continue
            self.fragments += [f"Assume {name} is a {role}. ",
                               f"No contradiction is found in their {self.claim(p)}.\n"]
            self.order.append(p)
            if self.search():
                return True
            self.order.pop()
            if knight and self.exhausted:   # a deeper person ran out of roles: come back to this one
                given_up = english_list(self.exhausted)
                self.fragments.append(f"We have exhausted all possibilities for {given_up}, so let us go "
                                      f"back and reconsider {name}.\n")
                self.exhausted = []
        del self.value[p]
        self.exhausted.append(self.names[p])
        return False


def kk_trace(statements: tuple, names: list[str]) -> list[str]:
    """Hint fragments in the released style: assumptions, "No contradiction is found ...", "... cannot be a
    knight, because ...", "We have exhausted all possibilities for ...", then "Therefore, (1) ..." one line a
    fragment. The puzzle must have exactly one solution (the search ends on it).

    >>> puzzle = (('lying', 1), ('and', ('telling-truth', 0), ('telling-truth', 1)))   # Ava: "Ben is a knave"
    >>> for f in kk_trace(puzzle, ["Ava", "Ben"]):
    ...     print(repr(f))
    'Assume Ava is a knight. '
    'No contradiction is found in their claim that Ben is a knave.\\n'
    'Ben cannot be a knight, because this would contradict the claim of Ava that Ben is a knave.\\n'
    'Assume Ben is a knave. '
    'No contradiction is found in their false claim that Ava is a knight and Ben is a knight.\\n'
    'Therefore, (1) Ava is a knight\\n'
    '(2) Ben is a knave'
    """
    solutions = solve_kk(statements)
    if len(solutions) != 1:
        raise ValueError(f"kk_trace: the puzzle has {len(solutions)} solutions, not one")
    deduction = _Deduction(tuple(statements), list(names))
    deduction.search()
    lines = kk_solution_text(names, solutions[0]).split("\n")
    lines[0] = "Therefore, " + lines[0]
    return deduction.fragments + [line + "\n" for line in lines[:-1]] + lines[-1:]


# --- K&K rows, generation, splits, file rows, reward ---------------------------------------------------

def random_kk_statement(rng: random.Random, n: int) -> tuple:
    """One claim of the released grammar among n people: a leaf, 'not' of a leaf, or a connective over two
    leaves, each of these six shapes equally likely (about the released mix)."""
    def leaf():
        return (rng.choice(("telling-truth", "lying")), rng.randrange(n))
    shape = rng.choice(("leaf", "not", "and", "or", "->", "<=>"))
    if shape == "leaf":
        return leaf()
    return ("not", leaf()) if shape == "not" else (shape, leaf(), leaf())


def is_kk_heldout(statements: tuple) -> bool:
    """Whether a puzzle is on the test side of every split: 1 in HELDOUT_BUCKETS by a stable hash of its
    statements (names and wording do not make a new puzzle)."""
    return zlib.crc32(repr(tuple(statements)).encode()) % HELDOUT_BUCKETS == 0


def make_kk_row(names: list[str], statements: tuple, speech: list[int]) -> dict:
    """A row of the released schema (ground truth flattened to `ground_truth`) for a one-solution puzzle."""
    (knights,) = solve_kk(statements)
    hint, text = kk_trace(statements, names), kk_solution_text(names, knights)
    return {"question": kk_question(names, statements, speech), "hint": hint,
            "answer": "".join(hint) + " </think>\n<answer> " + text + " </answer>", "data_source": KK_SOURCE,
            "ground_truth": {"names": list(names), "solution": list(knights), "solution_text_format": text,
                             "statements": repr(tuple(statements))}}


def generate_kk(n: int, seed: int, min_people: int = 3, max_people: int = 7,
                heldout: bool | None = None) -> list[dict]:
    """n distinct puzzles with exactly one solution each; the same seed gives the same rows.

    Draw min_people..max_people people and one random claim each (random_kk_statement); keep the puzzle when
    the brute-force solver finds exactly one solution. heldout as in generate_countdown.
    """
    if not KK_PEOPLE[0] <= min_people <= max_people <= KK_PEOPLE[1]:
        raise ValueError(f"need {KK_PEOPLE[0]} <= min_people <= max_people <= {KK_PEOPLE[1]}, "
                         f"got {min_people}, {max_people}")
    rng, rows, seen = random.Random(seed), [], set()
    for _ in range(1_000 * n + 1_000):  # a cap so an impossible request fails instead of looping forever
        if len(rows) == n:
            break
        people = rng.randint(min_people, max_people)
        statements = tuple(random_kk_statement(rng, people) for _ in range(people))
        if statements in seen or (heldout is not None and is_kk_heldout(statements) != heldout):
            continue
        if len(solve_kk(statements)) == 1:
            seen.add(statements)
            names = rng.sample(KK_NAMES, people)
            rows.append(make_kk_row(names, statements, [rng.randrange(len(KK_SPEECH)) for _ in names]))
    if len(rows) < n:
        raise ValueError(f"found only {len(rows)} distinct puzzles of {n} "
                         f"with {min_people}-{max_people} people")
    return rows


def kk_split(num_train: int, num_test: int, seed: int, min_people: int = 3,
             max_people: int = 7) -> tuple[list[dict], list[dict]]:
    """(train, test) puzzles, disjoint by construction (held-out puzzles only on the test side)."""
    test = generate_kk(num_test, seed, min_people, max_people, heldout=True)
    train = generate_kk(num_train, seed + 1, min_people, max_people, heldout=False)
    return train, test


def bracket_depth(text: str) -> int:
    """How deep ( [ { nest in a text, e.g. 2 for "((a), b)" (brackets inside quotes count too)."""
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest


def parse_kk_statements(text: str, n: int) -> tuple:
    """The `statements` field (a Python literal of tuples) checked against the grammar and n people. Brackets
    nested deeper than KK_MAX_NESTING are refused before parsing: Python's parser runs out of memory on a few
    thousand (MemoryError).

    >>> parse_kk_statements("(('lying', 1), ('not', ('telling-truth', 0)))", 2)
    (('lying', 1), ('not', ('telling-truth', 0)))
    """
    if not isinstance(text, str) or len(text) >= 100_000 or bracket_depth(text) > KK_MAX_NESTING:
        raise ValueError(f"statements must be a string under 100,000 characters, brackets nested at most "
                         f"{KK_MAX_NESTING} deep")
    value = ast.literal_eval(text)   # literals only: never code

    def check(s) -> bool:
        if not isinstance(s, tuple) or not s or s[0] not in KK_KINDS:
            return False
        if s[0] in ("telling-truth", "lying"):
            return len(s) == 2 and type(s[1]) is int and 0 <= s[1] < n
        return len(s) == (2 if s[0] == "not" else 3) and all(check(x) for x in s[1:])
    if not isinstance(value, tuple) or len(value) != n or not all(check(s) for s in value):
        raise ValueError(f"not {n} statements of the released grammar")
    return value


def kk_name_problem(names: list[str]) -> str | None:
    """Why the released K&K scorer could not score a puzzle with these names, or None when it can. The
    released scorer reads each name back from the solution text as the first word of ASCII letters on its
    line, and counts "knight" + "knave" in an answer; so a name must be one such word (no accents, spaces or
    brackets), two names must differ even ignoring case (the name patterns are case-insensitive), and no name
    may contain "knight" or "knave".

    >>> kk_name_problem(["Ava", "Ben"]), kk_name_problem(["Zoë"]), kk_name_problem(["Ava", "AVA"])
    (None, "'Zoë' is not one word of ASCII letters", "'AVA' repeats a name (ignoring case)")
    """
    seen = set()
    for name in names:
        if not re.fullmatch(r"[A-Za-z]+", name):
            return f"{name!r} is not one word of ASCII letters"
        if "knight" in name.lower() or "knave" in name.lower():
            return f"{name!r} contains 'knight' or 'knave' (the answer's role count would be off)"
        if name.lower() in seen:
            return f"{name!r} repeats a name (ignoring case)"
        seen.add(name.lower())
    return None


def validate_kk_row(row: dict, index: int, source: str) -> dict:
    """question, hint, answer, data_source and the released ground truth of one K&K row, checked: the
    statements parse (nested at most KK_MAX_NESTING deep), the names can be scored (kk_name_problem), and
    solution_text_format is the released text of names and solution."""
    out = _text_fields(row, index, source)
    gt = _ground_truth(row, index, source)
    try:
        names, solution = _as_list(gt["names"]), [bool(x) for x in _as_list(gt["solution"])]
        if not names or not all(isinstance(x, str) for x in names) or len(solution) != len(names):
            raise ValueError("names and solution must be lists of the same length")
        parse_kk_statements(gt["statements"], len(names))
        text = gt["solution_text_format"]
    except (TypeError, KeyError, ValueError, SyntaxError) as e:
        raise ValueError(f"{source}: row {index} (counting from 0): field 'ground_truth' is not the released "
                         f"K&K one (names, solution, solution_text_format, statements): {e}") from None
    if (problem := kk_name_problem(names)) is not None:
        raise _row_error(source, index, "ground_truth.names", f"cannot be scored by the released rule: {problem}")
    if text != kk_solution_text(names, solution):
        raise _row_error(source, index, "ground_truth.solution_text_format",
                         f"must be the released text of names and solution, {kk_solution_text(names, solution)!r}")
    return {**out, "data_source": row.get("data_source") or KK_SOURCE,
            "ground_truth": {"names": names, "solution": solution, "solution_text_format": text,
                             "statements": gt["statements"]}}


def parse_kk_answer(answer: str, names: list[str]) -> list[str] | None:
    """Each name's role word, lower-cased, from the first "<name> is a knight|knave" in the answer (whole
    words, any whitespace, case-insensitive as Python's re folds unicode: the Kelvin sign matches k, the long
    s matches s, the dotless i matches i); None if a name has none (the released rule).

    >>> parse_kk_answer("Ava is a knave. ava IS A KNIGHT. Ben\\tis a\\xa0knight", ["Ava", "Ben"])
    ['knave', 'knight']
    """
    roles = []
    for name in names:
        found = re.search(rf"\b{re.escape(name)}\b\s+is\s+a\s+\b(knight|knave)\b", answer, re.IGNORECASE)
        if found is None:
            return None
        roles.append(found.group(1).lower())
    return roles


def kk_reward(text: str, ground_truth: dict) -> float:
    """Released three-level K&K reward of prompt + completion: 1.0 when every inhabitant's role is the
    solution's, 0.1 when an answer is extracted but fails, 0.0 when none is.

    The answer is the last <answer>...</answer> block of the assistant part (assistant_part, last_answer_tag;
    it may span lines); an empty or blank block is no answer. It fails unless "knight" + "knave" occur in it
    (str.lower(), anywhere, plural words and notes included) exactly once per inhabitant, and each name's
    first "<name> is a knight|knave" (parse_kk_answer) gives the solution's role.
    >>> gt = {"names": ["Ava", "Ben"], "solution": [True, False]}
    >>> right = "<answer> (1) Ava is a knight\\n(2) Ben is a knave </answer>"
    >>> [kk_reward("Assistant: " + c, gt) for c in (right, right.replace("</", "(knights lie) </"),
    ...                                           "<answer> </answer>", "Ava is a knight")]
    [1.0, 0.1, 0.0, 0.0]
    """
    part = assistant_part(text)
    answer = last_answer_tag(part) if part is not None else None
    if not answer:                  # None, or a block that is empty once stripped
        return REWARD_NONE
    lowered, names = answer.lower(), list(ground_truth["names"])
    if lowered.count("knight") + lowered.count("knave") != len(names):
        return REWARD_WRONG
    expected = ["knight" if x else "knave" for x in ground_truth["solution"]]
    return REWARD_CORRECT if parse_kk_answer(answer, names) == expected else REWARD_WRONG

# ----------------------------------------------------------------------------------------------------------
# MATH: rows of the released schema, the standard (Hendrycks) answer normalisation, the released reward
# ----------------------------------------------------------------------------------------------------------

def _fix_fracs(s: str) -> str:
    r"""Brace one-character \frac arguments: \frac12 -> \frac{1}{2}, \frac1{b} -> \frac{1}{b}; a \frac with
    one character after it leaves the whole string as it was, a \frac with none is a ValueError."""
    head, *parts = s.split("\\frac")
    out = [head]
    for part in parts:
        if not part:
            raise ValueError("\\frac without an argument")
        if part.startswith("{"):
            out.append(part)
        elif len(part) < 2:
            return s
        elif part[1] == "{":
            out.append("{" + part[0] + "}" + part[1:])
        else:
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
    return "\\frac".join(out)


def _fix_sqrt(s: str) -> str:
    r"""Brace a one-character \sqrt argument: \sqrt2 -> \sqrt{2}; a trailing \sqrt is a ValueError."""
    head, *parts = s.split("\\sqrt")
    if any(not part for part in parts):
        raise ValueError("\\sqrt without an argument")
    return "\\sqrt".join([head] + [p if p.startswith("{") else "{" + p[0] + "}" + p[1:] for p in parts])


def _fix_a_slash_b(s: str) -> str:
    r"""a/b -> \frac{a}{b} when the string is two integers written as Python prints them ('1/2'); a string with
    one '/' whose sides are not both Python int() literals ('x/2', '/2') is a ValueError, as in the standard
    code (so math_equal compares the raw strings); '01/2' or '1/ 2' stay as they are.

    >>> _fix_a_slash_b("-1/2"), _fix_a_slash_b("01/2"), _fix_a_slash_b("1/2/3")
    ('\\frac{-1}{2}', '01/2', '1/2/3')
    """
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    try:
        x, y = int(a), int(b)   # Python's int(): sign, spaces, '_' between digits, any unicode digit
    except ValueError:
        raise ValueError(f"{s!r} is not a/b of integers") from None
    return "\\frac{" + str(x) + "}{" + str(y) + "}" if s == f"{x}/{y}" else s


def _remove_right_units(s: str) -> str:
    r"""Drop the units after '\text{ ' (with its space): '5 \text{ cm}' -> '5 '; two of them: ValueError."""
    if "\\text{ " not in s:
        return s
    left, *rest = s.split("\\text{ ")
    if len(rest) != 1:
        raise ValueError("more than one '\\text{ '")
    return left


def normalize_math_answer(s: str) -> str:
    r"""The MATH normalisation of the released scorer (the standard Hendrycks one), these rules in this order
    and no others: drop newlines; drop \!; \\ -> \; tfrac, dfrac -> frac; drop \left, \right, ^{\circ},
    ^\circ, \$; right units after '\text{ '; drop \%; ' .' -> ' 0.', '{.' -> '{0.', a leading '.' -> '0.';
    'x = 5' -> ' 5' (one '=' and at most 2 characters before it); \sqrt2 -> \sqrt{2}; drop spaces;
    \frac12 -> \frac{1}{2}; '0.5' -> \frac{1}{2}; a/b -> \frac{a}{b}.
    ValueError where the standard code fails (two '\text{ ', a \sqrt or \frac with nothing after it, one '/'
    between things that are not integers); math_equal then compares the raw strings.

    >>> normalize_math_answer("x = \\dfrac12"), normalize_math_answer("\\left( 3, .5 \\right)")
    ('\\frac{1}{2}', '(3,0.5)')
    """
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = _remove_right_units(s).replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    return _fix_a_slash_b("\\frac{1}{2}" if s == "0.5" else s)


def math_equal(answer: str, target: str) -> bool:
    """Equal after normalize_math_answer, or, where it fails on either, equal as given."""
    try:
        return normalize_math_answer(answer) == normalize_math_answer(target)
    except ValueError:
        return answer == target


def math_reward(text: str, target: str) -> float:
    r"""Released three-level MATH reward of prompt + completion: 1.0 when the answer (extract_answer: the last
    <answer>...</answer> on the last line of the assistant part) equals the target under math_equal, 0.1 when an
    answer is extracted but differs, 0.0 when none is.

    >>> q = "User: 1/2 + 1/4? Assistant: <think> "
    >>> [math_reward(q + c, "\\frac{3}{4}")
    ...  for c in (" </think>\n<answer> \\dfrac34 </answer>", "<answer> 3/5 </answer>", "")]
    [1.0, 0.1, 0.0]
    """
    answer = extract_answer(text) if isinstance(text, str) else None
    if answer is None:
        return REWARD_NONE
    return REWARD_CORRECT if math_equal(answer, str(target)) else REWARD_WRONG


def math_level(level) -> int | None:
    """The number of a released level ('Level 3' -> 3; an int stays); None when there is none."""
    found = re.fullmatch(r"(?:Level )?([0-9]+)", str(level).strip()) if level is not None else None
    return int(found.group(1)) if found else None


def validate_math_row(row: dict, index: int, source: str) -> dict:
    """question, hint, answer, data_source, target (reward_model.ground_truth.target, or a `target` column),
    level and type of one MATH row, checked. MATH500, Minerva, OlympiadBench rows are MATH rows (as released)."""
    out = _text_fields(row, index, source)
    target = _truth_field(row, index, source, "target")
    if not isinstance(target, str):
        raise _row_error(source, index, "target", f"(reward_model.ground_truth.target) must be a string, "
                                                   f"got {target!r}")
    return {**out, "data_source": row.get("data_source") or MATH_SOURCES[0], "target": target,
            "level": math_level(row.get("level")), "type": row.get("type")}


# ----------------------------------------------------------------------------------------------------------
# Numeric answers (GSM8K, AIME, AMC): the released rule, a number equal to the target within 1e-5
# ----------------------------------------------------------------------------------------------------------

def numeric_reward(text: str, target) -> float:
    """Released three-level reward of the numeric sources: the answer is extracted as for countdown
    (extract_answer); 1.0 when Python's float() of it is within 1e-5 of float(target), 0.1 when it is another
    number or not one ('1,000', '3/4'), 0.0 when there is none.

    >>> q = "User: 6 * 7? Assistant: <think> "
    >>> [numeric_reward(q + c, "42") for c in ("<answer> 42.0 </answer>", "<answer> 4_2 </answer>",
    ...                                          "<answer> 41 </answer>", "<answer> forty-two </answer>", "")]
    [1.0, 1.0, 0.1, 0.1, 0.0]
    """
    answer = extract_answer(text) if isinstance(text, str) else None
    if answer is None:
        return REWARD_NONE
    try:
        value = float(answer)   # Python's float: '1e3', '4_2', ' 7 ', 'inf' and unicode digits are numbers
    except ValueError:
        return REWARD_WRONG
    return REWARD_CORRECT if abs(value - float(target)) < 1e-5 else REWARD_WRONG


def numeric_target(value) -> float | None:
    """float() of a target (a number or a numeric string) when it is finite; None otherwise.

    >>> numeric_target("18"), numeric_target(2.5), numeric_target("1,000"), numeric_target(True)
    (18.0, 2.5, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or \
            (isinstance(value, str) and len(value) > 1_000):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def validate_numeric_row(row: dict, index: int, source: str) -> dict:
    """question, hint, answer, data_source and target (reward_model.ground_truth.target, or a `target`
    column) of one GSM8K / AIME / AMC row; the target must be a finite number or numeric string."""
    out = _text_fields(row, index, source)
    target = _truth_field(row, index, source, "target")
    if numeric_target(target) is None:
        raise _row_error(source, index, "target", f"(reward_model.ground_truth.target) must be a number or a "
                                                   f"numeric string, got {target!r}")
    return {**out, "data_source": row.get("data_source") or NUMERIC_SOURCES[0], "target": target}

# ----------------------------------------------------------------------------------------------------------
# Search tree: the setting of the paper's sample-complexity theorem, one rewarded leaf among B^H
# ----------------------------------------------------------------------------------------------------------
# A tree id names a B-ary tree of height H with one secret root-to-leaf path. The prompt gives the id, H and
# the B choices; the answer names one choice per level (one hint fragment each), then " .". Nothing in the
# prompt reveals the path: only reward (RL) or the path itself (SFT, hints) can teach it, so finding it by
# sampling costs about B^H rollouts per tree, which is what the theorem says hints avoid.

TREE_LETTERS = "abcdefgh"  # the choices at every level: the first B letters


TREE_IDS = {"test": (0, 500), "validation": (500, 1000), "warmup": (1000, 100_000)}  # disjoint id ranges


def tree_question(tree_id: int, B: int, H: int) -> str:
    """The prompt: the tree's id, its height and its choices.

    >>> tree_question(7, 3, 4)
    'Path 7 (4 steps, choices a b c):'
    """
    return f"Path {tree_id} ({H} steps, choices {' '.join(TREE_LETTERS[:B])}):"


def tree_path(tree_id: int, B: int, H: int) -> str:
    """The secret path of a tree: H letters among the first B, a stable function of (id, B, H).

    >>> tree_path(7, 3, 4), tree_path(7, 3, 4) == tree_path(7, 3, 4), len(tree_path(8, 2, 10))
    ('aaba', True, 10)
    """
    rng = random.Random(zlib.crc32(f"tree:{tree_id}:{B}:{H}".encode()))
    return "".join(rng.choice(TREE_LETTERS[:B]) for _ in range(H))


def make_tree_row(tree_id: int, B: int, path: str) -> dict:
    """A row of the released schema: one hint fragment per choice, the answer ends with " ."

    >>> row = make_tree_row(7, 3, "caaa")
    >>> row["question"], row["hint"], row["answer"]
    ('Path 7 (4 steps, choices a b c):', [' c', ' a', ' a', ' a'], ' c a a a .')
    """
    fragments = [f" {c}" for c in path]
    return {"question": tree_question(tree_id, B, len(path)), "hint": fragments,
            "answer": "".join(fragments) + " .", "data_source": TREE_SOURCE,
            "ground_truth": {"tree_id": tree_id, "branching": B, "path": path}}


def tree_ids(num: int, seed: int, which: str = "test") -> list[int]:
    """`num` distinct ids from one id range (TREE_IDS), drawn by `seed`: a seed is a set of trees."""
    lo, hi = TREE_IDS[which]
    return random.Random(seed).sample(range(lo, hi), num)


def generate_trees(num: int, seed: int, B: int, H: int, which: str = "test") -> list[dict]:
    """Rows of `num` trees with their own secret paths (tree_path)."""
    return [make_tree_row(i, B, tree_path(i, B, H)) for i in tree_ids(num, seed, which)]


def tree_warmup_rows(num: int, seed: int, B_range=(2, 3), H_range=(1, 10)) -> list[dict]:
    """Rows that teach the format and nothing about any path: warm-up ids (never trained or evaluated on),
    random B and H, and a uniformly random path per row (an id that repeats gets another path), so a model
    fit to them answers an unseen id with each choice equally likely."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        B, H = rng.randint(*B_range), rng.randint(*H_range)
        path = "".join(rng.choice(TREE_LETTERS[:B]) for _ in range(H))
        rows.append(make_tree_row(rng.randrange(*TREE_IDS["warmup"]), B, path))
    return rows


def tree_split(num_train: int, num_test: int, seed: int, B: int = 3, H: int = 4,
               which: str = "test") -> tuple[list[dict], list[dict]]:
    """(train, test) = the same num_train trees: the task is to find each tree's path, not to generalise
    (no prompt says anything about another tree's path). num_test is ignored."""
    rows = generate_trees(num_train, seed, B, H, which)
    return rows, rows


def tree_reward(text: str, ground_truth: dict) -> float:
    """1.0 for the secret path, 0.1 for a well-formed wrong path (H choices among the B, then "."), else 0.

    `text` is prompt + completion; the answer is what follows the prompt's closing "):" (in a chat template:
    the assistant's turn, assistant_part).
    >>> gt = {"tree_id": 7, "branching": 3, "path": "caaa"}
    >>> [tree_reward("Path 7 (4 steps, choices a b c):" + a, gt) for a in (" c a a a .", " a a a a .", " c a")]
    [1.0, 0.1, 0.0]
    """
    turn = assistant_part(text)
    _, sep, answer = ("", "):", turn) if turn is not None else text.partition("):")
    words = answer.split()
    path, B = ground_truth["path"], ground_truth["branching"]
    if not sep or words[-1:] != ["."] or len(words) != len(path) + 1:
        return REWARD_NONE
    if any(w not in TREE_LETTERS[:B] or len(w) != 1 for w in words[:-1]):
        return REWARD_NONE
    return REWARD_CORRECT if "".join(words[:-1]) == path else REWARD_WRONG


def validate_tree_row(row: dict, index: int, source: str) -> dict:
    """A file row of the tree task: question, hint, answer and ground_truth (tree_id, branching, path)."""
    fields = _text_fields(row, index, source)
    truth = row.get("ground_truth")
    if not isinstance(truth, dict) or not {"tree_id", "branching", "path"} <= set(truth):
        raise _row_error(source, index, "ground_truth", "must hold tree_id, branching and path")
    B = _as_int(truth["branching"])
    if B is None or not 2 <= B <= len(TREE_LETTERS):
        raise _row_error(source, index, "ground_truth.branching", f"must be 2..{len(TREE_LETTERS)}")
    if not isinstance(truth["path"], str) or not truth["path"] or set(truth["path"]) - set(TREE_LETTERS[:B]):
        raise _row_error(source, index, "ground_truth.path", f"must be letters among {TREE_LETTERS[:B]!r}")
    return {**fields, "data_source": TREE_SOURCE,
            "ground_truth": {"tree_id": truth["tree_id"], "branching": B, "path": truth["path"]}}


# ----------------------------------------------------------------------------------------------------------
# Supervised rows (sft_go.py): {prompt, response} from any source read_records reads, Alpaca records included
# ----------------------------------------------------------------------------------------------------------

PROMPT_KEYS = ("prompt", "question", "instruction")
RESPONSE_KEYS = ("response", "answer", "output", "completion")


def as_sft_row(record: dict) -> dict | None:
    """Add `prompt` and `response` to a record; None if it has no response text.

    Alpaca records (instruction, input, output) get a plain instruction/response template.
    >>> as_sft_row({"instruction": "Add.", "input": "2 3", "output": "5"})["prompt"]
    '### Instruction:\\nAdd.\\n\\n### Input:\\n2 3\\n\\n### Response:\\n'
    """
    response = next((record[k] for k in RESPONSE_KEYS if isinstance(record.get(k), str)), None)
    if not response:
        return None
    if isinstance(record.get("instruction"), str) and _missing(record.get("prompt")) \
            and _missing(record.get("question")):
        extra = f"### Input:\n{record['input']}\n\n" if record.get("input") else ""
        prompt = f"### Instruction:\n{record['instruction']}\n\n{extra}### Response:\n"
    else:
        prompt = next((record[k] for k in PROMPT_KEYS if isinstance(record.get(k), str)), "")
    return {**record, "prompt": prompt, "response": response}


def conversation_rows(record: dict, where: str) -> list[dict]:
    """A LIMA-style record (`conversations`: alternating user, assistant, user, ... strings) -> one row per
    assistant turn, whose prompt is the whole conversation before it, so every assistant turn is trained on
    and none is ever a prompt-less fragment. `where` names the row in errors.
    >>> [r["response"] for r in conversation_rows({"conversations": ["Hi.", "Hello!", "Bye.", "Bye!"]}, "")]
    ['Hello!', 'Bye!']
    """
    turns = record["conversations"]
    if (not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2
            or not all(isinstance(t, str) and t.strip() for t in turns)):
        raise UserError(f"{where}: 'conversations' must be a list of non-empty strings alternating user and "
                        f"assistant turns, ending with an assistant turn")
    rows, context = [], ""
    for user, assistant in zip(turns[::2], turns[1::2]):
        context += f"### User:\n{user}\n\n### Assistant:\n"
        rows.append({**record, "prompt": context, "response": assistant})
        context += f"{assistant}\n\n"
    return rows


def load_sft_rows(path: str, split: str = "train", columns: dict[str, str] | None = None) -> list[dict]:
    """Rows of a file, save_to_disk folder or Hub dataset (read by `read_records`); a source that cannot be
    read, or a row without a response, is a UserError naming the source (and the row)."""
    try:
        records = read_records(path, split, columns)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    if all(not _missing(r.get("conversations")) for r in records):
        return [row for i, r in enumerate(records, 1) for row in conversation_rows(r, f"{path}: row {i}")]
    rows = [as_sft_row(r) for r in records]
    if None in rows:
        i = rows.index(None)
        raise UserError(f"{path}: row {i} (counting from 0) has no response text (need one of the columns "
                        f"{', '.join(RESPONSE_KEYS)} with a non-empty string); columns found: "
                        f"{', '.join(sorted(records[i])) or 'none'}")
    return rows


