"""Tasks for uft.py and sft_go.py in the released schema: prompts, generators, solvers, loaders, rewards.

A row is a dict with the released columns: `question` (raw prompt text), `hint` (the reference solution as
a list of fragments, one per reasoning step), `answer` (the full target: fragments + `</think>` + the answer
tag), plus what the task's reward needs (countdown: `nums`, `target`). A `Task` bundles what the trainer uses:
its reward, its row check for files, and its generator of (train, test) rows.

    >>> row = generate_countdown(1, seed=0, min_nums=3, max_nums=3)[0]
    >>> TASKS["countdown"].reward(row, row["question"] + row["answer"])
    1.0
"""
from __future__ import annotations

import dataclasses
import json
import operator
import random
import re
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Callable

from common import UserError, read_jsonl

# ----------------------------------------------------------------------------------------------------------
# Countdown: the released prompt, a solver, a generator, a loader, the released three-level reward
# ----------------------------------------------------------------------------------------------------------

COUNTDOWN_TEMPLATE = (  # the released prompt, raw text for base models; note the trailing space after <think>
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer.\n"
    "User: Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n<think> ")


FINAL_PREFIX = "Therefore, the final equation is "  # how the last hint fragment of the released data begins


NUM_RANGE = (1, 99)  # drawn uniformly from here (inclusive), repeats allowed, as in the released data


TARGET_RANGE = (10, 100)  # targets are picked among the reachable values in this range (inclusive)


HELDOUT_BUCKETS = 10  # 1 problem in 10 (stable hash of nums + target) may only appear in test splits


ROW_FIELDS = ("question", "hint", "answer", "nums", "target")  # the released columns the project uses


REWARD_CORRECT, REWARD_WRONG, REWARD_NONE = 1.0, 0.1, 0.0  # released: right / extracted but wrong / none


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


def generate_countdown(n: int, seed: int, min_nums: int = 3, max_nums: int = 4,
                       heldout: bool | None = None) -> list[dict]:
    """n distinct solvable problems with worked solutions; the same seed gives the same rows.

    Draw min_nums..max_nums numbers from NUM_RANGE, list the reachable targets in TARGET_RANGE, pick one
    uniformly. heldout=True keeps only held-out problems (see is_heldout), False only the others, None all.

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
        if countdown_key(nums, target) not in seen:
            seen.add(countdown_key(nums, target))
            rows.append(make_countdown_row(nums, target, solve_countdown(nums, target)))
    if len(rows) < n:
        raise ValueError(f"found only {len(rows)} distinct problems of {n} "
                         f"with {min_nums}-{max_nums} numbers")
    return rows


def countdown_split(num_train: int, num_test: int, seed: int, min_nums: int = 3,
                    max_nums: int = 4) -> tuple[list[dict], list[dict]]:
    """(train, test) rows, disjoint by construction: test problems are held-out ones, train problems are not.

    The test side does not depend on num_train (runs with different budgets are evaluated on the same
    problems); seed + 1 for the train side keeps the two from drawing the same numbers.
    """
    test = generate_countdown(num_test, seed, min_nums, max_nums, heldout=True)
    train = generate_countdown(num_train, seed + 1, min_nums, max_nums, heldout=False)
    return train, test


def countdown_validation(num_val: int, num_test: int, seed: int, min_nums: int = 3,
                         max_nums: int = 4) -> list[dict]:
    """Held-out problems for choosing settings, disjoint from countdown_split's test (and train) rows.

    They are the next num_val problems of the test side's stream, so the test rows stay what they were.
    """
    return generate_countdown(num_test + num_val, seed, min_nums, max_nums, heldout=True)[num_test:]



# --- loading files of the released schema --------------------------------------------------------

def _as_int(x) -> int | None:
    """int for ints, numpy integers and integral floats; None for anything else (bools and strings too)."""
    if isinstance(x, float):
        return int(x) if x.is_integer() else None
    try:
        return None if isinstance(x, bool) else operator.index(x)
    except TypeError:
        return None


def _as_list(x) -> list | None:
    """A Python list from a list, tuple or numpy array (parquet read by pandas gives arrays); else None."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (str, bytes)) else None


def validate_task_row(row: dict, index: int, source: str) -> dict:
    """The five fields of one row, checked and converted; a ValueError names the source, row and field."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{source}: row {index} (counting from 0): field '{field}' {why}")

    for field in ROW_FIELDS:
        if row.get(field) is None:
            raise bad(field, "is missing")
    for field in ("question", "answer"):
        if not isinstance(row[field], str):
            raise bad(field, f"must be a string, got {type(row[field]).__name__}")
    hint = _as_list(row["hint"])
    if not hint or not all(isinstance(h, str) for h in hint):
        raise bad("hint", "must be a non-empty list of strings")
    nums = [_as_int(x) for x in _as_list(row["nums"]) or []]
    if not nums or None in nums:
        raise bad("nums", "must be a non-empty list of integers")
    target = _as_int(row["target"])
    if target is None:
        raise bad("target", f"must be an integer, got {row['target']!r}")
    return {"question": row["question"], "hint": hint, "answer": row["answer"], "nums": nums,
            "target": target}


def load_task_rows(path_or_name: str, split: str = "train", num_train: int = 10_240, num_test: int = 1_024,
                   seed: int = 0) -> list[dict]:
    """Rows {question, hint, answer, nums, target}: generated ('countdown') or read (.parquet/.jsonl/.json).

    split, num_train, num_test, seed: 'countdown' only (a file is one split). Extra columns are dropped.

    >>> load_task_rows("countdown_test.parquet")[0]["nums"]   # a released file   # doctest: +SKIP
    [47, 76, 55, 60]
    """
    if str(path_or_name) == "countdown":
        train, test = countdown_split(num_train, num_test, seed)
        return {"train": train, "test": test}[split]
    path = Path(path_or_name)
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unknown data format; "
                         "give a .parquet, .jsonl or .json file, or 'countdown'")
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    import datasets                       # imported here: it costs a second at `import uft`

    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets/pyarrow raise many types for a corrupt file; one clear message instead
        raise ValueError(f"{path}: could not be read as {builder}: {e}") from e
    return [validate_task_row(row, i, str(path)) for i, row in enumerate(table)]



# --- reward ------------------------------------------------------------------------------------------

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


def extract_answer(text: str) -> str | None:
    """The released extraction, in linear time: after the first "Assistant:" (the prompt has exactly one), the
    last line, the last <answer>...</answer> on it, stripped; None if absent. So an answer followed by a
    newline is not extracted, as in the released scorer.

    >>> extract_answer("Assistant: Let me solve this.\\n<think> 3 * 4 = 12 </think>"
    ...                "\\n<answer> 3 * 4 </answer>")
    '3 * 4'
    """
    start = text.find("Assistant:")
    if start < 0:
        return None
    line = text[max(start + len("Assistant:"), text.rfind("\n") + 1):]
    found, pos = None, 0
    # the matches of re.finditer(r"<answer>(.*?)</answer>")
    while (opened := line.find("<answer>", pos)) >= 0:
        closed = line.find("</answer>", opened + len("<answer>"))
        if closed < 0:
            break
        found, pos = line[opened + len("<answer>"):closed], closed + len("</answer>")
    return None if found is None else found.strip()


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
        return list(hint) + [answer[len("".join(hint)):]]
    return [answer]


def answer_token_ids(row: dict, encode) -> list[int]:
    """Token ids of the answer, piece by piece (`answer_pieces`): every hint's tokens are a prefix of them."""
    return [t for piece in answer_pieces(row) for t in encode(piece)]


# ----------------------------------------------------------------------------------------------------------
# Supervised rows (sft_go.py): {prompt, response} from JSONL/JSON/parquet files, Alpaca records included
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
    if "instruction" in record and "prompt" not in record and "question" not in record:
        extra = f"### Input:\n{record['input']}\n\n" if record.get("input") else ""
        prompt = f"### Instruction:\n{record['instruction']}\n\n{extra}### Response:\n"
    else:
        prompt = next((record[k] for k in PROMPT_KEYS if isinstance(record.get(k), str)), "")
    return {**record, "prompt": prompt, "response": response}


def load_sft_rows(path: str) -> list[dict]:
    """Rows of a .jsonl, .json or .parquet file; a file without a response column is a UserError."""
    p = Path(path)
    if p.suffix == ".parquet":
        import datasets
        records = list(datasets.Dataset.from_parquet(str(p)))
    elif p.suffix == ".json":
        records = json.loads(p.read_text())
    else:
        records = read_jsonl(p)
    rows = [as_sft_row(r) for r in records]
    if not records or any(r is None for r in rows):
        found = ", ".join(sorted(records[0].keys())) if records else ""
        raise UserError(f"{path}: no response text (need one of the columns {', '.join(RESPONSE_KEYS)} "
                        f"with non-empty strings); columns found: {found or 'none (empty file)'}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# The task interface
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    """What training and evaluation need from a task."""
    name: str
    reward: Callable[[dict, str], float]              # (row, prompt + completion) -> 1.0 / 0.1 / 0.0
    check_row: Callable[[dict, int, str], dict]       # file row -> checked fields; ValueError names it
    split: Callable[..., tuple[list, list]]           # (num_train, num_test, seed, ...) -> generated rows


def _countdown_row_reward(row: dict, text: str) -> float:
    return countdown_reward(text, row["nums"], row["target"])


TASKS = {"countdown": Task("countdown", _countdown_row_reward, validate_task_row, countdown_split)}


def reward(row: dict, text: str, task: str = "countdown") -> float:
    """The reward of prompt + completion `text` under the row's task (its `data_source` when it names one)."""
    return TASKS[row.get("data_source") if row.get("data_source") in TASKS else task].reward(row, text)
