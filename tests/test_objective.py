"""Hint schedule and the policy-gradient objective, term by term."""
import math
import random

import pytest
import torch

import uft


def test_hint_fraction_at_the_named_points():
    lo, hi, T = 0.05, 0.95, 300
    assert uft.hint_fraction(1, T, lo, hi) == pytest.approx(lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi / T)))
    assert uft.hint_fraction(1, T, lo, hi) > 0.94                 # starts near p_high
    assert uft.hint_fraction(T // 2, T, lo, hi) == pytest.approx((lo + hi) / 2)
    assert uft.hint_fraction(T, T, lo, hi) == pytest.approx(lo)   # cos(pi) = -1
    assert uft.hint_fraction(T + 1, T, lo, hi) == 0.0
    values = [uft.hint_fraction(t, T, lo, hi) for t in range(1, T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))        # monotone decay


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_binomial_hint_length_has_mean_p_times_K(p):
    rng, K, n = random.Random(0), 4, 20000
    T_hint = 1000
    t = next(t for t in range(1, T_hint + 1) if uft.hint_fraction(t, T_hint) <= p)   # a step where p(t) ~ p
    q = uft.hint_fraction(t, T_hint)
    draws = [uft.hint_chunks("cosine", t, K, rng, T_hint, 0.05, 0.95) for _ in range(n)]
    assert sum(draws) / n == pytest.approx(q * K, abs=4 * math.sqrt(K * q * (1 - q) / n))
    assert set(draws) <= set(range(K + 1))


@pytest.mark.parametrize("n", range(1, 13))
def test_cut_points(n):
    cuts = uft.cut_points(n)
    K = min(5, n)
    assert len(cuts) == K + 1 and cuts[0] == 0 and cuts[-1] == n
    assert all(a < b for a, b in zip(cuts, cuts[1:]))               # strictly increasing: every chunk non-empty
    assert cuts == [round(i * n / K) for i in range(K)] + [n]


def test_hints_are_prefixes_and_never_contain_the_answer():
    frags = ["1 + 2 = 3\n", "3 * 4 = 12\n", "Therefore, the final equation is (1 + 2) * 4"]
    rng = random.Random(0)
    for schedule in uft.SCHEDULES:
        for t in (1, 50, 100, 200):
            hint, n, frac = uft.sample_hint(frags, schedule, t, rng, T_hint=100)
            assert hint == "".join(frags[:n])
            assert "".join(frags).startswith(hint) and "<answer>" not in hint and "</think>" not in hint
            assert 0 <= frac <= 1
    assert uft.sample_hint(frags, "none", 1, rng)[0] == ""
    assert uft.sample_hint(frags, "cosine", 101, rng, T_hint=100)[0] == ""     # no hint after T_hint
    staged = [uft.hint_chunks("staged", t, 3, rng, 100, 0, 1) for t in range(1, 101)]
    assert staged[0] == 3 and staged[-1] == 0 and all(a >= b for a, b in zip(staged, staged[1:]))
    uniform = [uft.hint_chunks("uniform", 1, 3, rng, 100, 0, 1) for _ in range(2000)]
    assert set(uniform) == {0, 1, 2, 3}


def test_group_advantages():
    r = torch.tensor([[1.0, 0.1, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1]])
    a = uft.group_advantages(r)
    assert torch.allclose(a[0], (r[0] - r[0].mean()) / (r[0].std(unbiased=True) + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))
    assert a[0].sum().abs() < 1e-5


@pytest.mark.parametrize("G", [8, 16])
def test_equal_float32_rewards_give_exactly_zero_advantage(G):
    r = torch.full((3, G), 0.1)                      # float32 0.1: the naive mean and std are off by ~1e-8
    naive = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)
    assert naive.abs().max() > 1e-3                  # the rounding this guards against is real here
    assert torch.equal(uft.group_advantages(r), torch.zeros(3, G))
    mixed = torch.cat([torch.full((1, G), 0.1), torch.tensor([[1.0] + [0.1] * (G - 1)])])
    a = uft.group_advantages(mixed)
    assert torch.equal(a[0], torch.zeros(G)) and a[1, 0] > 0 and abs(float(a[1].sum())) < 1e-5


def terms(logp, old, adv, ref, mask, eps=0.2, beta=0.1):
    pg = uft.policy_gradient_loss(logp, old, adv, eps)
    return uft.masked_sum(pg + beta * uft.kl_k3(logp, ref), mask) / mask.sum()


def test_equal_rewards_give_zero_policy_gradient():
    logp = torch.randn(4, 6, requires_grad=True)
    adv = uft.group_advantages(torch.full((1, 4), 0.1)).view(4, 1)
    uft.masked_sum(uft.policy_gradient_loss(logp, logp.detach(), adv), torch.ones(4, 6, dtype=torch.bool)).backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    x = torch.randn(3, 5)
    assert torch.equal(uft.kl_k3(x, x), torch.zeros_like(x))
    assert (uft.kl_k3(x, x + 0.3) > 0).all()
    y = torch.randn(3, 5, requires_grad=True)
    uft.kl_k3(y, y.detach()).sum().backward()
    assert torch.allclose(y.grad, torch.zeros_like(y))            # zero gradient at equality too


def test_ppo_clip_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.5, 0.0, -0.5]], requires_grad=True)   # ratios e^.5 > 1.2, 1, e^-.5 < .8
    uft.policy_gradient_loss(logp, old, torch.ones(1, 1), 0.2).sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0


def test_token_entropy_matches_definition():
    logits = torch.randn(2, 3, 7)
    p = logits.softmax(-1)
    torch.testing.assert_close(uft.token_entropy(logits), -(p * p.log()).sum(-1))
    assert torch.allclose(uft.token_entropy(torch.zeros(1, 8)), torch.tensor([math.log(8)]))
    assert torch.isfinite(uft.token_entropy(torch.randn(1, 8), vocab_size=5)).all()   # -inf padded ids


def test_hint_nll_of_no_tokens_is_zero_not_nan():
    logp = torch.randn(2, 3, requires_grad=True)
    loss = uft.masked_nll(logp, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0 and not torch.isnan(loss)
    loss.backward()


def untouched(t):
    return t.grad is None or bool((t.grad == 0).all())


def test_each_term_touches_only_its_tokens(tokenizer, llama):
    """Autograd on the per-token log-probs: NLL only on hint positions, PG/KL only on response positions."""
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7], [5, 6, 7, 8]]
    hint_lengths = [2, 0, 1]
    targets = [[10, 11, 12], [13], [14, 15]]
    batch = uft.make_batch(prompts, targets, hint_lengths, tokenizer.pad_token_id,
                           advantages=torch.tensor([1.0, -0.5, 0.3]))
    hint_logp, logp, _ = uft.score(llama, batch, 1.0, len(tokenizer))
    assert hint_logp.shape == (3, 2) and logp.shape == (3, 3)
    hint_logp.retain_grad(), logp.retain_grad()
    n_resp, n_hint = int(batch.target_mask.sum()), int(batch.hint_mask.sum())
    uft.masked_nll(hint_logp, batch.hint_mask, n_hint).backward(retain_graph=True)
    assert ((hint_logp.grad != 0) == batch.hint_mask).all() and untouched(logp)
    hint_logp.grad = logp.grad = None
    ref = logp.detach() - 0.1
    loss = uft.masked_sum(uft.policy_gradient_loss(logp, logp.detach() + 0.05, batch.advantages[:, None])
                          + 0.1 * uft.kl_k3(logp, ref), batch.target_mask) / n_resp
    loss.backward()
    assert ((logp.grad != 0) == batch.target_mask).all()
    assert untouched(hint_logp)
    # the hint mask marks exactly the last hint_length prompt tokens
    assert batch.hint_mask.tolist() == [[True, True], [False, False], [False, True]]
    H = batch.hint_mask.shape[1]
    S = batch.ids.shape[1] - batch.target_mask.shape[1]
    assert batch.ids[0, S - H:S].tolist() == [8, 9] and batch.ids[2, S - 1].item() == 8


def test_score_equals_sequence_logprobs(tokenizer, llama):
    batch = uft.make_batch([[5, 6, 7, 8, 9], [5, 6]], [[10, 11], [12]], [1, 1], tokenizer.pad_token_id)
    hint_logp, logp, _ = uft.score(llama, batch, 0.8, len(tokenizer))
    full = uft.sequence_logprobs(llama, batch.ids, batch.attention, 0.8, len(tokenizer))
    torch.testing.assert_close(logp, full[:, -2:])
    torch.testing.assert_close(hint_logp, full[:, -3:-2])


def grouped_batch(tokenizer, G=3):
    """Two prompts (different lengths and hints), G sampled targets of different lengths each."""
    prompts, hints = [[5, 6, 7, 8, 9, 10], [5, 6, 7]], [2, 1]
    targets = [[11, 12, 13, 14], [15], [16, 17], [18, 19, 20, 21, 22], [23, 24], [25]][: 2 * G]
    return uft.make_batch([p for p in prompts for _ in range(G)], targets, [h for h in hints for _ in range(G)],
                          tokenizer.pad_token_id, advantages=torch.linspace(-1, 1, 2 * G))


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_shared_prompt_scoring_equals_one_pass(tokenizer, model_name, request):
    """group_size=G runs each prompt once and copies its cache: same log-probs, entropies and gradients."""
    model = request.getfixturevalue(model_name)
    batch, V = grouped_batch(tokenizer), len(tokenizer)
    results = {}
    for G in (1, 3):
        model.zero_grad()
        hint_logp, logp, entropy = uft.score(model, batch, 0.7, V, with_entropy=True, group_size=G)
        (uft.masked_sum(logp * torch.arange(1.0, 1.0 + logp.shape[1]), batch.target_mask)   # unequal weights
         + uft.masked_sum(hint_logp, batch.hint_mask) - uft.masked_sum(entropy, batch.target_mask)).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[G] = (hint_logp * batch.hint_mask, logp * batch.target_mask, entropy * batch.target_mask, grads)
    for one, shared in zip(results[1][:3], results[3][:3]):
        torch.testing.assert_close(shared, one, atol=1e-5, rtol=1e-5)
    assert len(results[1][3]) == len(results[3][3]) > 0
    for one, shared in zip(results[1][3], results[3][3]):      # float rounding, relative to each tensor's scale
        assert (shared - one).abs().max() <= 1e-4 * one.abs().max() + 1e-7


def test_rows_cut_padding_and_keep_token_alignment(tokenizer, llama):
    """Batch.rows cuts columns no chosen row uses; targets stay left-aligned and hints right-aligned."""
    batch, V = grouped_batch(tokenizer), len(tokenizer)
    part = batch.rows(torch.arange(3, 6))              # the short prompt's group: prompt 3, hint 1, targets <= 5
    assert part.ids.shape == (3, 3 + 5) and part.hint_mask.shape == (3, 1) and part.target_mask.shape == (3, 5)
    short = batch.rows(torch.tensor([1, 5]))           # one-token targets from both prompts
    assert short.target_mask.shape == (2, 1) and short.ids.shape[1] == 6 + 1
    for index in (torch.arange(3, 6), torch.tensor([1, 5])):
        cut = batch.rows(index)
        hint_full, logp_full, _ = uft.score(llama, batch, 1.0, V)
        hint_cut, logp_cut, _ = uft.score(llama, cut, 1.0, V)
        L, H = cut.target_mask.shape[1], cut.hint_mask.shape[1]
        torch.testing.assert_close(logp_cut * cut.target_mask, (logp_full * batch.target_mask)[index, :L])
        torch.testing.assert_close(hint_cut * cut.hint_mask,
                                   (hint_full * batch.hint_mask)[index][:, hint_full.shape[1] - H:])
        assert (cut.target_mask == batch.target_mask[index, :L]).all()
        assert (cut.advantages == batch.advantages[index]).all()


def test_shared_prompt_scoring_refuses_groups_with_different_prompts(tokenizer, llama):
    batch = grouped_batch(tokenizer)                  # two groups of 3 rows
    with pytest.raises(ValueError, match="do not share their prompt"):
        uft.score(llama, batch, 1.0, len(tokenizer), group_size=2)


# --- rl_loss, the k3 clamp and the clip fraction against hand arithmetic ------------------------------------

def rl_case():
    """2 rows x 3 response tokens (the last of row 1 masked), advantages (+1, -1), eps 0.2.

    log-ratios logp - old_logp:  row 0 (0.0, 0.3, -0.5): ratio 1, e^.3 = 1.35 > 1.2 (clipped: A > 0), e^-.5 = 0.61
                                 (below 0.8 but A > 0: not clipped); row 1 (-0.5, 0.1, [0.7]): e^-.5 < 0.8
                                 (clipped: A < 0), e^.1 = 1.11 inside.
    x = ref_logp - logp:         row 0 (0, 0.5, -0.4); row 1 (1, 3 (k3 = e^3 - 4 = 16.1, clamped to 10), [5]).
    hint: 2 columns, row 1's first masked.
    """
    f = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    logp = f([[-1.0, -0.5, -2.0], [-1.7, -3.5, -6.0]]).requires_grad_()
    old = f([[-1.0, -0.8, -1.5], [-1.2, -3.6, -6.7]])
    ref = f([[-1.0, 0.0, -2.4], [-0.7, -0.5, -1.0]])
    entropy = f([[1.0, 2.0, 0.5], [1.5, 0.25, 100.0]]).requires_grad_()
    hint_logp = f([[-0.4, -1.6], [-3.0, -0.9]]).requires_grad_()
    response_mask = torch.tensor([[True, True, True], [True, True, False]])
    hint_mask = torch.tensor([[True, True], [False, True]])
    return logp, old, ref, entropy, hint_logp, response_mask, hint_mask, f([1.0, -1.0])


COEFS = dict(epsilon=0.2, beta=0.1, entropy_coef=0.01, sft_loss_coef=0.5)
e = math.exp
# per unmasked response token, in order (0,0) (0,1) (0,2) (1,0) (1,1):
PG = [-1.0,                # -min(1 * 1, 1 * 1)
      -1.2,                # -min(e^.3, 1.2): the clipped branch
      -e(-0.5),            # -min(e^-.5, 0.8): the unclipped branch
      0.8,                 # -min(-e^-.5, -0.8): the clipped branch
      e(0.1)]              # -min(-e^.1, -e^.1)
KL = [0.0, e(0.5) - 1.5, e(-0.4) + 0.4 - 1, e(1.0) - 2, 10.0]
ENT = [1.0, 2.0, 0.5, 1.5, 0.25]
HINT_NLL_SUM = 0.4 + 1.6 + 0.9                     # row 1's -3.0 is masked


def test_rl_loss_matches_hand_arithmetic():
    logp, old, ref, entropy, hint_logp, rmask, hmask, adv = rl_case()
    loss, terms = uft.rl_loss(logp, old, ref, entropy, hint_logp, rmask, hmask, adv, **COEFS)
    n, n_h = 5, 3
    assert terms["pg_loss"] == pytest.approx(sum(PG) / n, rel=1e-6)
    assert terms["kl"] == pytest.approx(sum(KL) / n, rel=1e-6)
    assert terms["entropy"] == pytest.approx(sum(ENT) / n, rel=1e-6)
    assert terms["clip_fraction"] == pytest.approx(2 / n)
    assert terms["hint_nll"] == pytest.approx(HINT_NLL_SUM / n_h, rel=1e-6)
    expected = (sum(PG) + 0.1 * sum(KL) - 0.01 * sum(ENT)) / n + 0.5 * HINT_NLL_SUM / n_h
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    # d/dlogp: PG -A * ratio where unclipped, 0 where clipped; KL beta (1 - e^x) where unclamped, 0 past the clamp
    grad = [[-1.0 + 0.1 * (1 - 1), 0.0 + 0.1 * (1 - e(0.5)), -e(-0.5) + 0.1 * (1 - e(-0.4))],
            [0.0 + 0.1 * (1 - e(1.0)), e(0.1) + 0.0, 0.0]]
    torch.testing.assert_close(logp.grad, torch.tensor(grad, dtype=torch.float64) / n)
    torch.testing.assert_close(entropy.grad, -0.01 * rmask.double() / n)
    torch.testing.assert_close(hint_logp.grad, -0.5 * hmask.double() / n_h)


def test_rl_loss_divides_by_the_given_token_counts():
    """A micro-batch of a larger mini-batch: the sums are the same, the denominators are the mini-batch's."""
    logp, old, ref, entropy, hint_logp, rmask, hmask, adv = rl_case()
    loss, terms = uft.rl_loss(logp, old, ref, entropy, hint_logp, rmask, hmask, adv, **COEFS,
                              n_response=10, n_hint=6)
    assert loss.item() == pytest.approx((sum(PG) + 0.1 * sum(KL) - 0.01 * sum(ENT)) / 10 + 0.5 * HINT_NLL_SUM / 6,
                                        rel=1e-9)
    assert terms["pg_loss"] == pytest.approx(sum(PG) / 10, rel=1e-6)
    assert terms["kl"] == pytest.approx(sum(KL) / 10, rel=1e-6)
    assert terms["clip_fraction"] == pytest.approx(2 / 10)
    assert terms["hint_nll"] == pytest.approx(HINT_NLL_SUM / 6, rel=1e-6)


def test_rl_loss_without_reference_or_hint_term():
    logp, old, _, entropy, hint_logp, rmask, hmask, adv = rl_case()
    loss, terms = uft.rl_loss(logp, old, None, entropy, hint_logp, rmask, hmask, adv,
                              **dict(COEFS, sft_loss_coef=0.0))
    assert "kl" not in terms and "hint_nll" not in terms
    assert loss.item() == pytest.approx((sum(PG) - 0.01 * sum(ENT)) / 5, rel=1e-9)
    loss, _ = uft.rl_loss(logp, old, None, entropy, hint_logp, rmask, hmask, adv, **dict(COEFS, entropy_coef=0.0))
    assert loss.item() == pytest.approx(sum(PG) / 5 + 0.5 * HINT_NLL_SUM / 3, rel=1e-9)


def kl_at(x):
    """k3 and its gradient with respect to logp at x = ref_logp - logp (logp = 0)."""
    logp = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    value = uft.kl_k3(logp, torch.tensor([x], dtype=torch.float64))
    value.sum().backward()
    return value.item(), logp.grad.item()


def test_kl_k3_clamps_at_ten_with_no_gradient_past_it():
    value, grad = kl_at(3.0)                      # e^3 - 4 = 16.1
    assert value == 10.0 and grad == 0.0
    value, grad = kl_at(2.0)                      # just inside: e^2 - 3 = 4.39
    assert value == pytest.approx(math.exp(2) - 3, rel=1e-12)
    assert grad == pytest.approx(-(math.exp(2) - 1), rel=1e-12)   # d/dlogp (e^x - x - 1) = -(e^x - 1)
    value, grad = kl_at(2.6)                      # e^2.6 - 3.6 = 9.86: still below the clamp
    assert value == pytest.approx(math.exp(2.6) - 3.6, rel=1e-12) and grad != 0.0
    for x in (-1.0, -5.0, -10.0):                 # the lower side grows like -x: unclamped for moderate x
        value, grad = kl_at(x)
        assert value == pytest.approx(math.exp(x) - x - 1, rel=1e-12)
        assert grad == pytest.approx(1 - math.exp(x), rel=1e-12)
    assert kl_at(-12.0) == (10.0, 0.0)            # e^-12 + 11 > 10: clamped too
    assert math.isfinite(kl_at(80.0)[0]) and kl_at(80.0) == (10.0, 0.0)


def test_clipped_fraction_flags_exactly_the_active_clips():
    eps = 0.2
    d = torch.tensor([[0.3, -0.3, 0.1, 0.0],      # A > 0: only ratio e^.3 > 1.2 is clipped (e^-.3 < .8 is not)
                      [0.3, -0.3, -0.1, 0.0],     # A < 0: only ratio e^-.3 < 0.8 is clipped
                      [0.3, -0.3, 0.1, 0.0]])     # A = 0: nothing
    old = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([[1.0], [-2.0], [0.0]])
    flagged = uft.clipped_fraction(old + d, old, adv, eps)
    assert flagged.tolist() == [[True, False, False, False], [False, True, False, False], [False] * 4]
    logp = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    assert not uft.clipped_fraction(logp, logp, torch.randn(5, 1), eps).any()   # one update: ratio 1


def test_clipped_tokens_are_the_ones_without_a_policy_gradient():
    g = torch.Generator().manual_seed(2)
    old = torch.randn(6, 9, generator=g)
    logp = (old + 0.4 * torch.randn(6, 9, generator=g)).requires_grad_()
    adv = torch.randn(6, 1, generator=g)
    uft.policy_gradient_loss(logp, old, adv, 0.2).sum().backward()
    flagged = uft.clipped_fraction(logp.detach(), old, adv, 0.2)
    assert 0 < int(flagged.sum()) < flagged.numel()
    assert torch.equal(flagged, logp.grad == 0)


def test_kl_k3_gradient_stays_finite_far_past_the_clamp():
    logp = torch.zeros(2, requires_grad=True)                     # float32, as score returns
    value = uft.kl_k3(logp, torch.tensor([50.0, 100.0]))
    value.sum().backward()
    assert value.tolist() == [10.0, 10.0]
    assert torch.equal(logp.grad, torch.zeros(2))


def plain_rows(batch, index):
    """The plain version of Batch.rows: every tensor sliced by rows, the whole batch's widths kept."""
    return uft.Batch(batch.ids[index], batch.attention[index], batch.target_mask[index], batch.hint_mask[index],
                     batch.advantages[index])


@pytest.mark.parametrize("index, G", [([3, 4, 5], 3), ([0, 1, 2], 3), ([1, 5], 1), ([4, 0, 2], 1)])
def test_cut_rows_score_like_plain_slicing(tokenizer, llama, index, G):
    """score on batch.rows(index) equals score on x[index] after aligning columns ([:, :L] targets,
    [:, -H:] hints), gradients included; the columns the cut drops hold no masked token."""
    batch, V, index = grouped_batch(tokenizer), len(tokenizer), torch.tensor(index)
    results = []
    for part in (batch.rows(index), plain_rows(batch, index)):
        llama.zero_grad()
        hint_logp, logp, entropy = uft.score(llama, part, 0.9, V, with_entropy=True, group_size=G)
        weights = torch.arange(1.0, 1.0 + logp.shape[1])              # unequal weights per column
        (uft.masked_sum(logp * weights, part.target_mask) + uft.masked_sum(hint_logp, part.hint_mask)
         - uft.masked_sum(entropy, part.target_mask)).backward()
        results.append((part, hint_logp.detach(), logp.detach(), entropy.detach(),
                        [p.grad.clone() for p in llama.parameters()]))
    (cut, h_cut, lp_cut, ent_cut, g_cut), (plain, h_plain, lp_plain, ent_plain, g_plain) = results
    L, H = cut.target_mask.shape[1], cut.hint_mask.shape[1]
    assert cut.ids.shape[1] < plain.ids.shape[1]                     # the cut really drops columns
    assert not plain.target_mask[:, L:].any() and not plain.hint_mask[:, : plain.hint_mask.shape[1] - H].any()
    assert torch.equal(cut.target_mask, plain.target_mask[:, :L])
    assert torch.equal(cut.hint_mask, plain.hint_mask[:, plain.hint_mask.shape[1] - H:])
    assert torch.equal(cut.advantages, plain.advantages)
    torch.testing.assert_close(lp_cut * cut.target_mask, (lp_plain * plain.target_mask)[:, :L], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_cut * cut.target_mask, (ent_plain * plain.target_mask)[:, :L],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_cut * cut.hint_mask, (h_plain * plain.hint_mask)[:, h_plain.shape[1] - H:],
                               atol=1e-5, rtol=1e-5)
    for a, b in zip(g_cut, g_plain):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7
    llama.zero_grad()
