"""The released scorers' levels on hand-written cases, one (or more) per kind of input on which the project's
scorers once disagreed with the released ones; each case says why the released rule gives its level. Also:
rows no scorer could score are refused by the loader, and every scorer stays fast on long adversarial text."""
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import tasks  # noqa: E402

BOUND_SECONDS = 2.0     # generous: every call below takes milliseconds

# --- K&K --------------------------------------------------------------------------------------------------

GT = {"names": ["Liam", "Zoey", "Ava"], "solution": [True, False, True]}
RIGHT = "(1) Liam is a knight\n(2) Zoey is a knave\n(3) Ava is a knight"
Q = "User: who is who?\nAssistant: Let me solve this step by step.\n<think> "
CHAT = "<|im_start|>user\nwho is who?<|im_end|>\n<|im_start|>assistant\n<think> "    # a chat-template prompt


@pytest.mark.parametrize("text, level", [
    # an unknown person added: 4 role words for 3 inhabitants fail the counting rule
    (Q + f"</think> <answer> {RIGHT}\n(4) Mia is a knave </answer>", 0.1),
    # a name stated twice with opposite roles: 4 role words again (the first statement alone would be right)
    (Q + f"<answer> {RIGHT}\n(4) Liam is a knave </answer>", 0.1),
    # an extra note: "knights" counts as one more role word, plural or not
    (Q + f"<answer> {RIGHT}\n(Knights always tell the truth.) </answer>", 0.1),
    # two blocks, the last one empty: the last block is the answer, and an empty one is no answer
    (Q + f"<answer> {RIGHT} </answer> <answer></answer>", 0.0),
    # the chat header opens the answer when the text has no "Assistant:"
    (CHAT + f"</think> <answer> {RIGHT} </answer>", 1.0),
    (CHAT + f"<answer> {RIGHT.replace('Zoey is a knave', 'Zoey is a knight')} </answer>", 0.1),
    (f"<|im_start|>assistant\n<answer> {RIGHT} </answer>"[:24], 0.0),         # the header, then no answer
    # tabs and non-breaking spaces are whitespace for \s
    (Q + "<answer> Liam\tis a\u00a0knight, Zoey is\ta knave, Ava is a knight </answer>", 1.0),
    # an empty and a blank answer: no answer (K&K only)
    (Q + "<answer></answer>", 0.0),
    (Q + "<answer> \n\t </answer>", 0.0),
    # a stray <answer> in the thinking opens a block that runs to the first </answer>: it swallows the
    # thinking's "Liam is a knight?" (4 role words)
    (Q + f"maybe <answer> Liam is a knight? </think>\n<answer> {RIGHT} </answer>", 0.1),
    # ... and with no role word in the thinking, the swallowed block still holds the right answer
    (Q + f"maybe <answer> let me see </think>\n<answer> {RIGHT} </answer>", 1.0),
    # Python's case folding: the Kelvin sign K lower-cases to k (count) and matches k (re.IGNORECASE)
    (Q + f"<answer> {RIGHT.replace('Liam is a knight', 'Liam is a ' + chr(0x212A) + 'night')} </answer>", 1.0),
    # the long s matches s under re.IGNORECASE ("iſ" reads as "is")
    (Q + f"<answer> {RIGHT.replace('Zoey is', 'Zoey i' + chr(0x17F))} </answer>", 1.0),
    # dotless i and long s inside a name match i and s as well
    (Q + f"<answer> {RIGHT.replace('Liam', 'L' + chr(0x131) + 'am')} </answer>", 1.0),
    # a Cyrillic a is no a: the role word is not found, nor counted
    (Q + f"<answer> {RIGHT.replace('knave', 'kn' + chr(0x430) + 've')} </answer>", 0.1),
    # "Assistant:" first: a chat header after it does not move the answer's start
    (Q + f"<answer> {RIGHT} </answer>" + "<|im_start|>assistant <answer> x </answer>", 0.1),
])
def test_kk_released_levels(text, level):
    assert tasks.kk_reward(text, GT) == level


# --- MATH -------------------------------------------------------------------------------------------------

MATH_Q = "User: compute.\nAssistant: Let me solve this step by step.\n<think> "


@pytest.mark.parametrize("completion, target, level", [
    ("<answer> 5\\!000 </answer>", "5000", 1.0),                  # \! (a negative thin space) is dropped
    ("<answer> 5000 </answer>", "5\\!000", 1.0),                  # ... in the target as well
    ("<answer> \\\\frac{1}{2} </answer>", "\\frac{1}{2}", 1.0),   # \\ becomes \ before the other rules
    ("<answer> \\frac12 </answer>", "\\\\dfrac{1}{2}", 1.0),      # a target written with \\ too
    ("<answer> 90 </answer>", "90\\text{ square\nunits}", 1.0),   # newlines in a target are dropped first
    ("<answer> tfrac{1}{2} </answer>", "frac{1}{2}", 1.0),        # tfrac -> frac, with or without a backslash
    # the standard code fails on a \frac with nothing after it: raw strings are compared, and differ
    ("<answer> x = 2\\frac </answer>", "2\\frac", 0.1),
    # one '/' between non-integers: int() fails, raw strings compared ('x/ 2' is not 'x/2')
    ("<answer> x/ 2 </answer>", "x/2", 0.1),
    ("<answer> x/2 </answer>", "x/2", 1.0),
    ("<answer> 3 </answer>\n", "3", 0.0),                         # the answer must be on the last line
])
def test_math_released_levels(completion, target, level):
    assert tasks.math_reward(MATH_Q + completion, target) == level


def test_math_chat_header_opens_the_answer():
    # no "Assistant:" in a chat-template prompt: the text after the first <|im_start|>assistant is read
    assert tasks.math_reward(CHAT + "</think>\n<answer> \\dfrac12 </answer>", "\\frac{1}{2}") == 1.0
    assert tasks.math_reward(CHAT + "</think>\n<answer> 0.25 </answer>", "\\frac{1}{2}") == 0.1
    assert tasks.math_reward("<|im_start|>assistant", "\\frac{1}{2}") == 0.0


# --- countdown and the numeric sources ------------------------------------------------------------------------

def test_countdown_chat_header_and_released_levels():
    nums, target = [44, 19, 35], 98
    assert tasks.countdown_reward(CHAT + "<answer> 44 + (19 + 35) </answer>", nums, target) == 1.0
    assert tasks.countdown_reward(CHAT + "<answer> 44 + 19 - 35 </answer>", nums, target) == 0.1
    assert tasks.countdown_reward(CHAT + "44 + (19 + 35)", nums, target) == 0.0


@pytest.mark.parametrize("completion, level", [
    ("<answer> 42 </answer>", 1.0),
    ("<answer> 42.000001 </answer>", 1.0),          # within 1e-5
    ("<answer> 42.0001 </answer>", 0.1),
    ("<answer> 4_2 </answer>", 1.0),                # Python's float() reads '_' between digits
    ("<answer> \uff14\uff12 </answer>", 1.0),        # ... and fullwidth (any unicode) digits
    ("<answer> 4.2e1 </answer>", 1.0),
    ("<answer> 1,042 </answer>", 0.1),              # not a float: extracted but wrong
    ("<answer> $42 </answer>", 0.1),
    ("<answer></answer>", 0.1),                     # extracted (empty), not a number
    ("<answer> nan </answer>", 0.1),
    ("<answer> 42 </answer>\nDone.", 0.0),          # not on the last line
    ("42", 0.0),
])
def test_numeric_released_levels(completion, level):
    assert tasks.numeric_reward(MATH_Q + completion, "42") == level
    assert tasks.reward({"data_source": "openai/gsm8k", "target": 42.0}, MATH_Q + completion) == level


def test_released_source_mapping():
    expected = {"openai/gsm8k": "numeric", "aime": "numeric", "amc": "numeric",
                "DigitalLearningGmbH/MATH-lighteval": "math", "math500": "math", "minerva": "math",
                "olympiad_bench": "math", "countdown": "countdown", "kk_logic": "kk",
                "my_countdown_v2": "countdown", "kk_logic_5ppl": "kk", "gsm8k": None, "AIME": None}
    assert {s: tasks.task_of({"data_source": s}) for s in expected} == expected


# --- every accepted row can be scored (issue 32): refused rows name their row and field ----------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_negative_countdown_numbers_are_refused(tmp_path):
    # today's scorer reads '-5 + 3' as the numbers 5 and 3: the row's own answer scored 0.1
    row = {**tasks.generate_countdown(1, seed=0)[0], "nums": [-5, 3], "target": -2}
    with pytest.raises(ValueError, match=r"neg\.jsonl: row 0 \(counting from 0\): field 'nums' must not hold a "
                                         r"negative number"):
        tasks.load_task_rows(write_jsonl(tmp_path / "neg.jsonl", [row]))


@pytest.mark.parametrize("names, why", [
    (["Zo\u00eb", "Ben"], "not one word of ASCII letters"),       # the released reader drops 'ë'
    (["Ava (the elder)", "Ben"], "not one word of ASCII letters"),
    (["Mary Ann", "Ben"], "not one word of ASCII letters"),       # the released reader takes 'Mary'
    (["Ava", "Ava"], "repeats a name"),
    (["Ava", "AVA"], "repeats a name"),                           # the name patterns ignore case
    (["Knightley", "Ben"], "contains 'knight'"),                   # the role count would be off
])
def test_kk_names_the_released_rule_cannot_score_are_refused(tmp_path, names, why):
    row = tasks.generate_kk(1, seed=3, min_people=2, max_people=2)[0]
    gt = row["ground_truth"]
    gt["solution_text_format"] = tasks.kk_solution_text(names, gt["solution"])
    row = {**row, "ground_truth": {**gt, "names": names}}
    with pytest.raises(ValueError, match=rf"row 0 \(counting from 0\): field 'ground_truth.names' .*{why}"):
        tasks.load_task_rows(write_jsonl(tmp_path / "names.jsonl", [row]))


def test_kk_solution_text_must_match_names_and_solution(tmp_path):
    row = tasks.generate_kk(1, seed=3, min_people=2, max_people=2)[0]
    row["ground_truth"]["solution_text_format"] = "(1) Somebody is a knight\n(2) Else is a knave"
    with pytest.raises(ValueError, match="solution_text_format"):
        tasks.load_task_rows(write_jsonl(tmp_path / "text.jsonl", [row]))


def test_deeply_nested_statements_are_refused_not_a_memory_error(tmp_path):
    row = tasks.generate_kk(1, seed=3, min_people=2, max_people=2)[0]
    deep = "(" * 5_000 + "('lying', 0)" + ")" * 5_000
    row["ground_truth"]["statements"] = f"({deep}, ('lying', 1))"
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"row 0 .*'ground_truth'.*nested at most"):
        tasks.load_task_rows(write_jsonl(tmp_path / "deep.jsonl", [row]))
    assert time.perf_counter() - start < BOUND_SECONDS


def test_a_file_without_a_scorable_row_is_one_line(tmp_path):
    rows = [{**r, "data_source": "some/benchmark"} for r in tasks.generate_countdown(3, seed=0)]
    with pytest.raises(ValueError, match=r"none of its 3 rows can be scored: data_source 'some/benchmark'") as e:
        tasks.load_task_rows(write_jsonl(tmp_path / "unknown.jsonl", rows))
    assert "\n" not in str(e.value)
    math_row = {"question": "q", "hint": ["h"], "answer": "a", "data_source": "math500", "level": "Level 1",
                "reward_model": {"ground_truth": {"target": "1"}}}
    with pytest.raises(ValueError, match="no MATH row has a level in --math_levels"):
        tasks.load_task_rows(write_jsonl(tmp_path / "levels.jsonl", [math_row]), math_levels={3})


def test_uft_refuses_a_file_without_a_scorable_row_in_one_line(tmp_path, capsys):
    import uft
    rows = [{**r, "data_source": "some/benchmark"} for r in tasks.generate_countdown(3, seed=0)]
    path = write_jsonl(tmp_path / "unknown.jsonl", rows)
    assert uft.main(["--data", path, "--output_dir", str(tmp_path / "run"), "--T", "1", "--T_hint", "1"]) == 2
    err = capsys.readouterr().err
    assert "none of its 3 rows can be scored" in err.splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("target", ["1,000", "", float("nan"), True, [3]])
def test_numeric_rows_need_a_numeric_target(tmp_path, target):
    row = {"question": "q", "hint": ["h"], "answer": "a", "data_source": "aime",
           "reward_model": {"ground_truth": {"target": target}}}
    with pytest.raises(ValueError, match=r"row 0 .*field 'target'"):
        tasks.check_rows([row], "f.jsonl")


# --- bounded time on long adversarial text -------------------------------------------------------------------

LONG = ["<answer>" * 20_000, "Assistant:" * 20_000, "<|im_start|>assistant" * 10_000,
        "<answer> " + "Liam is a " * 10_000 + " </answer>", "<answer> " + "9" * 200_000 + " </answer>",
        "<answer> " + "\\frac" * 20_000 + "/" + "1" * 5_000 + " </answer>",
        "<answer> " + "knight " * 30_000 + "</answer>", "<answer>" + " \u00a0" * 50_000 + "</answer>"]


@pytest.mark.parametrize("body", LONG, ids=range(len(LONG)))
def test_every_scorer_is_fast_on_long_text(body):
    for score in (lambda t: tasks.kk_reward(t, GT), lambda t: tasks.math_reward(t, "\\frac{1}{2}"),
                  lambda t: tasks.numeric_reward(t, "42"), lambda t: tasks.countdown_reward(t, [1, 2], 3)):
        start = time.perf_counter()
        assert score(Q + body) in (0.0, 0.1, 1.0)
        assert time.perf_counter() - start < BOUND_SECONDS
