"""tasks.py's Knights-and-Knaves and MATH: the released data, the solver and trace writer, generated puzzles,
the two rewards on hand-written and adversarial text, the MATH normalisation, mixed files."""
import ast
import itertools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import tasks  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
KK_FILE, MATH_FILE = SHARED / "kk/train.parquet", SHARED / "math/sample.parquet"
NEEDS_KK = pytest.mark.skipif(not KK_FILE.exists(), reason=f"released K&K data not found at {KK_FILE}")
NEEDS_MATH = pytest.mark.skipif(not MATH_FILE.exists(),
                                reason=f"released MATH sample not found at {MATH_FILE}")
TWO_LINE_MATH_ROW = 4134   # extra_info.index of the sample row whose answer spans two lines (see below)
BOUND_SECONDS = 2.0         # generous: every reward call below takes milliseconds


@pytest.fixture(scope="module")
def kk_rows():
    return tasks.load_task_rows(str(KK_FILE), task="kk")


@pytest.fixture(scope="module")
def math_rows():
    import pandas as pd
    frame = pd.read_parquet(MATH_FILE)
    rows = tasks.load_task_rows(str(MATH_FILE))
    return rows, [int(e["index"]) for e in frame["extra_info"]]


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


# --- the released K&K data ----------------------------------------------------------------------------------

@NEEDS_KK
def test_released_kk_answers_score_one(kk_rows):
    assert len(kk_rows) == 4500
    assert [tasks.reward(r, r["question"] + r["answer"]) for r in kk_rows] == [1.0] * 4500


@NEEDS_KK
def test_solver_reproduces_every_released_solution(kk_rows):
    for r in kk_rows:
        gt = r["ground_truth"]
        statements = tasks.parse_kk_statements(gt["statements"], len(gt["names"]))
        assert tasks.solve_kk(statements) == [tuple(gt["solution"])], gt


@NEEDS_KK
def test_trace_writer_reproduces_every_released_hint(kk_rows):
    for r in kk_rows:
        gt = r["ground_truth"]
        assert tasks.kk_trace(ast.literal_eval(gt["statements"]), gt["names"]) == r["hint"], gt


@NEEDS_KK
def test_released_questions_have_the_template_frame(kk_rows):
    head, tail = tasks.KK_TEMPLATE.split("{puzzle}")
    for r in kk_rows[:500]:
        gt = r["ground_truth"]
        assert r["question"].startswith(head + f"You meet {len(gt['names'])} inhabitants: ")
        assert r["question"].endswith(tail)
        assert r["answer"].endswith(" </think>\n<answer> " + gt["solution_text_format"] + " </answer>")


# --- the grammar, solver and trace on hand-made puzzles -----------------------------------------------------

def test_truth_tables_of_the_connectives():
    a, b = ("telling-truth", 0), ("lying", 1)       # "0 is a knight", "1 is a knave"
    table = {  # (0 knight?, 1 knight?) -> (a, b, not a, a and b, a or b, a -> b, a <=> b), by hand
        (True, True): (True, False, False, False, True, False, False),
        (True, False): (True, True, False, True, True, True, True),
        (False, True): (False, False, True, False, False, True, True),
        (False, False): (False, True, True, False, True, True, False)}
    for knights, expected in table.items():
        got = tuple(tasks.kk_truth(s, knights) for s in (a, b, ("not", a), ("and", a, b), ("or", a, b),
                                                            ("->", a, b), ("<=>", a, b)))
        assert got == expected, knights


def test_solver_on_hand_solved_puzzles():
    assert tasks.solve_kk((("lying", 0),)) == []                                  # "I am a knave": nobody
    assert tasks.solve_kk((("telling-truth", 0),)) == [(True,), (False,)]         # "I am a knight": both
    # A: "B is a knave"; B: "A and I are knaves" -> only A knight, B knave
    assert tasks.solve_kk((("lying", 1), ("and", ("lying", 0), ("lying", 1)))) == [(True, False)]
    # A: "if I am a knight then B is a knight"; B: "A is a knave" -> no assignment fits
    assert tasks.solve_kk((("->", ("telling-truth", 0), ("telling-truth", 1)), ("lying", 0))) == []


def test_claims_read_as_in_the_released_data():
    names = ["Ava", "Ben"]
    assert tasks.kk_claim(("not", ("telling-truth", 1)), names) == "Ben is not a knight"
    assert tasks.kk_claim(("->", ("lying", 0), ("telling-truth", 1)), names) == \
        "If Ava is a knave then Ben is a knight"
    assert tasks.kk_claim(("<=>", ("lying", 1), ("lying", 0)), names) == \
        "Ben is a knave if and only if Ava is a knave"
    assert tasks.english_list(["A", "B", "C"]) == "A, B, and C"
    assert tasks.english_list(["A", "B"]) == "A and B"
    with pytest.raises(ValueError, match="grammar"):
        tasks.kk_claim(("and", ("or", ("lying", 0), ("lying", 1)), ("lying", 1)), names)   # "A or B and C"
    with pytest.raises(ValueError, match="grammar"):
        tasks.kk_claim(("not", ("not", ("lying", 0))), names)


def test_trace_refuses_puzzles_without_exactly_one_solution():
    # A: "B is a knight"; B: "A is a knave or B is a knave". By hand: (T,T) B's claim is false; (T,F) and
    # (F,T) A's claim does not fit A; (F,F) B's claim is true (A is a knave). No solution.
    with pytest.raises(ValueError, match="0 solutions"):
        tasks.kk_trace((("telling-truth", 1), ("or", ("lying", 0), ("lying", 1))), ["Ava", "Ben"])
    # A: "B is a knight"; B: "A is a knight": both knights or both knaves.
    with pytest.raises(ValueError, match="2 solutions"):
        tasks.kk_trace((("telling-truth", 1), ("telling-truth", 0)), ["Ava", "Ben"])


def test_trace_of_a_hand_solved_puzzle_with_backtracking():
    # A: "B is a knight"; B: "A is a knight and B is a knave". By hand: (T,T) B's claim is false for a
    # knight; (T,F) and (F,T) A's claim does not fit A; (F,F) both claims are false: the one solution.
    # The search (claims checked in puzzle order) assumes A knight, finds both roles of B contradicted,
    # goes back to A, assumes A knave, rules out B knight by A's false claim, and ends on B knave.
    puzzle = (("telling-truth", 1), ("and", ("telling-truth", 0), ("lying", 1)))
    assert tasks.solve_kk(puzzle) == [(False, False)]
    assert tasks.kk_trace(puzzle, ["Ava", "Ben"]) == [
        "Assume Ava is a knight. ", "No contradiction is found in their claim that Ben is a knight.\n",
        "Ben cannot be a knight, because this would contradict the claim of their own that Ava is a knight "
        "and Ben is a knave.\n",
        "Ben cannot be a knave, because this would contradict the claim of Ava that Ben is a knight.\n",
        "We have exhausted all possibilities for Ben, so let us go back and reconsider Ava.\n",
        "Assume Ava is a knave. ", "No contradiction is found in their false claim that Ben is a knight.\n",
        "Ben cannot be a knight, because this would contradict the false claim of Ava that Ben is a "
        "knight.\n",
        "Assume Ben is a knave. ",
        "No contradiction is found in their false claim that Ava is a knight and Ben is a knave.\n",
        "Therefore, (1) Ava is a knave\n", "(2) Ben is a knave"]


# --- generated puzzles --------------------------------------------------------------------------------------

def independent_solutions(statements) -> list[tuple]:
    """A second brute force, written differently: each statement compiled to a Python predicate."""
    def compile_(s):
        ops = {"and": lambda x, y: x and y, "or": lambda x, y: x or y, "->": lambda x, y: (not x) or y,
               "<=>": lambda x, y: x == y}
        if s[0] == "telling-truth":
            return lambda k: k[s[1]]
        if s[0] == "lying":
            return lambda k: not k[s[1]]
        if s[0] == "not":
            inner = compile_(s[1])
            return lambda k: not inner(k)
        left, right = compile_(s[1]), compile_(s[2])
        return lambda k: ops[s[0]](left(k), right(k))
    preds = [compile_(s) for s in statements]
    return [k for k in itertools.product([True, False], repeat=len(statements))
            if all(p(k) == k[i] for i, p in enumerate(preds))]


@pytest.mark.parametrize("people", [2, 3, 5, 8])
def test_generated_puzzles_have_one_solution_and_their_answers_score_one(people):
    rows = tasks.generate_kk(30, seed=people, min_people=people, max_people=people)
    for r in rows:
        gt = r["ground_truth"]
        statements = ast.literal_eval(gt["statements"])
        assert len(gt["names"]) == len(set(gt["names"])) == len(statements) == people
        assert independent_solutions(statements) == [tuple(gt["solution"])]
        assert tasks.kk_reward(r["question"] + r["answer"], gt) == 1.0
        tail = " </think>\n<answer> " + gt["solution_text_format"] + " </answer>"
        assert r["answer"] == "".join(r["hint"]) + tail
        assert r["hint"][-people:][0].startswith("Therefore, (1) ")
        assert "".join(r["hint"][-people:]).removeprefix("Therefore, ") == gt["solution_text_format"]
        for name, claim in zip(gt["names"], statements):
            assert name in r["question"] and tasks.kk_claim(claim, gt["names"]) in r["question"]


def test_generation_is_seeded_and_splits_are_disjoint():
    assert tasks.generate_kk(20, seed=3) == tasks.generate_kk(20, seed=3)
    assert tasks.generate_kk(20, seed=3) != tasks.generate_kk(20, seed=4)
    train, test = tasks.kk_split(200, 40, seed=0)
    key = lambda rows: {r["ground_truth"]["statements"] for r in rows}  # noqa: E731
    assert len(key(train)) == 200 and len(key(test)) == 40 and not key(train) & key(test)
    assert all(tasks.is_kk_heldout(ast.literal_eval(s)) for s in key(test))
    assert tasks.kk_split(50, 40, seed=0)[1] == test                     # the test side ignores num_train
    with pytest.raises(ValueError, match="min_people"):
        tasks.generate_kk(1, seed=0, min_people=1, max_people=3)


# --- kk_reward: levels on hand-written and adversarial text -------------------------------------------------

GT = {"names": ["Liam", "Zoey", "Ava"], "solution": [True, False, True]}
RIGHT = "(1) Liam is a knight\n(2) Zoey is a knave\n(3) Ava is a knight"
Q = "User: who is who?\nAssistant: Let me solve this step by step.\n<think> "


def kk(completion: str) -> float:
    return tasks.kk_reward(Q + completion, GT)


@pytest.mark.parametrize("completion, level", [
    (f"reasoning </think>\n<answer> {RIGHT} </answer>", 1.0),
    (f"<answer>{RIGHT}</answer>\n", 1.0),                                      # a trailing newline: read
    (f"<answer> {RIGHT.upper()} </answer>", 1.0),                               # upper case: matched
    ("<answer> Ava is a knight, Liam is a knight, Zoey is a knave </answer>", 1.0),    # any order
    # released counting rule: 4 role words for 3 inhabitants, so 0.1 however right the three are
    (f"<answer> {RIGHT}\n(4) Mia is a knave </answer>", 0.1),
    (f"<answer> {RIGHT.replace('Zoey is a knave', 'Zoey is a knight')} </answer>", 0.1),   # a wrong role
    ("<answer> (1) Liam is a knight\n(2) Zoey is a knave </answer>", 0.1),      # a missing name
    (f"<answer> {RIGHT.replace('knight', 'knights')} </answer>", 0.1),         # plural: not a role
    (f"<answer> {RIGHT.replace('knave', 'knаve')} </answer>", 0.1),            # Cyrillic a
    # the Kelvin sign lower-cases to k (str.lower) and matches k under re.IGNORECASE: released level 1.0
    (f"<answer> {RIGHT.replace('Liam is a knight', 'Liam is a ' + chr(0x212A) + 'night')} </answer>", 1.0),
    ("<answer> (1) William is a knight\n(2) Zoey is a knave\n(3) Ava is a knight </answer>", 0.1),  # not Liam
    (f"<answer> Liam is a knave\n{RIGHT} </answer>", 0.1),                      # duplicated: the first counts
    (f"<answer> {RIGHT} </answer> <answer> nothing </answer>", 0.1),           # the last tag counts
    (f"<answer> nothing </answer> <answer> {RIGHT} </answer>", 1.0),
    (f"<answer> {RIGHT} </answer> <answer> {RIGHT}", 1.0),                     # an unclosed tag is not one
    (f"<answer> {RIGHT}", 0.0),
    (f"{RIGHT}", 0.0),
    ("<answer></answer>", 0.0),                                                 # K&K: empty is no answer
])
def test_kk_reward_levels(completion, level):
    assert kk(completion) == level


def test_kk_reward_needs_the_assistant_part():
    assert tasks.kk_reward(f"<answer> {RIGHT} </answer>", GT) == 0.0            # no "Assistant:"
    assert tasks.kk_reward(f"<answer> {RIGHT} </answer> Assistant: none", GT) == 0.0   # the tag is before it
    assert tasks.kk_reward(None, GT) == 0.0


@pytest.mark.parametrize("completion", [
    "<answer>" * 20_000, "<answer> Liam is a " + " " * 100_000 + "knight </answer>",
    "<answer> " + "Liam is a knigh " * 7_000 + "</answer>", "</answer><answer>" * 7_000,
    "Liam " * 25_000 + "<answer> x </answer>"])
def test_kk_reward_is_fast_on_long_adversarial_text(completion):
    level, seconds = timed(kk, completion)
    assert level in (0.0, 0.1) and seconds < BOUND_SECONDS


# --- MATH normalisation: hand-written pairs -----------------------------------------------------------------

EQUAL = [
    ("\\frac{1}{2}", "\\frac12"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\tfrac{3}{4}", "\\frac34"),
    ("0.5", "\\frac{1}{2}"), (".5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"), ("10/3", "\\frac{10}{3}"),
    ("-1/2", "\\frac{-1}{2}"), ("\\sqrt2", "\\sqrt{2}"), ("3\\sqrt2", "3\\sqrt{2}"),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"), ("\\left(1,2\\right)", "(1,2)"),
    ("\\left[ 0, 1 \\right)", "[0,1)"), ("x = 5", "5"), ("x=5", "5"), ("y = \\frac12", "\\frac{1}{2}"),
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("\\$5", "5"), ("50\\%", "50"), ("5 \\text{ cm}", "5"),
    ("12\\text{ square feet}", "12"), ("1 000", "1000"), ("a + b", "a+b"), ("0.25", ".25"),
    ("{.5}", "{0.5}"), ("(1, .5)", "(1,0.5)"), ("\\frac1{10}", "\\frac{1}{10}"),
    ("\\dfrac{3x^2}{2}", "\\frac{3x^2}{2}"),
    ("  7  ", "7"), ("\\left\\{1\\right\\}", "\\{1\\}"), ("\\frac{1}{2}^\\circ", "0.5"),
    ("5\\!000", "5000"),                 # released: '\!' (a thin negative space) is dropped first
]
NOT_EQUAL = [
    ("0.50", "\\frac{1}{2}"),            # only the exact string 0.5 becomes a half
    ("2/4", "\\frac{1}{2}"),             # no arithmetic: \frac{2}{4} is not \frac{1}{2}
    ("01/2", "\\frac{1}{2}"),            # a/b only for integers written as Python prints them
    ("1/2/3", "\\frac{1}{2}/3"),
    ("xyz = 5", "5"),                    # the prefix rule takes at most two characters before '='
    ("x = y = 5", "5"),                  # ... and only one '='
    ("5\\text{cm}", "5"),                # units only after '\text{ ' with its space
    ("\\sqrt{2}", "\\sqrt{3}"), ("\\frac{1}{3}", "0.33"), ("1", "-1"), ("12", "21"), ("\\pi", "3.14"),
    ("1,000", "1000"),                   # commas are not dropped
    ("1.0", "1"), ("\\frac{a}{b}", "a/b"),   # a/b only for integers
]


@pytest.mark.parametrize("a, b", EQUAL)
def test_math_pairs_that_normalise_equal(a, b):
    assert tasks.math_equal(a, b) and tasks.math_equal(b, a)


@pytest.mark.parametrize("a, b", NOT_EQUAL)
def test_math_pairs_that_stay_different(a, b):
    assert not tasks.math_equal(a, b) and not tasks.math_equal(b, a)


def test_math_pair_count_and_fallbacks():
    assert len(EQUAL) + len(NOT_EQUAL) >= 40
    # two '\text{ ' fail the standard normalisation: the raw strings are compared instead
    assert tasks.math_equal("1\\text{ a}\\text{ b}", "1\\text{ a}\\text{ b}")
    assert not tasks.math_equal("1\\text{ a}\\text{ b}", "1")
    assert tasks.math_equal("\\sqrt", "\\sqrt") and not tasks.math_equal("2\\sqrt", "2")   # trailing \sqrt


# --- MATH reward: the released sample, rewritten targets, adversarial text ----------------------------------

def as_answer(question: str, text: str) -> str:
    return question + "work </think>\n<answer> " + text + " </answer>"


@NEEDS_MATH
def test_math_sample_rows_score_one_but_the_two_line_answer(math_rows):
    rows, index = math_rows
    assert len(rows) == 512
    scores = {i: tasks.reward(r, r["question"] + r["answer"]) for r, i in zip(rows, index)}
    # The row's target '90\text{ square\nunits}' spans two lines: the released last-line rule sees
    # 'units} </answer>' with no opening tag and extracts nothing, so 0.0. Kept as released.
    assert scores.pop(TWO_LINE_MATH_ROW) == 0.0
    assert set(scores.values()) == {1.0}


def changed_number(target: str) -> str | None:
    digits = [i for i, ch in enumerate(target) if ch.isdigit()]
    if not digits:
        return None
    i = digits[0]
    return target[:i] + str((int(target[i]) + 1) % 10) + target[i + 1:]


@NEEDS_MATH
def test_rewritten_targets_still_score_one_and_changed_numbers_do_not(math_rows):
    import re
    rows, index = math_rows
    checked = {"dfrac": 0, "spaces": 0, "left_right": 0, "x =": 0, "changed": 0}
    for r, i in zip(rows, index):
        t = r["target"]
        if i == TWO_LINE_MATH_ROW:
            continue
        forms = {"dfrac": t.replace("\\frac", "\\dfrac") if "\\frac" in t else None,
                 "spaces": re.sub(r"(?<=[0-9}])(?=[0-9{\\])", " ", t),       # never '\text{ ' or ' .'
                 "x =": "x = " + t if "=" not in t else None}
        for name, form in forms.items():
            if form is not None and form != t:
                assert tasks.reward(r, as_answer(r["question"], form)) == 1.0, (name, t, form)
                checked[name] += 1
        # no sample target has parentheses: put the target in some, and write them with \left( \right)
        pair = dict(r, target=f"({t}, 1)")
        assert tasks.reward(pair, as_answer(r["question"], f"\\left({t}, 1\\right)")) == 1.0, t
        checked["left_right"] += 1
        if (wrong := changed_number(t)) is not None:
            assert tasks.reward(r, as_answer(r["question"], wrong)) == 0.1, (t, wrong)
            checked["changed"] += 1
    assert min(checked.values()) >= 10, checked


MATH_Q = "User: compute.\nAssistant: Let me solve this step by step.\n<think> "


@pytest.mark.parametrize("completion, level", [
    ("</think>\n<answer> \\frac{1}{2} </answer>", 1.0),
    ("<answer> 1 </answer> <answer> 0.5 </answer>", 1.0),          # the last tag on the last line
    ("<answer> 0.5 </answer> <answer> 1 </answer>", 0.1),
    ("<answer> 0.5 </answer>\n", 0.0),                               # nothing on the last line
    ("<answer> 0.5 </answer>\nmore", 0.0),
    ("<answer> 0.5", 0.0), ("0.5", 0.0), ("<answer></answer>", 0.1),
    ("<answer> ０.５ </answer>", 0.1),                               # fullwidth digits are not digits here
    ("<answer> \\boxed{0.5} </answer>", 0.1),                        # \boxed is not in the rule list
])
def test_math_reward_levels(completion, level):
    assert tasks.math_reward(MATH_Q + completion, "\\frac{1}{2}") == level


def test_math_reward_needs_the_assistant_part_and_is_fast():
    assert tasks.math_reward("<answer> 0.5 </answer>", "0.5") == 0.0
    bodies = ["\\frac" * 20_000, "\\sqrt" * 20_000 + "2", "x=" * 50_000, "\\text{ " * 20_000,
              "1/" * 50_000 + "2"]
    for completion in ["<answer>" * 20_000] + [f"<answer> {body} </answer>" for body in bodies]:
        level, seconds = timed(tasks.math_reward, MATH_Q + completion, "\\frac{1}{2}")
        assert level in (0.0, 0.1) and seconds < BOUND_SECONDS


# --- files: per-row tasks, sources without a reward, levels, errors -----------------------------------------

def test_mixed_file_rows_go_to_their_tasks_and_unknown_sources_are_named(tmp_path, capsys):
    countdown = tasks.generate_countdown(2, seed=0)
    kk_row = tasks.generate_kk(1, seed=0)[0]
    math_row = {"question": MATH_Q, "hint": ["1/2\n"], "answer": "1/2\n </think>\n<answer> 1/2 </answer>",
                "data_source": "DigitalLearningGmbH/MATH-lighteval", "level": "Level 4", "type": "Algebra",
                "reward_model": {"ground_truth": {"target": "\\frac{1}{2}"}}}
    other = {"question": "q", "hint": ["h"], "answer": "a", "data_source": "some/other-benchmark"}  # no scorer
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in countdown + [kk_row, math_row, other, other]))
    rows = tasks.load_task_rows(str(path))
    assert "2 rows of data_source 'some/other-benchmark' skipped" in capsys.readouterr().err
    assert [tasks.task_of(r) for r in rows] == ["countdown", "countdown", "kk", "math"]
    assert [tasks.reward(r, r["question"] + r["answer"]) for r in rows] == [1.0] * 4
    assert rows[3]["level"] == 4 and rows[3]["target"] == "\\frac{1}{2}"
    assert len(tasks.load_task_rows(str(path), math_levels={3, 5})) == 3
    assert "1 MATH rows outside" in capsys.readouterr().err


def test_rows_without_a_source_use_the_given_task(tmp_path):
    row = tasks.generate_kk(1, seed=1)[0]
    del row["data_source"]
    path = tmp_path / "kk.json"
    path.write_text(json.dumps([row]))
    (loaded,) = tasks.load_task_rows(str(path), task="kk")
    assert loaded["data_source"] == tasks.KK_SOURCE and loaded["ground_truth"] == row["ground_truth"]
    with pytest.raises(ValueError, match="row 0.*nums"):          # read as countdown, it lacks nums
        tasks.load_task_rows(str(path))


@pytest.mark.parametrize("change, field", [
    (lambda gt: gt.update(statements="(('lying', 5),)"), "ground_truth"),
    (lambda gt: gt.update(statements="__import__('os')"), "ground_truth"),
    (lambda gt: gt.update(solution=[True]), "ground_truth"),
    (lambda gt: gt.pop("names"), "ground_truth")])
def test_bad_kk_ground_truth_is_named(tmp_path, change, field):
    row = tasks.generate_kk(1, seed=2, min_people=3, max_people=3)[0]
    change(row["ground_truth"])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl.*row 0.*{field}"):
        tasks.load_task_rows(str(path))


def test_math_has_no_generator():
    with pytest.raises(tasks.UserError, match="MATH"):
        tasks.TASKS["math"].split(1, 1, seed=0)


# --- the command line: --data kk, mixed --test_data, --eval_only ------------------------------------------

@pytest.fixture(scope="module")
def tiny_kk_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer trained on K&K and countdown text, saved like a user's model folder."""
    from conftest import save_tiny_model
    rows = tasks.generate_kk(60, seed=9, min_people=2, max_people=3) + tasks.generate_countdown(60, seed=9)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-kk"), rows, vocab_size=500)


def run_flags(model, out, *extra):
    return ["--model", str(model), "--output_dir", str(out), "--device", "cpu", "--T", "2", "--T_hint", "1",
            "--num_train", "8", "--num_test", "4", "--batch_size", "2", "--mini_batch_size", "2",
            "--num_generations", "2", "--max_completion_length", "4", "--eval_steps", "2",
            "--save_steps", "2",
            "--micro_batch_size", "4", *extra]


def test_uft_trains_on_kk_then_eval_only_scores_a_mixed_file_per_source(tiny_kk_dir, tmp_path, capsys):
    import common
    import uft
    run = tmp_path / "kk-run"
    assert uft.main(run_flags(tiny_kk_dir, run, "--data", "kk")) == 0
    assert common.read_jsonl(run / "metrics.jsonl")[-1]["step"] == 2
    rows = tasks.generate_countdown(3, seed=1, heldout=True) + tasks.generate_kk(2, seed=1, heldout=True)
    other = {"question": "q", "hint": ["h"], "answer": "a", "data_source": "some/other-benchmark"}  # no scorer
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows + [other]))
    out = tmp_path / "eval"
    assert uft.main(run_flags(run, out, "--eval_only", "--test_data", str(mixed), "--num_test", "10")) == 0
    printed = capsys.readouterr()
    assert "1 rows of data_source 'some/other-benchmark' skipped" in printed.err
    assert str(run / "checkpoint") in printed.out and "kk_logic: accuracy" in printed.out
    (metrics,) = common.read_jsonl(out / "metrics.jsonl")
    assert set(metrics["eval_accuracy_by_source"]) == {"countdown", "kk_logic"}
    by_source = metrics["eval_accuracy_by_source"].values()
    assert metrics["eval_accuracy_source_mean"] == pytest.approx(sum(by_source) / 2)
    (rewards,) = common.read_jsonl(out / "eval_rewards.jsonl")
    assert len(rewards["rewards"]) == 5
    samples = common.read_jsonl(out / "samples.jsonl")
    assert [("nums" in s, "ground_truth" in s) for s in samples] == [(True, False)] * 3 + [(False, True)]
    assert not (out / "checkpoint").exists()


def test_bad_data_and_levels_fail_at_start(tmp_path):
    import uft
    with pytest.raises(SystemExit):
        uft.parse_args(["--data", "nope", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        uft.parse_args(["--data", "kk", "--math_levels", "three", "--output_dir", str(tmp_path)])
    args = uft.parse_args(["--data", "kk", "--math_levels", "3,4,5", "--output_dir", str(tmp_path)])
    assert (args.task, args.math_levels) == ("countdown", "3,4,5")


def test_sft_go_trains_on_kk_and_scores_its_answers(tiny_kk_dir, tmp_path):
    import common
    import sft_go
    flags = ["--model", str(tiny_kk_dir), "--data", "kk", "--num_train", "8", "--num_test", "3", "--T", "2",
             "--batch_size", "4", "--micro_batch_size", "4", "--eval_steps", "2", "--loss", "go",
             "--max_completion_length", "4", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu",
             "--output_dir", str(tmp_path / "run"), "--num_html_samples", "1"]
    assert sft_go.main(flags) == 0
    last = common.read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert 0 <= last["eval_accuracy"] <= 1 and "eval_format_rate" in last    # K&K rows have a reward


def test_data_kk_defaults_to_its_own_base_and_room_for_a_trace(tmp_path):
    """--data kk starts from the K&K base with 128 new tokens; an explicit --model or length wins."""
    import sft_go
    import uft
    out = ["--output_dir", str(tmp_path)]
    kk, countdown = uft.parse_args(["--data", "kk", *out]), uft.parse_args(out)
    assert (kk.model, kk.max_completion_length) == ("builtin-kk", 128)
    assert (countdown.model, countdown.max_completion_length) == ("builtin", 64)
    mine = uft.parse_args(["--data", "kk", "--model", "builtin", "--max_completion_length", "9", *out])
    assert (mine.model, mine.max_completion_length) == ("builtin", 9)
    go, go_kk = sft_go.parse_args(out), sft_go.parse_args(["--data", "kk", *out])
    assert (go.model, go.max_completion_length, go.T) == ("builtin", 96, 100)
    assert (go_kk.model, go_kk.max_completion_length, go_kk.T) == ("builtin-kk", 128, 150)
    with pytest.raises(SystemExit):
        uft.parse_args(["--data", "kk", "--min_people", "4", "--max_people", "3", *out])


def test_kk_base_warms_up_on_puzzles_never_held_out():
    import uft
    recipe = {**uft.BASE_RECIPES["builtin-kk"], "num_problems": 40}
    rows = uft.warmup_rows(recipe)
    assert len(rows) == 40 and all(r["data_source"] == tasks.KK_SOURCE for r in rows)
    sizes = {len(r["ground_truth"]["names"]) for r in rows}
    assert sizes <= {recipe["min_people"], recipe["max_people"]} and len(sizes) == 2
    assert not any(tasks.is_kk_heldout(tasks.parse_kk_statements(r["ground_truth"]["statements"],
                                                                 len(r["ground_truth"]["names"])))
                   for r in rows)
