"""Seeded fuzzing of every reward and every data loader: thousands of hostile inputs, each answered with a
reward level or a one-line ValueError/UserError naming the file and row, never another exception, always fast."""
import json
import random
import time

import pytest

import tasks
from common import UserError

# Fragments that reach every branch of the parsers: tags, arithmetic, K&K roles, LaTeX, odd unicode
PIECES = ["<answer>", "</answer>", "<think>", "</think>", "Assistant:", "User:", " ", "\n", "\t", "(", ")", "+",
          "-", "*", "/", ".", "=", "0", "7", "19", "35", "44", "98", "1e9", "9" * 40, "**", "//", "%", "Ava", "Ben",
          " is a knight", " is a knave", "(1) ", "\\frac{1}{2}", "\\dfrac12", "\\boxed{", "}", "{", "x = ",
          "\\sqrt2", "\\left(", "\\right)", "^", "\\text{ cm}", "0.5", ",", "é", "\x00", "٣", "\u200b", "ｎ"]
KK_TRUTH = {"names": ["Ava", "Ben"], "solution": [True, False]}
SLOW = 0.5   # seconds: no single reward may take longer (the released parser's bounds keep it far below)


def fuzz_text(rng: random.Random) -> str:
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 60)))
    if rng.random() < 0.03:                              # deep nesting and long numbers hit the bounds
        text = rng.choice(["(" * 3000, "9" * 5000, "<answer>" * 500, "1+" * 2000]) + text
    return text


def test_every_reward_returns_a_level_quickly_on_fuzzed_text():
    rng = random.Random(16)
    rewards = {"countdown": lambda t: tasks.countdown_reward(t, [44, 19, 35], 98),
               "kk": lambda t: tasks.kk_reward(t, KK_TRUTH),
               "math": lambda t: tasks.math_reward(t, "\\frac{1}{2}")}
    seen = {name: set() for name in rewards}
    slowest = 0.0
    for _ in range(2500):
        text = fuzz_text(rng)
        for name, reward in rewards.items():
            start = time.process_time()            # CPU time: a busy machine does not make it flaky
            value = reward(text)
            slowest = max(slowest, time.process_time() - start)
            assert value in (0.0, 0.1, 1.0), (name, text[:200])
            seen[name].add(value)
    assert slowest < SLOW
    assert all({0.0, 0.1} <= s for s in seen.values())       # the fuzzer reaches the parsers, not only "no tag"


ODD_VALUES = [None, "", "98", 98, 98.0, -1, True, [], [1, "2"], [44, 19, 35], {"a": 1}, "x" * 300, [[1]],
              float("nan"), {"names": "Ava", "solution": 1}, {"target": 5}, ["a", "b"], 10 ** 30]
FIELDS = ["question", "hint", "answer", "nums", "target", "data_source", "ground_truth", "reward_model",
          "level", "prompt", "response", "conversations", "instruction", "output"]


def fuzz_record(rng: random.Random) -> dict:
    base = dict(rng.choice([tasks.generate_countdown(1, seed=1)[0], tasks.generate_kk(1, seed=1)[0]]))
    for field in rng.sample(FIELDS, rng.randint(1, 4)):
        if rng.random() < 0.2:
            base.pop(field, None)
        else:
            base[field] = rng.choice(ODD_VALUES + [rng.choice(["countdown", "kk", "math", "gsm8k"])])
    return base


def test_row_checks_accept_or_name_the_row_on_fuzzed_records():
    rng = random.Random(17)
    outcomes = set()
    for i in range(2000):
        record = fuzz_record(rng)
        try:
            rows = tasks.check_rows([record], "fuzz.jsonl", task=rng.choice(list(tasks.TASKS)))
            outcomes.add("ok")
            assert all(isinstance(r["question"], str) for r in rows)
        except ValueError as err:
            outcomes.add("refused")
            assert str(err).startswith("fuzz.jsonl: row 0"), str(err)
    assert outcomes == {"ok", "refused"}


def fuzz_file_bytes(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.randint(0, 4)):
        choice = rng.random()
        if choice < 0.5:
            lines.append(json.dumps(fuzz_record(rng), default=str).encode())
        elif choice < 0.7:
            lines.append(json.dumps(rng.choice(ODD_VALUES)).encode())
        elif choice < 0.85:
            lines.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 30))))
        else:
            lines.append(b"")
    return b"\n".join(lines) + rng.choice([b"", b"\n", b"\n\n"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_both_loaders_read_or_refuse_fuzzed_files_in_one_line(tmp_path, suffix):
    rng = random.Random(18)
    path = tmp_path / f"data{suffix}"
    count = 300 if suffix != ".parquet" else 40                 # garbage parquet goes through pyarrow: slower
    for _ in range(count):
        content = fuzz_file_bytes(rng)
        if suffix == ".json" and rng.random() < 0.5:
            content = json.dumps([fuzz_record(rng) for _ in range(rng.randint(0, 3))], default=str).encode()
        path.write_bytes(content)
        try:
            tasks.load_task_rows(str(path), task=rng.choice(list(tasks.TASKS)))
        except ValueError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err), str(err)
        try:
            tasks.load_sft_rows(str(path))
        except UserError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err), str(err)
