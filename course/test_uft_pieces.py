"""Autograder for the pieces of uft.py. Run one piece with `python -m pytest course -k <piece>`.

Every expected value is worked out by hand in the comment beside it, or is an invariant the piece must
satisfy; nothing here calls a reference implementation, so the tests grade a student version as they grade
the solution.
"""
import math
import random

import pytest
import torch

import uft
from course.grading import expect_close, expect_equal, expect_true

INF = float("inf")


# --- filter_top_k_top_p: the sampler's filtering stage -------------------------------------------------

def test_filter_top_k_top_p_top_p_keeps_the_crossing_token():
    logits = torch.tensor([[2.0, 1.0, 0.0]])     # softmax: 0.665, 0.245, 0.090
    # top_p 0.5: the first token alone reaches 0.5 -> only it survives
    expect_equal(uft.filter_top_k_top_p(logits, top_p=0.5), [[2.0, -INF, -INF]], "top_p=0.5 on [2, 1, 0]")
    # top_p 0.7: 0.665 < 0.7, so the second token (which crosses 0.7) is kept too; the third is dropped
    expect_equal(uft.filter_top_k_top_p(logits, top_p=0.7), [[2.0, 1.0, -INF]],
                 "top_p=0.7 on [2, 1, 0] (the token that crosses the threshold must be kept)")


def test_filter_top_k_top_p_top_k():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    expect_equal(uft.filter_top_k_top_p(logits, top_k=2), [[-INF, 3.0, -INF, 2.0]], "top_k=2")
    expect_equal(uft.filter_top_k_top_p(logits, top_k=0), logits, "top_k=0 means off: nothing is filtered")
    expect_equal(uft.filter_top_k_top_p(logits, top_k=10), logits, "top_k larger than the vocabulary")


def test_filter_top_k_top_p_rows_are_independent_and_one_token_survives():
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0], [4.0, 0.0, 0.0, 0.0]])
    got = uft.filter_top_k_top_p(logits, top_p=0.5)
    expect_equal(got, [[-INF, -INF, -INF, 5.0], [4.0, -INF, -INF, -INF]], "top_p=0.5, each row its own best")
    tiny = uft.filter_top_k_top_p(torch.tensor([[1.0, 2.0, 3.0]]), top_p=1e-9)
    expect_equal(tiny, [[-INF, -INF, 3.0]], "top_p close to 0 still keeps the most likely token")
    both = uft.filter_top_k_top_p(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), top_k=3, top_p=0.7)
    # after top_k=3: softmax of [4, 3, 2] = 0.665, 0.245, 0.090 -> top_p 0.7 keeps 4 and 3
    expect_equal(both, [[4.0, 3.0, -INF, -INF]], "top_k=3 then top_p=0.7")
    expect_equal(uft.filter_top_k_top_p(logits), logits, "top_p=1 and top_k=0: unchanged")


# --- hint_fraction --------------------------------------------------------------------------------------

def test_hint_fraction_hand_computed_values():
    # p_low 0, p_high 1, T_hint 4: p(t) = (1 + cos(pi t / 4)) / 2
    for t, expected in [(1, (1 + math.sqrt(0.5)) / 2), (2, 0.5), (3, (1 - math.sqrt(0.5)) / 2), (4, 0.0)]:
        expect_close(uft.hint_fraction(t, 4, 0.0, 1.0), expected, f"hint_fraction({t}, T_hint=4, 0, 1)")
    # the defaults p_low 0.05, p_high 0.95: half-way is the mid-point 0.5, the end is p_low
    expect_close(uft.hint_fraction(150, 300), 0.5, "hint_fraction(150, T_hint=300), default p_low, p_high")
    expect_close(uft.hint_fraction(300, 300), 0.05, "hint_fraction(300, T_hint=300): the last hinted step")


def test_hint_fraction_is_zero_after_T_hint():
    for t in (301, 302, 1000):
        expect_close(uft.hint_fraction(t, 300), 0.0, f"hint_fraction({t}, T_hint=300): no hint after T_hint")
    expect_close(uft.hint_fraction(2, 1, 0.2, 0.8), 0.0, "hint_fraction(2, T_hint=1)")


def test_hint_fraction_invariants():
    p_low, p_high, T_hint = 0.1, 0.7, 50
    values = [uft.hint_fraction(t, T_hint, p_low, p_high) for t in range(1, T_hint + 1)]
    expect_true(all(a >= b for a, b in zip(values, values[1:])), "T_hint=50",
                "p(t) must never increase while hints last (a cosine decay)")
    for t in range(1, T_hint):       # cos(pi (T - t) / T) = -cos(pi t / T): p(t) + p(T - t) = p_low + p_high
        expect_close(values[t - 1] + values[T_hint - t - 1], p_low + p_high,
                     f"p({t}) + p({T_hint - t}) with p_low={p_low}, p_high={p_high} (cosine symmetry)")
    expect_close(uft.hint_fraction(3, 10, 0.3, 0.3), 0.3, "p_low = p_high = 0.3: constant 0.3")


# --- cut_points -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, max_chunks, expected", [
    (1, 5, [0, 1]),
    (3, 5, [0, 1, 2, 3]),                 # K = 3: every fragment is a chunk
    (5, 5, [0, 1, 2, 3, 4, 5]),
    (12, 5, [0, 2, 5, 7, 10, 12]),        # 12/5 = 2.4: round(2.4, 4.8, 7.2, 9.6) = 2, 5, 7, 10
    (6, 4, [0, 2, 3, 4, 6]),              # 6/4 = 1.5: round(1.5) = 2 and round(4.5) = 4 (halves to even)
    (7, 1, [0, 7]),                       # one chunk: all or nothing
])
def test_cut_points_hand_computed(n, max_chunks, expected):
    expect_equal(uft.cut_points(n, max_chunks), expected, f"cut_points({n}, max_chunks={max_chunks})")


def test_cut_points_invariants_and_no_fragments():
    expect_equal(uft.cut_points(0), [0], "cut_points(0): no fragment, the only hint is the empty one")
    for n in range(1, 40):
        cuts = uft.cut_points(n)
        case = f"cut_points({n})"
        expect_true(len(cuts) == min(5, n) + 1, case, f"needs K + 1 = {min(5, n) + 1} points, got {cuts}")
        expect_true(cuts[0] == 0 and cuts[-1] == n, case, f"must start at 0 and end at {n}, got {cuts}")
        expect_true(all(a < b for a, b in zip(cuts, cuts[1:])), case, f"must strictly increase, got {cuts}")


# --- sample_hint ----------------------------------------------------------------------------------------

FRAGMENTS = ["1 + 2 = 3\n", "3 * 4 = 12\n", "Therefore, ..."]


def test_sample_hint_staged_schedule_hand_computed():
    # 3 fragments: K = 3. staged: stage = T_hint // (K + 1) = 10 // 4 = 2 steps; k = K - t // 2
    rng = random.Random(0)
    expect_equal(uft.sample_hint(FRAGMENTS, "staged", 1, rng, T_hint=10),
                 ("".join(FRAGMENTS), 3, 1.0), "staged, t=1, T_hint=10: k = 3 - 0 = 3 (the whole hint)")
    expect_equal(uft.sample_hint(FRAGMENTS, "staged", 5, rng, T_hint=10),
                 (FRAGMENTS[0], 1, 1 / 3), "staged, t=5, T_hint=10: k = 3 - 2 = 1")
    expect_equal(uft.sample_hint(FRAGMENTS, "staged", 11, rng, T_hint=10),
                 ("", 0, 0.0), "staged, t=11 > T_hint: no hint")
    twelve = [f"f{i} " for i in range(12)]
    # 12 fragments: K = 5, cuts [0, 2, 5, 7, 10, 12]; stage = 12 // 6 = 2; t = 4: k = 5 - 2 = 3 -> 7 fragments
    expect_equal(uft.sample_hint(twelve, "staged", 4, rng, T_hint=12),
                 ("".join(twelve[:7]), 7, 0.6), "12 fragments, staged, t=4, T_hint=12: k = 3, cut 7")


def test_sample_hint_none_and_empty():
    expect_equal(uft.sample_hint(FRAGMENTS, "none", 1, random.Random(0)), ("", 0, 0.0),
                 "schedule 'none' (RFT)")
    expect_equal(uft.sample_hint([], "cosine", 1, random.Random(0)), ("", 0, 0.0),
                 "no fragments: an empty hint, fraction 0 (and no division by K = 0)")


def test_sample_hint_text_matches_its_cut_point():
    twelve = [f"f{i} " for i in range(12)]
    cuts = [0, 2, 5, 7, 10, 12]                      # worked out in test_cut_points_hand_computed
    rng, seen = random.Random(1), set()
    for t in range(1, 200):
        text, n, fraction = uft.sample_hint(twelve, "uniform", t, rng, T_hint=100)
        k = round(fraction * 5)
        case = f"uniform schedule, step {t}: got ({text!r}, {n}, {fraction})"
        expect_true(math.isclose(fraction * 5, k), case, "the fraction must be k / K with an integer k")
        expect_true(n == cuts[k], case, f"k = {k} chunks must span cuts[k] = {cuts[k]} fragments")
        expect_true(text == "".join(twelve[:n]), case, "the text must be the first n fragments joined")
        seen.add(k)
    expect_true(seen == set(range(6)), "uniform schedule", f"k must take all values 0-5, saw {sorted(seen)}")


# --- group_advantages -----------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    # [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.70711 -> +-0.5 / 0.70711 = +-0.70711
    expect_close(uft.group_advantages(torch.tensor([[1.0, 0.0]])), [[0.707106, -0.707106]],
                 "group_advantages([[1, 0]])", tol=1e-5)
    # [1, 0.1, 0.1, 0]: mean 0.3; deviations .7, -.2, -.2, -.3; unbiased var .66 / 3 = .22, std .469042
    expect_close(uft.group_advantages(torch.tensor([[1.0, 0.1, 0.1, 0.0]])),
                 [[1.492405, -0.426401, -0.426401, -0.639602]], "group_advantages([[1, .1, .1, 0]])",
                 tol=1e-5)


def test_group_advantages_equal_rewards_give_zero():
    got = uft.group_advantages(torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0]]))
    expect_close(got, torch.zeros(2, 3), "groups with equal rewards: no signal, A = 0 (and no NaN)")
    one = uft.group_advantages(torch.tensor([[1.0], [0.1]]))
    expect_close(one, torch.zeros(2, 1), "groups of one sample: A = 0, not NaN")
    for G in (8, 16):  # float32 rounding: the naive formula gives -0.0074 for each of eight 0.1s
        expect_close(uft.group_advantages(torch.full((1, G), 0.1)), torch.zeros(1, G),
                     f"{G} equal rewards of 0.1: exactly 0 (compute the statistics in float64)", tol=0)


def test_group_advantages_invariants():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.tensor([1.0, 0.1, 0.0])[torch.randint(0, 3, (20, 6), generator=gen)]
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0                        # every group has two different rewards
    A = uft.group_advantages(rewards)
    expect_true(A.shape == rewards.shape, "20 groups of 6", f"shape must stay (20, 6), got {tuple(A.shape)}")
    expect_close(A.sum(-1), torch.zeros(20), "sum of each group's advantages (must be 0)", tol=1e-5)
    expect_close(A.std(-1), torch.ones(20), "unbiased std of each group's advantages (must be ~1)", tol=1e-4)
    expect_close(uft.group_advantages(rewards * 10 + 3), A, "A must not change when rewards are scaled "
                 "and shifted (r -> 10 r + 3)", tol=1e-4)


# --- policy_gradient_loss -------------------------------------------------------------------------------

def pg_case(ratio, advantage, epsilon=0.2):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = uft.policy_gradient_loss(logp, torch.zeros(1, 1), torch.tensor([[advantage]]), epsilon)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return float(loss.detach()), float(grad)


@pytest.mark.parametrize("ratio, A, loss, grad", [
    (1.0, 1.0, -1.0, -1.0),       # rho = 1: the plain policy gradient, loss -A, d/dlogp = -A rho
    (1.5, 1.0, -1.2, 0.0),        # A > 0 above 1 + eps: clipped at 1.2, no gradient
    (1.5, -1.0, 1.5, 1.5),        # A < 0 above 1 + eps: the unclipped (pessimistic) term, gradient -A rho
    (0.5, 1.0, -0.5, -0.5),       # A > 0 below 1 - eps: unclipped, gradient -A rho = -0.5
    (0.5, -1.0, 0.8, 0.0),        # A < 0 below 1 - eps: clipped at 0.8, no gradient
])
def test_policy_gradient_loss_hand_computed(ratio, A, loss, grad):
    got_loss, got_grad = pg_case(ratio, A)
    expect_close(got_loss, loss, f"policy_gradient_loss at ratio {ratio}, A = {A}, epsilon 0.2")
    expect_close(got_grad, grad, f"d loss / d logp at ratio {ratio}, A = {A} (autograd of your loss)")


def test_policy_gradient_loss_is_per_token_and_broadcasts():
    logp = torch.zeros(2, 3)
    got = uft.policy_gradient_loss(logp, logp, torch.tensor([[2.0], [-1.0]]), 0.2)
    expect_equal(got.shape, (2, 3), "advantages (N, 1) with logp (N, L): the loss stays per token (N, L)")
    expect_close(got, [[-2.0] * 3, [1.0] * 3], "ratio 1 everywhere: each token's loss is -A of its row")


# --- kl_k3 ----------------------------------------------------------------------------------------------

def test_kl_k3_hand_computed():
    zero = torch.zeros(3)
    # x = ref - logp: x = 1 -> e - 2 = 0.718282; x = -1 -> 1/e = 0.367879; x = 0 -> 0
    expect_close(uft.kl_k3(zero, torch.tensor([1.0, -1.0, 0.0])), [math.e - 2, math.exp(-1), 0.0],
                 "kl_k3(logp=0, ref_logp=[1, -1, 0]) (x = ref_logp - logp, not the other way round)")
    expect_close(uft.kl_k3(torch.tensor([-2.0]), torch.tensor([-2.0])), [0.0], "equal log-probs: KL 0")


def test_kl_k3_is_clamped_without_gradient_beyond():
    logp = torch.zeros(2, requires_grad=True)
    kl = uft.kl_k3(logp, torch.tensor([5.0, 1.0]))           # e^5 - 6 = 142.4 -> clamped to 10
    expect_close(kl.detach(), [10.0, math.e - 2], "kl_k3 with x = 5 (clamped to KL_CLAMP = 10) and x = 1")
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    # d/dlogp (e^x - x - 1) = -(e^x - 1); clamped entries have none
    expect_close(grad, [0.0, -(math.e - 1)], "gradient of kl_k3 w.r.t. logp (0 where clamped)", tol=1e-5)


def test_kl_k3_never_negative():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    expect_true(bool((uft.kl_k3(logp, ref) >= 0).all()), "1000 random pairs",
                "exp(x) - x - 1 >= 0 for every x: the estimator is never negative")


# --- masked_nll -----------------------------------------------------------------------------------------

def test_masked_nll_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.1, 0.1]]))
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # two hint tokens: (ln 2 + ln 4) / 2 = 1.039721
    expect_close(uft.masked_nll(logp, mask), (math.log(2) + math.log(4)) / 2, "masked_nll over 2 tokens")
    # an accumulated mini-batch of 4 tokens: the same sum over 4
    expect_close(uft.masked_nll(logp, mask, num_tokens=4), (math.log(2) + math.log(4)) / 4,
                 "masked_nll with num_tokens=4 (the mini-batch's count is the denominator)")


def test_masked_nll_empty_mask_is_zero_with_a_graph():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    got = uft.masked_nll(logp, torch.zeros(1, 2, dtype=torch.bool))
    expect_close(got.detach(), 0.0, "masked_nll with no token (a batch without hints): 0, not NaN")
    expect_true(got.requires_grad, "masked_nll with no token", "must stay in the graph (backward must work)")


# --- rl_loss --------------------------------------------------------------------------------------------

def rl_case(**changes):
    logp = torch.zeros(2, 2)                                       # ratio 1 everywhere: PPO term = -A
    args = dict(logp=logp, old_logp=logp, ref_logp=None, entropy=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                hint_logp=torch.log(torch.tensor([[0.5, 1.0], [1.0, 1.0]])),
                response_mask=torch.tensor([[True, True], [True, False]]),
                hint_mask=torch.tensor([[True, False], [False, False]]), advantages=torch.tensor([1.0, -1.0]),
                epsilon=0.2, beta=0.0, entropy_coef=0.0, sft_loss_coef=0.0)
    args.update(changes)
    loss, terms = uft.rl_loss(**args)
    return float(loss), terms


def test_rl_loss_policy_term_only():
    # response tokens: row 0 two tokens with A = 1, row 1 one token with A = -1: (-1 - 1 + 1) / 3
    loss, terms = rl_case()
    expect_close(loss, -1 / 3, "rl_loss with only the PPO term (ratio 1, A = [1, -1], 3 response tokens)")
    expect_close(terms["pg_loss"], -1 / 3, "terms['pg_loss']")
    expect_true("kl" not in terms and "hint_nll" not in terms, "ref_logp=None, sft_loss_coef=0",
                f"no 'kl' or 'hint_nll' term is computed then; got terms {sorted(terms)}")
    loss, _ = rl_case(n_response=6)
    expect_close(loss, -1 / 6, "rl_loss with n_response=6 (a micro-batch of a 6-token mini-batch)")


def test_rl_loss_hint_nll_term():
    # one hint token of probability 0.5: NLL ln 2, times sft_loss_coef 0.5
    loss, terms = rl_case(sft_loss_coef=0.5)
    expect_close(loss, -1 / 3 + 0.5 * math.log(2), "rl_loss = PPO -1/3 + 0.5 * hint NLL ln 2")
    expect_close(terms["hint_nll"], math.log(2), "terms['hint_nll'] (the NLL itself, before its coefficient)")
    loss, _ = rl_case(sft_loss_coef=0.5, n_hint=2)
    expect_close(loss, -1 / 3 + 0.5 * math.log(2) / 2, "rl_loss with n_hint=2 (the mini-batch's hint count)")


def test_rl_loss_kl_and_entropy_terms():
    # ref_logp = logp + 1: x = 1 on every token, k3 = e - 2; beta 0.5 adds 0.5 (e - 2) per token on average
    loss, terms = rl_case(ref_logp=torch.ones(2, 2), beta=0.5)
    expect_close(loss, -1 / 3 + 0.5 * (math.e - 2), "rl_loss with beta 0.5 and x = 1 on every token")
    expect_close(terms["kl"], math.e - 2, "terms['kl'] (the token-mean k3 over response tokens)")
    # entropy on response tokens 1, 2, 3 (the 4 is padding): mean 2; coefficient 0.1 subtracts 0.2
    loss, terms = rl_case(entropy_coef=0.1)
    expect_close(loss, -1 / 3 - 0.2, "rl_loss with entropy_coef 0.1 (mean response entropy 2)")
    expect_close(terms["entropy"], 2.0, "terms['entropy'] (padding excluded)")


def test_rl_loss_gradient_reaches_only_response_and_hint_tokens():
    logp = torch.zeros(2, 2, requires_grad=True)
    hint_logp = torch.log(torch.tensor([[0.5, 1.0], [1.0, 1.0]])).requires_grad_(True)
    response_mask = torch.tensor([[True, True], [True, False]])
    hint_mask = torch.tensor([[True, False], [False, False]])
    loss, _ = uft.rl_loss(logp, logp.detach(), None, torch.zeros(2, 2), hint_logp, response_mask, hint_mask,
                          torch.tensor([1.0, -1.0]), epsilon=0.2, beta=0.0, entropy_coef=0.0,
                          sft_loss_coef=1.0)
    g_logp, g_hint = torch.autograd.grad(loss, [logp, hint_logp])
    # d/dlogp of -rho A / 3 at rho = 1 is -A / 3 on response tokens; d/dhint_logp of -logp / 1 is -1
    expect_close(g_logp, [[-1 / 3, -1 / 3], [1 / 3, 0.0]], "gradient w.r.t. logp (0 on the padding token)")
    expect_close(g_hint, [[-1.0, 0.0], [0.0, 0.0]], "gradient w.r.t. hint_logp (only the hint token)")
