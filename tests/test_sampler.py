"""The hand-written sampler against transformers and against a no-cache reference loop."""
import pytest
import torch

import uft
from conftest import make_gpt2, make_llama

PROMPTS = ["12 + 7 =", "3", "the answer is <answer> 21", "5 + 1"]


def encode(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def completions(out):
    """Completion token lists, cut at each row's length."""
    return [out.ids[i, : out.lengths[i]].tolist() for i in range(out.ids.shape[0])]


def no_cache_greedy(model, prompt, n):
    """Reference: one prompt, no padding, no cache, full forward each step."""
    ids = torch.tensor([prompt])
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate_and_no_cache_loop(tokenizer, arch):
    model = (make_llama if arch == "llama" else make_gpt2)(tokenizer, seed=1)
    prompts = encode(tokenizer, PROMPTS)
    out = uft.generate(model, tokenizer, prompts, max_new_tokens=12, temperature=0)
    ids, mask = uft.left_pad(prompts, tokenizer.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    for row, got in enumerate(completions(out)):
        assert got == ref[row, : len(got)].tolist()
        assert got == no_cache_greedy(model, prompts[row], len(got))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_short_prompt_alone_equals_padded_in_batch(tokenizer, arch):
    model = (make_llama if arch == "llama" else make_gpt2)(tokenizer, seed=2)
    prompts = encode(tokenizer, PROMPTS)
    batch = completions(uft.generate(model, tokenizer, prompts, max_new_tokens=10, temperature=0))
    alone = completions(uft.generate(model, tokenizer, [prompts[1]], max_new_tokens=10, temperature=0))
    assert len(prompts[1]) < max(map(len, prompts))   # it really was padded in the batch
    assert batch[1] == alone[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampler_logprobs_equal_teacher_forced(tokenizer, arch):
    model = (make_llama if arch == "llama" else make_gpt2)(tokenizer, seed=3)
    prompts = encode(tokenizer, PROMPTS)
    T = 0.7
    out = uft.generate(model, tokenizer, prompts, num_generations=3, max_new_tokens=9, temperature=T,
                       generator=torch.Generator().manual_seed(0))
    full = [prompts[p] + c for p, c in zip(out.prompt_index.tolist(), completions(out))]
    ids, mask = uft.left_pad(full, tokenizer.pad_token_id)
    with torch.no_grad():
        scored = uft.sequence_logprobs(model, ids, mask, temperature=T)          # (N, S-1)
    for row, n in enumerate(out.lengths.tolist()):
        torch.testing.assert_close(scored[row, -n:], out.logprobs[row, :n], atol=1e-4, rtol=0)
    assert (out.logprobs[~out.mask] == 0).all()


def test_two_eos_ids_each_stop_a_row_and_finished_rows_never_change(tokenizer):
    model = make_llama(tokenizer, seed=4)
    prompts = encode(tokenizer, PROMPTS)
    free = uft.generate(model, tokenizer, prompts, max_new_tokens=10, temperature=0)
    stop_a, stop_b = free.ids[0, 2].item(), free.ids[2, 4].item()   # tokens greedy would emit at steps 3 and 5
    model.generation_config.eos_token_id = [stop_a, stop_b]
    try:
        out = uft.generate(model, tokenizer, prompts, max_new_tokens=10, temperature=0)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    stops = {stop_a, stop_b, tokenizer.eos_token_id}
    for row in range(len(prompts)):
        got, ref = completions(out)[row], completions(free)[row]
        first = next((i for i, t in enumerate(ref) if t in stops), None)
        assert got == ref[: first + 1] if first is not None else got == ref
        assert out.finished[row].item() == (first is not None)
        assert (out.ids[row, out.lengths[row]:] == tokenizer.pad_token_id).all()   # nothing after the stop
    assert out.lengths[0] <= 3 and out.finished[0]
    assert not free.finished.all()          # truncated rows are not counted as finished


def test_filter_top_p_keeps_the_crossing_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda p: torch.isfinite(uft.filter_top_k_top_p(logits, top_p=p))[0].tolist()
    assert keep(0.5) == [True, False, False, False]     # 0.5 alone reaches 0.5
    assert keep(0.51) == [True, True, False, False]     # 0.5 < 0.51: the token that crosses it stays
    assert keep(0.01) == [True, False, False, False]    # never empty
    assert keep(0.96) == [True, True, True, True]
    assert keep(1.0) == [True, True, True, True]


def test_filter_top_k_zero_is_off_and_k_keeps_k():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    assert torch.isfinite(uft.filter_top_k_top_p(logits, top_k=0)).all()
    assert torch.isfinite(uft.filter_top_k_top_p(logits, top_k=2))[0].tolist() == [False, True, True, False]
    assert torch.isfinite(uft.filter_top_k_top_p(logits, top_k=99)).all()


def test_top_k_one_and_temperature_zero_are_argmax(tokenizer):
    model = make_llama(tokenizer, seed=5)
    prompts = encode(tokenizer, PROMPTS)
    greedy = uft.generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0)
    topk1 = uft.generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.3, top_k=1,
                         generator=torch.Generator().manual_seed(1))
    assert completions(greedy) == completions(topk1)


def test_padded_vocabulary_ids_are_never_sampled(tokenizer):
    model = make_llama(tokenizer, seed=6, vocab_rows=len(tokenizer) + 64)
    with torch.no_grad():   # make the padded rows the most likely tokens by far
        model.get_output_embeddings().weight[len(tokenizer):] *= 0
        model.get_output_embeddings().weight[len(tokenizer):] += model.model.norm.weight * 0 + 5.0
    out = uft.generate(model, tokenizer, encode(tokenizer, PROMPTS), num_generations=4, max_new_tokens=8,
                       temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.ids[out.mask].max() < len(tokenizer)
    greedy = uft.generate(model, tokenizer, encode(tokenizer, PROMPTS), max_new_tokens=4, temperature=0)
    assert greedy.ids[greedy.mask].max() < len(tokenizer)


def test_seeded_runs_reproduce_and_seeds_differ(tokenizer, llama):
    run = lambda s: uft.generate(llama, tokenizer, encode(tokenizer, PROMPTS), num_generations=2,
                                 max_new_tokens=8, generator=torch.Generator().manual_seed(s))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.ids, c.ids)


def test_group_rows_draw_their_own_first_token(tokenizer, llama):
    out = uft.generate(llama, tokenizer, encode(tokenizer, PROMPTS[:1]), num_generations=16, max_new_tokens=2,
                       generator=torch.Generator().manual_seed(0))
    assert len(set(out.ids[:, 0].tolist())) > 1


def test_mode_is_restored_and_rollout_is_usable_in_autograd(tokenizer):
    model = make_llama(tokenizer, seed=7).train()
    prompts = encode(tokenizer, PROMPTS)
    out = uft.generate(model, tokenizer, prompts, max_new_tokens=5)
    assert model.training
    assert torch.is_grad_enabled()
    loss = model(input_ids=out.ids).logits.mean() * out.logprobs.sum()   # would fail on inference tensors
    loss.backward()
    model.eval()
    uft.generate(model, tokenizer, prompts, max_new_tokens=2)
    assert not model.training


def test_sample_next_draws_from_the_filtered_softmax():
    """Empirical frequencies of 40,000 draws match softmax(logits / T) after top-k; filtered ids never appear."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0, float("-inf")])
    n, T = 40_000, 0.8
    rows = logits.expand(n, -1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(uft.sample_next(rows, T, 0, 1.0, g), minlength=8).double()
    p = (logits / T).softmax(-1).double()
    assert counts[7] == 0                                              # probability 0 is never drawn
    assert ((counts / n - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all()
    counts = torch.bincount(uft.sample_next(rows, T, 3, 1.0, g), minlength=8).double()
    p3 = (logits[:3] / T).softmax(-1).double()
    assert counts[3:].sum() == 0 and ((counts[:3] / n - p3).abs() <= 4 * (p3 * (1 - p3) / n).sqrt()).all()


# --- each speed device equals its plain version ---------------------------------------------------------------

def early_stopping(model, tokenizer, prompts, max_new_tokens):
    """Stop ids that end some rows early: tokens greedy emits at step 2 of row 0 and step 4 of row 2."""
    free = uft.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0)
    return [free.ids[0, 1].item(), free.ids[2, 3].item()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropping_finished_rows_changes_no_output(tokenizer, arch, monkeypatch):
    """Rows leave the batch as they finish (live rows move into their cache slots): every row's ids, length,
    finished flag and log-probs equal those of its prompt sampled alone, where nothing is ever dropped."""
    model = (make_llama if arch == "llama" else make_gpt2)(tokenizer, seed=8)
    prompts = encode(tokenizer, PROMPTS)
    assert len(set(map(len, prompts))) > 1                     # different prompt lengths: left padding
    model.generation_config.eos_token_id = early_stopping(model, tokenizer, prompts, 12)
    real_drop, moved = uft.drop_finished, []

    def spy(cache, done):
        order = real_drop(cache, done)
        moved.append(int((order != torch.arange(len(order))).sum()))     # rows copied into a finished slot
        return order
    monkeypatch.setattr(uft, "drop_finished", spy)
    try:
        batch = uft.generate(model, tokenizer, prompts, num_generations=2, max_new_tokens=12, temperature=0)
        monkeypatch.setattr(uft, "drop_finished", real_drop)
        alone = [uft.generate(model, tokenizer, [p], max_new_tokens=12, temperature=0) for p in prompts]
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert moved and sum(moved) > 0                                           # the device really ran
    assert batch.finished.any() and not batch.finished.all()                  # some rows stopped early
    for row in range(batch.ids.shape[0]):
        ref, n = alone[row // 2], int(batch.lengths[row])
        assert n == int(ref.lengths[0]) and batch.finished[row] == ref.finished[0]
        assert batch.ids[row, :n].tolist() == ref.ids[0, :n].tolist()
        assert (batch.ids[row, n:] == tokenizer.pad_token_id).all()
        # a batch of another size may round differently (GPT-2: 1e-6): equal up to float32 rounding
        torch.testing.assert_close(batch.logprobs[row, :n], ref.logprobs[0, :n], atol=1e-5, rtol=1e-5)


def test_the_cache_is_allocated_once_and_written_in_place(tokenizer, llama):
    """Every decoding step reads views of the same buffers, (rows, heads, S + new, dim), as long as the
    tokens so far; the prefill wrote each prompt's keys to all of its G rows."""
    prompts = encode(tokenizer, PROMPTS)
    P, G, new = len(prompts), 3, 6
    with torch.inference_mode():
        logits, cache, mask, S = uft.prefill(llama, prompts, G, new, tokenizer.pad_token_id)
        buffers = [layer.keys.data_ptr() for layer in cache.layers]
        keys = cache.layers[0].keys                                        # (N, heads, S + new, dim)
        assert keys.shape[0] == P * G and keys.shape[2] == S + new
        assert torch.equal(keys[0::G, :, :S], keys[G - 1::G, :, :S])        # a group's rows share the prompt
        assert torch.equal(logits[0::G], logits[1::G])
        positions = mask[:, :S].sum(-1)
        for step in range(3):
            tok = logits.argmax(-1)
            logits = uft.decode_step(llama, tok, cache, mask[:, : S + step + 1], positions + step)
            assert cache.get_seq_length() == S + step + 1
        assert [layer.keys.data_ptr() for layer in cache.layers] == buffers


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    n, keep = counts.sum(), p > 0
    return float(((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum())


def test_inverse_cdf_draws_like_multinomial():
    """Both samplers match the probabilities (chi-square, 4 classes: 3 degrees of freedom, 99.9% at 16.3);
    zero-probability ids (first, middle, last) never appear; each row follows its own distribution."""
    p = torch.tensor([0.0, 0.1, 0.35, 0.0, 0.05, 0.5, 0.0])
    q = torch.tensor([0.25, 0.0, 0.0, 0.25, 0.0, 0.0, 0.5])
    n = 20_000
    probs = torch.stack([p, q]).repeat(n, 1)                               # rows alternate p, q
    draws = {"inverse_cdf": uft.draw_inverse_cdf(probs, torch.Generator().manual_seed(0)),
             "multinomial": torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(-1)}
    for name, ids in draws.items():
        assert ids.shape == (2 * n,) and ids.dtype == torch.long, name
        for row, dist in ((0, p), (1, q)):
            counts = torch.bincount(ids[row::2], minlength=7).double()
            assert (counts[dist == 0] == 0).all(), (name, row, counts)
            assert chi_square(counts, dist.double()) < 20.0, (name, row, counts)


def test_inverse_cdf_takes_unnormalised_rows_and_a_one_hot_row():
    g = torch.Generator().manual_seed(3)
    one_hot = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).repeat(500, 1)
    assert (uft.draw_inverse_cdf(one_hot, g) == 2).all()
    weights = torch.tensor([[2.0, 0.0, 6.0]]).repeat(20_000, 1)            # p = (1/4, 0, 3/4)
    counts = torch.bincount(uft.draw_inverse_cdf(weights, g), minlength=3).double()
    assert counts[1] == 0 and chi_square(counts, torch.tensor([0.25, 0.0, 0.75], dtype=torch.double)) < 11.0
