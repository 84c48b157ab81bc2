"""Autograder for the pieces of sft_go.py. Run one piece with `python -m pytest course -k <piece>`.

Expected values are worked out by hand in the comments, or are invariants; no reference implementation is
called.
"""
import math

import pytest
import torch

import sft_go
from course.grading import expect_close, expect_equal, expect_true


# --- tfidf_scores ---------------------------------------------------------------------------------------

def test_tfidf_scores_hand_computed():
    # n = 2 documents; df(a) = 1, df(b) = 2; idf(a) = ln(3/2) + 1 = 1.405465, idf(b) = ln(3/3) + 1 = 1
    got = sft_go.tfidf_scores([["a", "b", "a"], ["b"]])
    idf_a = math.log(3 / 2) + 1
    expect_equal([len(d) for d in got], [3, 1], "tfidf_scores: one score per term occurrence")
    expect_close(got[0], [2 * idf_a, 1.0, 2 * idf_a], "document ['a', 'b', 'a'] (tf(a) = 2)")
    expect_close(got[1], [1.0], "document ['b']")


def test_tfidf_scores_idf_from_other_documents():
    # idf from [['a'], ['a', 'b']]: n = 2, df(a) = 2 -> idf 1; 'c' never seen: df 0 -> ln(3) + 1 = 2.098612
    got = sft_go.tfidf_scores([["c", "a", "c"]], idf_docs=[["a"], ["a", "b"]])
    expect_close(got[0], [2 * (math.log(3) + 1), 1.0, 2 * (math.log(3) + 1)],
                 "tfidf_scores(['c', 'a', 'c'], idf_docs=[['a'], ['a', 'b']]) (an unseen term has df 0)")
    expect_equal(sft_go.tfidf_scores([[], ["x"]])[0], [], "an empty document has no scores")


# --- top_eta_groups -------------------------------------------------------------------------------------

def groups(scores, mask, eta, per="sample"):
    return sft_go.top_eta_groups(torch.tensor(scores), torch.tensor(mask).bool(), eta, per=per)


def test_top_eta_groups_hand_computed():
    # 4 supervised tokens, eta 0.5: the 2 best (0.9, 0.9) are important; the masked-out position is -1
    expect_equal(groups([[0.5, 0.9, 0.9, 0.1, 0.0]], [[1, 1, 1, 1, 0]], 0.5), [[0, 1, 1, 0, -1]],
                 "top_eta_groups, eta 0.5, scores [.5, .9, .9, .1 | masked]")
    # ties go to the earlier position
    expect_equal(groups([[1.0, 1.0, 1.0, 1.0]], [[1, 1, 1, 1]], 0.5), [[1, 1, 0, 0]],
                 "four equal scores, eta 0.5 (ties: the earlier positions are important)")
    # a high score on a masked position is never important: n = 2 supervised tokens, k = 1
    expect_equal(groups([[9.0, 1.0, 2.0]], [[0, 1, 1]], 0.5), [[-1, 0, 1]],
                 "the masked 9.0 is ignored; the best supervised token (2.0) is important")


def test_top_eta_groups_counts_per_row():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 11, generator=gen)
    mask = torch.arange(11)[None, :] < torch.tensor([1, 2, 3, 5, 10, 11])[:, None]
    got = sft_go.top_eta_groups(scores, mask, 0.3)
    # round(0.3 n), halves up, kept in [1, n - 1] for n >= 2: n = 1, 2, 3, 5, 10, 11 -> 0, 1, 1, 2, 3, 3
    expect_equal((got == 1).sum(-1), [0, 1, 1, 2, 3, 3], "important tokens per row, eta 0.3, "
                 "n = 1, 2, 3, 5, 10, 11 supervised tokens")
    expect_true(bool(((got == -1) == ~mask).all()), "eta 0.3", "-1 exactly where the mask is False")
    for r in range(6):
        n = int(mask[r].sum())
        best = set(scores[r, :n].argsort(descending=True)[: int((got[r] == 1).sum())].tolist())
        expect_true(set((got[r] == 1).nonzero().flatten().tolist()) == best, f"row {r}",
                    "the important tokens must be the highest-scoring ones")


def test_top_eta_groups_per_batch():
    # per="batch" ranks the batch's 4 tokens together: k = 2 -> 3 and 2, both in row 0
    expect_equal(groups([[3.0, 2.0], [1.0, 0.0]], [[1, 1], [1, 1]], 0.5, per="batch"), [[1, 1], [0, 0]],
                 "per='batch', eta 0.5 (one ranking over the whole batch)")
    expect_equal(groups([[3.0, 2.0], [1.0, 0.0]], [[1, 1], [1, 1]], 0.5), [[1, 0], [1, 0]],
                 "per='sample' (the default), eta 0.5 (each row its own best)")


# --- worst_group_loss -----------------------------------------------------------------------------------

LOSSES = torch.tensor([[1.0, 3.0, 2.0]])
MASK = torch.ones(1, 3, dtype=torch.bool)


def test_worst_group_loss_hand_computed():
    # CE = 2, L_0 = (1 + 2) / 2 = 1.5, L_1 = 3: worst is group 1; 0.1 * 2 + 0.9 * 3 = 2.9
    loss, stats = sft_go.worst_group_loss(LOSSES, torch.tensor([[0, 1, 0]]), MASK, 0.9)
    expect_close(loss, 2.9, "worst_group_loss([1, 3, 2], groups [0, 1, 0], lam 0.9)")
    expect_equal(stats["worst_group"], 1, "stats['worst_group']")
    expect_close([stats["ce"], stats["loss_unimportant"], stats["loss_important"]], [2.0, 1.5, 3.0],
                 "stats ce, loss_unimportant, loss_important")
    loss, _ = sft_go.worst_group_loss(LOSSES, torch.tensor([[0, 1, 0]]), MASK, 0.0)
    expect_close(loss, 2.0, "lam 0 is plain cross-entropy")


def test_worst_group_loss_empty_group_and_empty_batch():
    loss, stats = sft_go.worst_group_loss(LOSSES, torch.zeros(1, 3, dtype=torch.long), MASK, 0.9)
    expect_close(loss, 2.0, "all tokens unimportant: the empty group is left out, so L_GO = CE for any lam")
    expect_equal(stats["worst_group"], -1, "stats['worst_group'] with an empty group")
    with pytest.raises(ValueError):
        sft_go.worst_group_loss(LOSSES, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3).bool(), 0.9)


def test_worst_group_loss_masked_tokens_and_gradient_weights():
    x = torch.tensor([[1.0, 3.0, 2.0, 100.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    loss, _ = sft_go.worst_group_loss(x, torch.tensor([[0, 1, 0, 1]]), mask, 0.9)
    expect_close(loss.detach(), 2.9, "a masked token's loss (100) must not leak into any mean")
    (grad,) = torch.autograd.grad(loss, x)
    # N = 3 tokens, worst group has N_w = 1: (1 - lam) / N = 0.0333 everywhere, + lam / N_w = 0.9 on it
    expect_close(grad, [[0.1 / 3, 0.1 / 3 + 0.9, 0.1 / 3, 0.0]],
                 "d L_GO / d token loss (the gradient weights)")


def test_worst_group_loss_per_sample_and_weights():
    # per sample: CE = mean(2, 5) = 3.5; L_0 = mean(1, 5) = 3; L_1 = 3 (row 1 has no group-1 token)
    losses, mask = torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[True, True], [True, False]])
    two_rows = torch.tensor([[0, 1], [0, 0]])
    loss, _ = sft_go.worst_group_loss(losses, two_rows, mask, 0.5, reduce="per_sample")
    expect_close(loss, 0.5 * 3.5 + 0.5 * 3.0, "reduce='per_sample', lam 0.5")
    # weights (1, 0) replace the max by L_0: 0.1 * 2 + 0.9 * 1.5 = 1.55
    loss, _ = sft_go.worst_group_loss(LOSSES, torch.tensor([[0, 1, 0]]), MASK, 0.9,
                                      weights=torch.tensor([1.0, 0.0]))
    expect_close(loss, 1.55, "weights (1, 0): the weighted group mean replaces the max")
