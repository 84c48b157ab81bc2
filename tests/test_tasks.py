"""tasks.py: released-data compatibility, the reward on adversarial text, the parser, the generator, the loader,
the Task interface."""
import doctest
import json
import os
import re
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import tasks  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/countdown"
NEEDS_DATA = pytest.mark.skipif(not (DATA / "test.parquet").exists(),
                                reason=f"released countdown data not found at {DATA}")
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\n")

# A fixed problem for the reward tests: 44 + (19 + 35) = 98.
NUMS, TARGET = [44, 19, 35], 98
PROMPT = tasks.COUNTDOWN_TEMPLATE.format(nums=NUMS, target=TARGET)


def reward(completion: str) -> float:
    return tasks.countdown_reward(PROMPT + completion, NUMS, TARGET)


def answer(expr: str) -> str:
    return f"19 + 35 = 54 </think>\n<answer> {expr} </answer>"


# --- released data ------------------------------------------------------------------------------------------

@NEEDS_DATA
def test_released_test_answers_score_one():
    rows = tasks.load_task_rows(str(DATA / "test.parquet"))
    assert len(rows) == 1024
    assert all(set(r) == set(tasks.ROW_FIELDS) for r in rows)
    assert all(type(r["target"]) is int and all(type(x) is int for x in r["nums"]) for r in rows)
    assert all(isinstance(r["hint"], list) for r in rows)
    scores = [tasks.countdown_reward(r["question"] + r["answer"], r["nums"], r["target"]) for r in rows]
    assert scores == [1.0] * len(rows)


@NEEDS_DATA
def test_released_train_loads_and_prompts_match_the_template():
    rows = tasks.load_task_rows(str(DATA / "train.parquet"))
    assert len(rows) == 10_240
    for r in rows[:500]:
        assert r["question"] == tasks.COUNTDOWN_TEMPLATE.format(nums=r["nums"], target=r["target"])
        assert tasks.make_countdown_row(r["nums"], r["target"], r["hint"])["answer"] == r["answer"]


@NEEDS_DATA
def test_solver_solves_every_released_test_problem():
    for r in tasks.load_task_rows(str(DATA / "test.parquet")):
        fragments = tasks.solve_countdown(r["nums"], r["target"])
        assert fragments is not None, r
        row = tasks.make_countdown_row(r["nums"], r["target"], fragments)
        assert tasks.countdown_reward(row["question"] + row["answer"], r["nums"], r["target"]) == 1.0


# --- reward levels on adversarial text ---------------------------------------------------------------------

def test_correct_answers_in_any_parenthesisation():
    assert reward(answer("44 + (19 + 35)")) == 1.0
    assert reward(answer("35+19+44")) == 1.0
    assert reward(answer("(44 * 19 - 44 * 19) + 98")) == 0.1      # extra numbers


@pytest.mark.parametrize("completion, expected", [
    ("<answer></answer>", 0.1),                                        # extracted but empty
    ("<answer>   </answer>", 0.1),
    ("<answer> 44 + (19 + 35) </answer><answer> 44 + 19 + 3 </answer>", 0.1),   # last tag wins
    ("<answer> 44 + 19 + 3 </answer><answer> 44 + (19 + 35) </answer>", 1.0),
    ("<answer> 44 + 44 + 10 </answer>", 0.1),                          # a number used twice, two missing
    ("<answer> 44 + 19 + 35 + 35 - 35 </answer>", 0.1),                # a number used twice
    ("<answer> 44 + 54 </answer>", 0.1),                               # missing numbers
    ("<answer> 44 + 19 + 35 + 0 </answer>", 0.1),                      # an extra number
    ("<answer> 44 + (19 + 35) </answer>\n", 0.0),                      # released rule: only the last line
    ("<answer> 44 + (19 + 35) </answer>\nDone.", 0.0),
    ("<answer> 44 + (19 + 35) </answer> and that is all", 1.0),        # text after the tag, same line
    ("<answer> ４4 + (19 + 35) </answer>", 0.1),                        # fullwidth digit
    ("<answer> 44 + (19 + ٣5) </answer>", 0.1),                        # Arabic-Indic digit
    ("<answer> 44\u00a0+ (19 + 35) </answer>", 0.1),                   # non-ASCII space
    ("<answer> __import__('os').system('true') </answer>", 0.1),
    ("<answer> 44 ** 19 ** 35 </answer>", 0.1),                        # '**' is not arithmetic here
    ("<answer> 44 // 19 + 35 </answer>", 0.1),
    ("<answer> 44 / (19 - 19) + 35 </answer>", 0.1),                   # wrong numbers anyway
    ("<answer> 44 + 19 + 35 </answer", 0.0),                           # no closing tag
    ("the answer is 98", 0.0),
    ("<answer> 98 </answer>", 0.1),
])
def test_reward_levels(completion, expected):
    assert reward(completion) == expected


def test_division_by_zero_is_wrong_not_an_error():
    assert tasks.countdown_reward(PROMPT + "<answer> 5 / (3 - 3) </answer>", [5, 3, 3], 10) == 0.1


def test_no_assistant_marker_scores_zero():
    assert tasks.countdown_reward("User: hi\n<answer> 44 + (19 + 35) </answer>", NUMS, TARGET) == 0.0
    assert tasks.countdown_reward("", NUMS, TARGET) == 0.0


def test_answer_on_the_think_line_counts():
    assert reward("<answer> 44 + (19 + 35) </answer>") == 1.0    # the prompt's last line starts with <think>


def test_huge_and_deeply_nested_answers_are_fast_and_wrong():
    cases = ["44 + 19 + 35" + " + 0 - 0" * 12_500,               # 100k characters
             "(" * 10_000 + "44 + 19 + 35" + ")" * 10_000,       # nesting 10k deep
             "-" * 100_000 + "98",
             "<answer>" * 12_500]                                # many opening tags, no closing one
    for expr in cases:
        start = time.perf_counter()
        assert reward(answer(expr)) == 0.1
        assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    assert reward("x" * 100_000 + "<answer>" * 12_500 + " 98") == 0.0
    assert time.perf_counter() - start < 1.0


def test_reward_never_raises_on_odd_strings():
    for completion in ["\x00", "<answer>)(</answer>", "<answer>((((</answer>", "<answer>.</answer>",
                       "<answer>1..2</answer>", "<answer>44 + 19 + 35.</answer>",
                       "<answer>" + "9" * 5000 + "</answer>",
                       "<answer>\udcff</answer>", "<answer>44+19+35)</answer>"]:
        assert reward(completion) in (0.0, 0.1, 1.0)


def test_nesting_within_the_cap_is_accepted():
    depth = tasks.MAX_PAREN_DEPTH - 1
    assert reward(answer("(" * depth + "44 + 19 + 35" + ")" * depth)) == 1.0


# --- parse_arithmetic --------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, value", [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("8 - 3 - 2", 3), ("16 / 4 / 2", 2), ("2 * 3 / 4", Fraction(3, 2)),
    ("(1/3)*3", 1), ("1/3 + 1/6", Fraction(1, 2)), ("-3 + 5", 2), ("2 * -3", -6), ("--4", 4), ("+4", 4),
    ("-(2 - 5)", 3), ("7 / 2", Fraction(7, 2)), ("1.5 * 2", 3), (".5 + 5.", Fraction(11, 2)), (" 42 ", 42),
])
def test_parse_arithmetic_values(expr, value):
    assert tasks.parse_arithmetic(expr) == value


@pytest.mark.parametrize("expr", ["", "2 +", "(2", "2)", "2 2", "2 ** 3", "2 // 3", "2 (3)", "()", "a", "1..2",
                                  "4２", "(" * 101 + "1" + ")" * 101])
def test_parse_arithmetic_rejects_bad_syntax(expr):
    with pytest.raises(ValueError):
        tasks.parse_arithmetic(expr)


def test_parse_arithmetic_division_by_zero_and_size_cap():
    with pytest.raises(ZeroDivisionError):
        tasks.parse_arithmetic("1 / (2 - 2)")
    with pytest.raises(ValueError):
        tasks.parse_arithmetic(" * ".join(["99999999999"] * 200))   # far beyond MAX_NUMBER_BITS


# --- solver and generator ----------------------------------------------------------------------------------

def check_steps(fragments: list[str], nums: list[int], target: int):
    """Each step is right, uses numbers given or already derived, and the last step makes the target."""
    pool = list(nums)
    for line in fragments[:-1]:
        a, op, b, c = STEP.fullmatch(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert Fraction(c) == tasks.parse_arithmetic(f"{a} {op} {b}")
        pool.remove(a)
        pool.remove(b)
        pool.append(c)
    assert pool == [target]
    assert fragments[-1].startswith("Therefore, the final equation is ")


def test_solver_small_cases():
    assert tasks.solve_countdown([1, 1], 10) is None
    fragments = tasks.solve_countdown([3, 4, 5], 35)
    check_steps(fragments, [3, 4, 5], 35)
    expr = fragments[-1].removeprefix("Therefore, the final equation is ")
    assert tasks.parse_arithmetic(expr) == 35 and sorted(map(int, re.findall(r"\d+", expr))) == [3, 4, 5]
    assert tasks.solve_countdown([3, 4, 5], 35) == fragments                       # deterministic
    assert not any(" * 1 " in f for f in tasks.solve_countdown([7, 1, 5], 36))     # 7 * 5 + 1, not x * 1


@pytest.mark.parametrize("nums", [[3, 4, 5], [1, 1, 7, 9], [2, 50, 97], [12, 12, 6, 1]])
def test_reachable_targets_are_exactly_the_solvable_ones(nums):
    reachable = set(tasks.reachable_targets(nums))
    assert reachable and reachable != set(range(10, 101))
    for target in range(10, 101):
        assert (tasks.solve_countdown(nums, target) is not None) == (target in reachable), target


@pytest.fixture(scope="module")
def generated():
    return tasks.generate_countdown(300, seed=3)


def test_generated_rows_are_well_formed_and_solved(generated):
    assert len(generated) == 300
    assert {len(r["nums"]) for r in generated} == {3, 4}
    for r in generated:
        assert all(1 <= x <= 99 for x in r["nums"]) and 10 <= r["target"] <= 100
        assert r["question"] == tasks.COUNTDOWN_TEMPLATE.format(nums=r["nums"], target=r["target"])
        assert tasks.countdown_reward(r["question"] + r["answer"], r["nums"], r["target"]) == 1.0
        assert r["answer"].startswith("".join(r["hint"]) + " </think>\n<answer> ")
        check_steps(r["hint"], r["nums"], r["target"])
    assert len({tasks.countdown_key(r["nums"], r["target"]) for r in generated}) == len(generated)


def test_generation_is_deterministic_per_seed(generated):
    assert tasks.generate_countdown(300, seed=3) == generated
    assert tasks.generate_countdown(300, seed=4) != generated
    assert all(len(r["nums"]) == 4 for r in tasks.generate_countdown(50, seed=3, min_nums=4, max_nums=4))


def test_test_set_avoids_every_problem_an_earlier_run_was_scored_or_tuned_on():
    keys = lambda rows: {tasks.countdown_key(r["nums"], r["target"]) for r in rows}  # noqa: E731
    used = set()
    for seed in range(6):   # the old test side was each seed's held-out stream, from its first problem
        used |= keys(tasks.generate_countdown(700, seed, 3, 3, heldout=True))
    for seed in range(3):
        test = tasks.countdown_split(10, 500, seed, 3, 3)[1]
        assert len(keys(test)) == 500 and not keys(test) & used
    assert tasks.countdown_validation(700, seed=1, min_nums=3, max_nums=3) == \
        tasks.generate_countdown(700, 1, 3, 3, heldout=True)   # validation: the old stream, first to last
    with pytest.raises(ValueError, match="at most"):
        tasks.countdown_validation(tasks.USED_HELDOUT + 1, seed=0)


def test_split_has_no_shared_problem_and_a_stable_test_side():
    train, test = tasks.countdown_split(400, 100, seed=0)
    assert len(train) == 400 and len(test) == 100
    keys = lambda rows: {tasks.countdown_key(r["nums"], r["target"]) for r in rows}  # noqa: E731
    assert not keys(train) & keys(test)
    assert tasks.countdown_split(50, 100, seed=0)[1] == test
    assert tasks.countdown_split(400, 100, seed=0) == (train, test)


def test_bad_generator_arguments():
    with pytest.raises(ValueError):
        tasks.generate_countdown(10, seed=0, min_nums=4, max_nums=3)


# --- loading files ------------------------------------------------------------------------------------------

def test_jsonl_with_a_missing_target_names_file_row_and_field(tmp_path, generated):
    path = tmp_path / "broken.jsonl"
    rows = [dict(r) for r in generated[:4]]
    del rows[2]["target"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"broken\.jsonl.*row 2.*target"):
        tasks.load_task_rows(str(path))


@pytest.mark.parametrize("field, value", [("hint", []), ("hint", "19 + 35 = 54\n"), ("nums", [1, "two"]),
                                          ("nums", [1, 2.5]), ("question", 3), ("target", 9.5)])
def test_invalid_fields_are_named(tmp_path, generated, field, value):
    path = tmp_path / "bad.jsonl"
    rows = [dict(r) for r in generated[:3]]
    rows[1][field] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"bad\.jsonl.*row 1.*{field}"):
        tasks.load_task_rows(str(path))


def test_parquet_and_json_round_trips_keep_rows(tmp_path, generated):
    import pandas as pd
    extra = [dict(r, data_source="countdown", extra_info={"index": i}) for i, r in enumerate(generated[:50])]
    pd.DataFrame(extra).to_parquet(tmp_path / "rows.parquet")
    assert tasks.load_task_rows(str(tmp_path / "rows.parquet")) == generated[:50]
    (tmp_path / "rows.json").write_text(json.dumps(generated[:50]))
    assert tasks.load_task_rows(str(tmp_path / "rows.json")) == generated[:50]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        tasks.load_task_rows(str(tmp_path / "nope.parquet"))
    with pytest.raises(FileNotFoundError, match="rows.csv"):        # CSV is a data format now
        tasks.load_task_rows(str(tmp_path / "rows.csv"))
    (tmp_path / "rows.txt").write_text("44 19 35\n")
    with pytest.raises(ValueError, match="rows.txt: unknown data format"):
        tasks.load_task_rows(str(tmp_path / "rows.txt"))


def test_builtin_name_generates_the_split():
    train = tasks.load_task_rows("countdown", num_train=30, num_test=10, seed=1)
    test = tasks.load_task_rows("countdown", split="test", num_train=30, num_test=10, seed=1)
    assert (train, test) == tasks.countdown_split(30, 10, seed=1)


# --- held-out problems, the Task interface, answer pieces ---------------------------------------------------

def test_docstring_examples_run():
    """The README's test command runs the doctests of uft.py only; these are tasks.py's."""
    result = doctest.testmod(tasks)
    assert result.attempted >= 5 and result.failed == 0


def test_heldout_ignores_number_order_and_takes_about_one_problem_in_ten():
    problems = [([a, b, c], t) for a in range(1, 8) for b in range(1, 8) for c in range(1, 8) for t in (10, 24, 50)]
    assert all(tasks.is_heldout(n, t) == tasks.is_heldout(n[::-1], t) for n, t in problems)
    share = sum(tasks.is_heldout(n, t) for n, t in problems) / len(problems)
    assert 0.05 < share < 0.15, share


def test_split_sides_and_validation_rows_respect_the_heldout_bucket():
    train, test = tasks.countdown_split(60, 20, seed=2)
    val = tasks.countdown_validation(15, seed=2)
    assert len(val) == 15
    assert all(tasks.is_heldout(r["nums"], r["target"]) for r in test + val)
    assert not any(tasks.is_heldout(r["nums"], r["target"]) for r in train)
    keys = lambda rows: {tasks.countdown_key(r["nums"], r["target"]) for r in rows}  # noqa: E731
    assert not keys(val) & keys(test) and not keys(val) & keys(train)


def test_reward_goes_through_the_rows_task():
    row = tasks.generate_countdown(1, seed=7)[0]
    right, wrong = row["question"] + row["answer"], row["question"] + "<answer> 1 + 1 </answer>"
    assert tasks.reward(row, right) == 1.0 and tasks.reward(row, wrong) == 0.1 and tasks.reward(row, "") == 0.0
    assert tasks.reward(dict(row, data_source="countdown"), wrong) == 0.1
    assert tasks.reward(dict(row, data_source="not-a-task"), right) == 1.0      # unknown sources: the default
    task = tasks.TASKS["countdown"]
    assert task.reward(row, right) == 1.0
    assert task.check_row(dict(row, extra=1), 0, "x") == row                       # extra columns dropped
    assert task.split(5, 3, seed=0) == tasks.countdown_split(5, 3, seed=0)


def test_answer_pieces_are_the_hint_fragments_then_the_tail():
    row = tasks.generate_countdown(1, seed=4)[0]
    pieces = tasks.answer_pieces(row)
    assert pieces[:-1] == row["hint"] and "".join(pieces) == row["answer"]
    assert pieces[-1].startswith(" </think>")
    assert tasks.answer_pieces(dict(row, answer="other text")) == ["other text"]  # not prefixed by its hint
    assert tasks.answer_pieces({"answer": "a b"}) == ["a b"]                       # no hint at all
    assert tasks.answer_token_ids(row, lambda piece: [len(piece)]) == [len(p) for p in pieces]   # piece by piece


def test_extract_answer_reads_the_last_tag_of_the_last_line():
    assert tasks.extract_answer("Assistant: x\n<answer> 1 </answer> <answer> 2 </answer>") == "2"
    assert tasks.extract_answer("Assistant: <answer> 1 </answer>\n") is None
    assert tasks.extract_answer("<answer> 1 </answer>") is None                     # no "Assistant:"
    assert tasks.extract_answer("Assistant: <answer></answer>") == ""
