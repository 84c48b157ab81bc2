"""The search-tree task (`--data tree`) and the loop options the theorem experiment uses."""
import collections

import pytest

import common
import tasks
import uft
from conftest import save_tiny_model, uft_flags as flags


def test_each_tree_has_its_own_fixed_path_of_the_right_shape():
    paths = {i: tasks.tree_path(i, 3, 6) for i in range(200)}
    assert all(len(p) == 6 and set(p) <= set("abc") for p in paths.values())
    assert paths == {i: tasks.tree_path(i, 3, 6) for i in range(200)}         # stable across calls
    assert len(set(paths.values())) > 150                                     # 729 leaves: few collisions
    first = collections.Counter(p[0] for p in paths.values())
    assert min(first.values()) > 40                                           # about uniform over a, b, c


def test_the_id_ranges_never_overlap_and_a_seed_draws_from_its_own():
    test, val = set(tasks.tree_ids(50, 0, "test")), set(tasks.tree_ids(50, 0, "validation"))
    assert not test & val
    lo, hi = tasks.TREE_IDS["warmup"]
    warm = {r["ground_truth"]["tree_id"] for r in tasks.tree_warmup_rows(500, seed=1)}
    assert all(lo <= i < hi for i in warm)
    assert tasks.tree_ids(3, 1, "test") != tasks.tree_ids(3, 2, "test")


def test_reward_levels():
    row = tasks.make_tree_row(7, 3, "caab")
    q, gt = row["question"], row["ground_truth"]
    assert tasks.reward(row, q + row["answer"]) == 1.0
    assert tasks.reward(row, q + " c a a b .\n") == 1.0                  # trailing whitespace is fine
    assert tasks.reward(row, q + " a a a a .") == 0.1                    # well-formed, another leaf
    assert tasks.tree_reward(q + " c a a .", gt) == 0.0                  # one level short
    assert tasks.tree_reward(q + " c a a b b .", gt) == 0.0              # one level too many
    assert tasks.tree_reward(q + " c a a d .", gt) == 0.0                # d is not a choice when B = 3
    assert tasks.tree_reward(q + " c a a b", gt) == 0.0                  # no closing "."
    assert tasks.tree_reward(q + " caab .", gt) == 0.0                   # one word per level
    assert tasks.tree_reward(" c a a b .", gt) == 0.0                    # no prompt: no answer


def test_hint_fragments_are_the_path_one_choice_each():
    row = tasks.make_tree_row(3, 2, "abba")
    assert tasks.answer_pieces(row) == [" a", " b", " b", " a", " ."]
    text, n, frac = uft.sample_hint(row["hint"], "cosine", 1, __import__("random").Random(0), 10, 1.0, 1.0)
    assert (text, n, frac) == (" a b b a", 4, 1.0)


def test_split_trains_and_evaluates_on_the_same_trees():
    train, test = tasks.tree_split(4, 99, seed=0, B=2, H=5)
    assert train == test and len(train) == 4
    assert all(r["ground_truth"]["path"] == tasks.tree_path(r["ground_truth"]["tree_id"], 2, 5) for r in train)


def test_a_file_of_tree_rows_loads_and_a_bad_path_names_its_row(tmp_path):
    rows = tasks.generate_trees(3, 0, 3, 4)
    good = tmp_path / "trees.jsonl"
    common.rewrite_jsonl(good, rows)
    assert tasks.load_task_rows(str(good)) == rows
    rows[1]["ground_truth"]["path"] = "abz"
    bad = tmp_path / "bad.jsonl"
    common.rewrite_jsonl(bad, rows)
    with pytest.raises(ValueError, match=r"row 1.*ground_truth.path"):
        tasks.load_task_rows(str(bad))


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory):
    rows = tasks.tree_warmup_rows(300, seed=0)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-tree"), rows, vocab_size=300)


def test_sft_on_one_tree_stops_when_it_reaches_the_target(tree_dir, tmp_path):
    out = tmp_path / "sft"
    args = flags(tree_dir, out, "--data", "tree", "--tree_height", "2", "--tree_branching", "2", "--num_train",
                 "1", "--batch_size", "1", "--mini_batch_size", "1", "--algo", "sft", "--T", "60",
                 "--eval_steps", "1", "--learning_rate", "1e-2", "--sft_learning_rate", "1e-2", "--stop_at", "1")
    assert uft.main(args) == 0
    metrics = common.read_jsonl(out / "metrics.jsonl")
    assert metrics[-1]["eval_accuracy"] == 1.0 and metrics[-1]["step"] < 60      # stopped at the target
    assert all(m["eval_accuracy"] < 1.0 for m in metrics[1:-1])


def test_silent_updates_are_skipped_only_when_asked(tree_dir, tmp_path):
    # G = 2 on a tiny random model: most groups have equal rewards (both 0), so most updates are silent
    base = ["--data", "tree", "--tree_height", "3", "--num_train", "2", "--batch_size", "2", "--algo", "rft",
            "--num_generations", "2", "--mini_batch_size", "1", "--T", "6", "--beta", "0.1"]
    counts = {}
    for skip in (False, True):
        out = tmp_path / f"skip{skip}"
        assert uft.main(flags(tree_dir, out, *base, *(["--skip_silent_updates"] if skip else []))) == 0
        rl = [m for m in common.read_jsonl(out / "metrics.jsonl") if m.get("phase") == "rl"]
        counts[skip] = (sum(m["updates"] for m in rl), sum(m["zero_std_groups"] for m in rl) * 2)
    updates, silent = counts[True]
    assert counts[False][0] == 12                              # 6 steps x 2 updates, silent or not
    assert silent > 0 and updates == 12 - silent               # exactly the updates whose groups had A = 0
