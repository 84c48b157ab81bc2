"""UFT: Unifying Supervised and Reinforcement Fine-Tuning (Liu, Farina, Ozdaglar; arXiv 2505.16984).

UFT is GRPO-style RL whose prompts carry a hint, a prefix of the reference solution: the hint shrinks over
training (cosine decay) and its tokens get a log-likelihood term. One loop runs it and its baselines
(sft, rft, sft-rft, r3). docs/method.md states every formula; tasks live in tasks.py, shared loading code
in common.py.

Reading order (the method first, support code after the banner):
    1. the sampler                 Rollout, filter_top_k_top_p, sample_next, prefill, decode_step, generate
    2. hints                       hint_fraction, cut_points, hint_chunks, sample_hint
    3. the objective's terms       group_advantages, policy_gradient_loss, kl_k3, masked_nll, rl_loss
    4. batches and scoring         Batch, make_batch, grouped_forward_logits, score
    5. training and evaluation     rollout, rl_update, sft_update, training_step, train, evaluate
    --- support code ---           model loading, the built-in model, run folder, command line

Run:
    python uft.py                                   # CPU: UFT on the built-in model and countdown, minutes
    python uft.py --model Qwen/Qwen2.5-0.5B --device cuda --dtype bfloat16   # one GPU, a hub model
    python uft.py --model <dir> --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf   # a GGUF checkpoint
    torchrun --nproc_per_node 4 uft.py --model Qwen/Qwen2.5-1.5B --device cuda --bf16   # 4 GPUs (README)
    python uft.py --help                            # every flag with its default
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

import common
import tasks
from common import (DTYPES, UserError, add_flags, append_jsonl, backward,  # noqa: F401
                    build_tokenizer, find_gguf_package_dir, frozen_copy, make_optimizer, mask_padded_vocab,
                    micro_batches, optimizer_step, plot_panels, quiet_libraries, read_jsonl, rows_for_step,
                    save_atomically, stop_token_ids, tiny_llama_config, widen)
from tasks import (REWARD_CORRECT, answer_token_ids, countdown_question, countdown_reward,  # noqa: F401
                   countdown_split, countdown_validation, generate_countdown, load_task_rows, solve_countdown)


# ==========================================================================================================
# 1. The sampler: the paper's rollouts (G per hinted prompt), a KV-cached decoder written out
# ==========================================================================================================

@dataclasses.dataclass
class Rollout:
    """What `generate` returns: N = num_prompts * G rows; row p*G + g is sample g of prompt p."""
    prompt_index: torch.Tensor  # (N,) long: which prompt the row continues
    ids: torch.Tensor           # (N, L) long: completion tokens (a sampled EOS included), then pad
    lengths: torch.Tensor       # (N,) long: completion length, counting the EOS
    finished: torch.Tensor      # (N,) bool: stopped by an EOS; False = truncated at max_new_tokens
    logprobs: torch.Tensor      # (N, L) float32: log pi(token) at the sampling temperature, 0 after `lengths`

    @property
    def mask(self) -> torch.Tensor:
        """(N, L) bool: True on completion tokens, built from lengths (never from ids != pad)."""
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None, :] < self.lengths[:, None]

    def record(self, step: int, rows: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor,
               stops: torch.Tensor) -> torch.Tensor:
        """Write one step's tokens of the batch (batch row i is output row rows[i]); returns (n,) bool: the
        rows that sampled an EOS id, now finished (their EOS stays a response token)."""
        self.ids[rows, step] = tokens
        self.logprobs[rows, step] = logprobs
        self.lengths[rows] += 1
        done = torch.isin(tokens, stops)                                           # (n,)
        self.finished[rows[done]] = True
        return done

    def trimmed(self) -> "Rollout":
        """Cut to the longest completion; cloned outside inference mode, so the tensors can join autograd."""
        width = int(self.lengths.max()) if self.lengths.numel() else 0
        return Rollout(self.prompt_index, self.ids[:, :width].clone(), self.lengths.clone(),
                       self.finished.clone(), self.logprobs[:, :width].clone())


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, mask), both (B, S): the last column is every row's last real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only: left padding must not move the first token off position 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                   vocab_size: int | None = None) -> torch.Tensor:
    """log softmax(logits / T)[id]: the one definition shared by sampling and scoring (T = 0 scores at T = 1).

    logits (..., V) and ids (...) -> (...) float32.
    """
    scale = temperature if temperature > 0 else 1.0
    logits = mask_padded_vocab(logits.float() / scale, vocab_size)
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the k best logits (top_k = 0: all) and the smallest set whose probability reaches top_p.

    The token that crosses the top_p threshold is kept, so at least one token always survives.
    >>> filter_top_k_top_p(torch.tensor([[2.0, 1.0, 0.0]]), top_p=0.5)   # p = .67, .24, .09
    tensor([[2., -inf, -inf]])
    """
    # BEGIN SOLUTION: top_k best logits (0: all), then the smallest top_p set (crossing token kept)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]          # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs                     # (B, V) probability of better tokens
        drop_sorted = mass_before >= top_p                         # the crossing token is kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
    # END SOLUTION


def draw_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of (B, V) probabilities -> (B,) ids, by inverting the cumulative distribution.

    Saves: one uniform number per row instead of `torch.multinomial(probs, 1)`'s one per vocabulary entry (a
    visible part of a decoding step for a small model). A token of probability 0 is never picked: its
    cumulative value equals its predecessor's, so the predecessor is found first.
    """
    cdf = probs.cumsum(-1)                                                                  # (B, V)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids. temperature 0 is argmax; otherwise top-k/top-p, then a draw."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_top_k_top_p(logits.float() / temperature, top_k, top_p).softmax(-1)    # (B, V)
    return draw_inverse_cdf(probs, generator)


def sample_with_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) logits -> (n,) next ids and (n,) their `token_logprobs` at the temperature, from one log-softmax.

    Saves: `sample_next` then `token_logprobs` pass over the (n, V) logits about ten times; here the draw
    reads exp(log-probs) (top-k/top-p off) and the log-probs are gathered from the same table. Filtering
    log-probs equals filtering logits / T (both are monotone in the logits; softmax ignores the shift).
    """
    logp = (logits.float() / (temperature or 1.0)).log_softmax(-1)                          # (n, V)
    if temperature == 0:
        tokens = logits.argmax(-1)
    elif top_k == 0 and top_p >= 1.0:
        tokens = draw_inverse_cdf(logp.exp(), generator)
    else:
        tokens = sample_next(logp, 1.0, top_k, top_p, generator)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def preallocated_cache(rows: int, width: int, group_size: int):
    """A transformers `Cache` whose layers keep keys and values in one buffer each, (rows, heads, width,
    head_dim), allocated at the first write and then written in place; attention reads `[:n, :, :length]`,
    the n rows still in the batch up to the tokens written so far.

    The first write (the prefill of P = rows / group_size prompts) is copied to each prompt's G rows.
    Saves: transformers' `DynamicCache` concatenates the whole past at every token (a copy that grows with
    the length: O(L^2) per completion) and copies the whole cache again to drop rows.
    """
    from transformers.cache_utils import Cache, CacheLayerMixin

    class Layer(CacheLayerMixin):
        is_sliding = False

        def lazy_initialization(self, key_states, value_states):
            heads = key_states.shape[1]
            self.keys = key_states.new_empty((rows, heads, width, key_states.shape[-1]))
            self.values = value_states.new_empty((rows, heads, width, value_states.shape[-1]))
            self.length, self.is_initialized = 0, True

        def update(self, key_states, value_states, *args, **kwargs):
            new = key_states.shape[2]                                       # states: (n, heads, new, dim)
            if not self.is_initialized:                                     # the prefill: P prompts
                self.lazy_initialization(key_states, value_states)
                self.keys[:, :, :new].unflatten(0, (-1, group_size)).copy_(key_states[:, None])
                self.values[:, :, :new].unflatten(0, (-1, group_size)).copy_(value_states[:, None])
                self.length = new
                return key_states, value_states
            n, end = key_states.shape[0], self.length + new
            self.keys[:n, :, self.length: end] = key_states
            self.values[:n, :, self.length: end] = value_states
            self.length = end
            return self.keys[:n, :, :end], self.values[:n, :, :end]

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

        def get_max_length(self) -> int:
            return width

    return Cache(layer_class_to_replicate=Layer)


def prefill(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, pad_id: int):
    """Run each prompt once, its keys/values written to its G rows: (first logits (N, V), cache, mask, S).

    Saves: G - 1 of every G prompt passes (the plain version runs all N = P * G rows). Each row then draws
    its own first token; the mask (N, S + max_new_tokens) serves every later step: the prompt's, then ones.
    """
    ids, mask = left_pad(prompts, pad_id, next(model.parameters()).device)        # (P, S)
    N, S = ids.shape[0] * group_size, ids.shape[1]
    cache = preallocated_cache(N, S + max_new_tokens, group_size)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (P, V)
    mask = torch.cat([mask.repeat_interleave(group_size, 0), mask.new_ones((N, max_new_tokens))], 1)
    return logits.repeat_interleave(group_size, 0), cache, mask, S


def decode_step(model, tokens: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor):
    """One token per row on top of the cache: tokens, positions (n,), mask (n, past + 1) -> logits (n, V)."""
    return model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                 past_key_values=cache, use_cache=True).logits[:, -1]


def drop_finished(cache, done: torch.Tensor) -> torch.Tensor:
    """Shrink the batch to its unfinished rows, in place: returns `order` (n_live,), the old batch row that
    each new batch row holds (gather every per-row tensor with it).

    Each finished row inside the new, shorter batch is overwritten by a live row from behind it, so a step
    copies as many cache rows as rows finished, never the whole cache. Saves: the finished rows' share of
    every later step; the plain version keeps every row to the end and ignores the finished ones' tokens.
    """
    live = ~done
    n = int(live.sum())
    holes = done[:n].nonzero().squeeze(-1)              # finished rows that stay inside the shorter batch
    movers = live[n:].nonzero().squeeze(-1) + n         # live rows behind it: as many as there are holes
    for layer in cache.layers:
        for buffer in (layer.keys, layer.values):
            buffer[holes, :, : layer.length] = buffer[movers, :, : layer.length]
    order = torch.arange(n, device=done.device)
    order[holes] = movers
    return order


def generate(model, tokenizer, prompts, *, num_generations: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> Rollout:
    """Sample `num_generations` completions per prompt (token lists, or strings) with a KV cache.

    Left-padded prompts, position ids counting real tokens, one `prefill` per prompt, then one `decode_step`
    per token into a cache allocated once; a row stops at any EOS id and leaves the batch at once
    (`drop_finished`). Log-probs are those of the temperature-scaled distribution (before top-k/top-p), the
    quantity `score` computes by teacher forcing. Ids >= len(tokenizer) (padded vocabulary) are never drawn.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings or token-id lists, not one string")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
               for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    device, N, vocab = next(model.parameters()).device, len(prompts) * num_generations, len(tokenizer)
    stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    out = empty_rollout(len(prompts), num_generations, max_new_tokens, pad_id, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits, cache, mask, S = prefill(model, prompts, num_generations, max_new_tokens, pad_id)
            rows = torch.arange(N, device=device)                            # (n,) output row of each batch row
            positions = mask[:, :S].sum(-1)                                   # (n,) next position of each row
            for step in range(max_new_tokens):
                tok, logp = sample_with_logprobs(logits[:, :vocab], temperature, top_k, top_p, generator)
                done = out.record(step, rows, tok, logp, stops)
                if step == max_new_tokens - 1 or done.all():
                    break
                if done.any():
                    order = drop_finished(cache, done)
                    rows, tok, positions, mask = rows[order], tok[order], positions[order], mask[order]
                logits = decode_step(model, tok, cache, mask[:, : S + step + 1], positions)
                positions = positions + 1
    finally:
        model.train(was_training)
    return out.trimmed()


# ==========================================================================================================
# 2. Hints: the paper's cosine-decayed hint fraction p(t) and hint length k ~ Binomial(K, p(t))
# ==========================================================================================================

SCHEDULES = ("cosine", "uniform", "staged", "none")


ALGOS = {  # algo -> (hint schedule, hint NLL on?); sft and sft-rft's first phase train on full answers
    "sft": (None, False), "rft": ("none", False), "sft-rft": ("none", False),
    "r3": ("uniform", False), "uft": ("cosine", True)}


def hint_fraction(t: int, T_hint: int, p_low: float = 0.05, p_high: float = 0.95) -> float:
    """Expected revealed fraction of the solution at step t (t counts from 1); 0 after T_hint.

    p(t) = p_low + 1/2 (p_high - p_low) (1 + cos(pi t / T_hint))
    >>> [round(hint_fraction(t, 300), 3) for t in (1, 150, 300, 301)]
    [0.95, 0.5, 0.05, 0.0]
    """
    # BEGIN SOLUTION: p(t) = p_low + (p_high - p_low)(1 + cos(pi t / T_hint)) / 2; 0.0 after T_hint
    if t > T_hint:
        return 0.0
    return p_low + 0.5 * (p_high - p_low) * (1 + math.cos(math.pi * t / T_hint))
    # END SOLUTION


def cut_points(num_fragments: int, max_chunks: int = 5) -> list[int]:
    """The K + 1 places a hint may end, in fragments: c_i = round(i * n / K), K = min(max_chunks, n).

    >>> cut_points(3), cut_points(12)
    ([0, 1, 2, 3], [0, 2, 5, 7, 10, 12])
    """
    # BEGIN SOLUTION: [round(i * n / K) for i < K] + [n], K = min(max_chunks, n); [0] when n = 0
    K = min(max_chunks, num_fragments)
    return [round(i * num_fragments / K) for i in range(K)] + [num_fragments] if K else [0]
    # END SOLUTION


def hint_chunks(schedule: str, t: int, K: int, rng: random.Random, T_hint: int, p_low: float,
                p_high: float) -> int:
    """How many of the K chunks to reveal at step t: the schedule's one random (or fixed) choice.

    cosine: k ~ Binomial(K, p(t)) (UFT); uniform: k ~ U{0..K} (R3); none: 0 (RFT);
    staged: K - floor(t / floor(T_hint / (K + 1))), clipped to [0, K].
    """
    if schedule == "cosine":
        p = hint_fraction(t, T_hint, p_low, p_high)
        return sum(rng.random() < p for _ in range(K))
    if schedule == "uniform":
        return rng.randint(0, K)
    if schedule == "staged":
        stage = max(1, T_hint // (K + 1))
        return min(K, max(0, K - t // stage)) if t <= T_hint else 0
    if schedule == "none":
        return 0
    raise ValueError(f"unknown hint schedule {schedule!r}; choose one of {SCHEDULES}")


def sample_hint(fragments: list[str], schedule: str, t: int, rng: random.Random, T_hint: int = 300,
                p_low: float = 0.05, p_high: float = 0.95, max_chunks: int = 5) -> tuple[str, int, float]:
    """(hint text, number of fragments it spans, revealed fraction k / K) for one prompt at step t.

    The fragments hold the reasoning only; `</think>` and the `<answer>` tail are never part of a hint.
    >>> sample_hint(["1 + 2 = 3\\n", "3 * 4 = 12\\n", "Therefore, ..."], "cosine", 1, random.Random(0))
    ('1 + 2 = 3\\n3 * 4 = 12\\nTherefore, ...', 3, 1.0)
    """
    # BEGIN SOLUTION: k chunks from hint_chunks -> (first cuts[k] fragments joined, cuts[k], k / K)
    cuts = cut_points(len(fragments), max_chunks)
    K = len(cuts) - 1
    if K == 0:
        return "", 0, 0.0
    k = hint_chunks(schedule, t, K, rng, T_hint, p_low, p_high)
    return "".join(fragments[: cuts[k]]), cuts[k], k / K
    # END SOLUTION


# ==========================================================================================================
# 3. The objective: the paper's J (reward - beta KL + hint log-likelihood), per-token terms, then reductions
# ==========================================================================================================

def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage: A = (r - mean_group) / (std_group + eps), unbiased std. rewards (B, G) -> (B, G).

    A group whose rewards are all equal gets A = 0: it carries no policy-gradient signal.
    >>> group_advantages(torch.tensor([[1.0, 0.0], [0.1, 0.1]]))
    tensor([[ 0.7071, -0.7071],
            [ 0.0000,  0.0000]])
    """
    # BEGIN SOLUTION: (r - group mean) / (unbiased group std + eps); a group of one has std 0
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)
    # END SOLUTION


def policy_gradient_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                         epsilon: float = 0.2) -> torch.Tensor:
    """PPO-clip surrogate per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp).

    logp, old_logp (N, L); advantages (N, 1) or (N, L) -> (N, L).
    """
    # BEGIN SOLUTION: per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old)
    ratio = torch.exp(logp - old_logp)
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    # END SOLUTION


KL_CLAMP = 10.0  # the released k3 value is clamped to [-10, 10]: beyond it the KL term has no gradient


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(x) - x - 1, x = ref_logp - logp (>= 0, 0 iff equal),
    clamped to [-10, 10] as released: past x = 2.6 (or below x = -11) the value is 10 and the gradient 0.

    >>> kl_k3(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 5.0]))    # e^5 - 6 = 142.4 is clamped
    tensor([ 0., 10.])
    """
    # BEGIN SOLUTION: exp(x) - x - 1, x = ref_logp - logp, clamped to [-KL_CLAMP, KL_CLAMP]
    x = (ref_logp - logp).clamp(-2 * KL_CLAMP, 2 * KL_CLAMP)   # changes nothing, keeps exp(x) finite
    return (torch.exp(x) - x - 1).clamp(-KL_CLAMP, KL_CLAMP)
    # END SOLUTION


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None):
    """Entropy of softmax(logits / T) per position: (..., V) -> (...)."""
    scale = temperature if temperature > 0 else 1.0
    logp = mask_padded_vocab(logits.float() / scale, vocab_size).log_softmax(-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of values where mask is True (a 0-dim tensor that keeps the graph, even when the mask is empty)."""
    return (values * mask).sum()


def masked_nll(logp: torch.Tensor, mask: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood over the masked tokens: the hint tokens in UFT, the answer in SFT.

    num_tokens: the denominator when the mean runs over an accumulated batch; 0 tokens give 0 (not NaN).
    """
    # BEGIN SOLUTION: sum of -logp on the mask / num_tokens (default: mask count); 0 tokens give 0
    n = int(mask.sum()) if num_tokens is None else num_tokens
    return masked_sum(-logp, mask) / max(n, 1)
    # END SOLUTION


def rl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, entropy: torch.Tensor,
            hint_logp: torch.Tensor, response_mask: torch.Tensor, hint_mask: torch.Tensor,
            advantages: torch.Tensor, *, epsilon: float, beta: float, entropy_coef: float,
            sft_loss_coef: float, n_response: int | None = None, n_hint: int | None = None):
    """The UFT objective (the paper's J with the released code's coefficients) from per-token tensors:

    loss = sum over response tokens of [PPO-clip + beta KL_k3 - entropy_coef H] / n_response
         + sft_loss_coef * sum over hint tokens of [-log pi] / n_hint
    logp, old_logp, ref_logp (None: no KL), entropy, response_mask (N, L); hint_logp, hint_mask (N, H);
    advantages (N,). n_response / n_hint: the whole mini-batch's token counts when this is one of its
    micro-batches (default: this batch's), so accumulated losses add up to the mini-batch's token means.
    Returns (loss, terms): each term's token mean as a float."""
    # BEGIN SOLUTION: response terms (PPO-clip, beta KL, -entropy) / n_response + sft_loss_coef * hint NLL
    n_response = int(response_mask.sum()) if n_response is None else n_response
    adv = advantages[:, None]                                                       # (N, 1)
    per_token = policy_gradient_loss(logp, old_logp, adv, epsilon)                  # (N, L)
    mean = lambda x: float(masked_sum(x.detach().float(), response_mask)) / max(n_response, 1)  # noqa: E731
    terms = {"pg_loss": mean(per_token), "entropy": mean(entropy),
             "clip_fraction": mean(clipped_fraction(logp, old_logp, adv, epsilon))}
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)                                                  # (N, L)
        per_token = per_token + beta * kl
        terms["kl"] = mean(kl)
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    loss = masked_sum(per_token, response_mask) / max(n_response, 1)
    if sft_loss_coef > 0 and hint_logp is not None:
        nll = masked_nll(hint_logp, hint_mask, num_tokens=n_hint)
        loss = loss + sft_loss_coef * nll
        terms["hint_nll"] = nll.item()
    return loss, terms
    # END SOLUTION


# ==========================================================================================================
# 4. Batches and scoring: a left-padded prompt block, then a right-padded target block, in one forward
# ==========================================================================================================

@dataclasses.dataclass
class Batch:
    ids: torch.Tensor          # (N, S + L) prompt (left-padded) ++ target (right-padded)
    attention: torch.Tensor    # (N, S + L) 1 on real tokens: the sampler's mask
    target_mask: torch.Tensor  # (N, L) bool: tokens the model produced (or, in SFT, the answer + EOS)
    hint_mask: torch.Tensor    # (N, H) bool: hint tokens among the last H prompt columns
    advantages: torch.Tensor | None = None  # (N,) for policy-gradient batches

    def rows(self, index: torch.Tensor) -> "Batch":
        """The rows `index`, cut to their own widest prompt, hint and target.

        Saves: the padding columns of the whole batch (the plain version, `x[index]`, keeps its widths).
        Targets keep their first column and hints their last prompt column, so per-token tensors of the
        full batch line up with the cut one after `[:, :L]` (targets) or `[:, -H:]` (hints).
        """
        ids, attention = self.ids[index], self.attention[index]
        target_mask, hint_mask = self.target_mask[index], self.hint_mask[index]
        S = ids.shape[1] - target_mask.shape[1]
        L = max(1, int(target_mask.sum(-1).max()))                         # widest target
        S_cut = max(1, int(attention[:, :S].sum(-1).max()))                # widest prompt
        H = int(hint_mask.sum(-1).max()) if hint_mask.shape[1] else 0      # widest hint
        adv = None if self.advantages is None else self.advantages[index]
        return Batch(ids[:, S - S_cut: S + L], attention[:, S - S_cut: S + L], target_mask[:, :L],
                     hint_mask[:, hint_mask.shape[1] - H:], adv)


def make_batch(prompts: list[list[int]], targets: list[list[int]], hint_lengths: list[int], pad_id: int,
               advantages: torch.Tensor | None = None, device=None) -> Batch:
    """Lay out prompt + target rows so every target starts at the same column; masks come from lengths."""
    p_ids, p_mask = left_pad(prompts, pad_id)                                      # (N, S)
    width = max(1, max(len(t) for t in targets))
    t_ids = torch.full((len(targets), width), pad_id, dtype=torch.long)
    t_mask = torch.zeros((len(targets), width), dtype=torch.bool)
    for row, t in enumerate(targets):
        t_ids[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        t_mask[row, : len(t)] = True
    H = max(hint_lengths) if hint_lengths else 0
    h_mask = torch.arange(H)[None, :] >= (H - torch.tensor(hint_lengths))[:, None]  # (N, H) right-aligned
    return Batch(torch.cat([p_ids, t_ids], 1).to(device), torch.cat([p_mask, t_mask.long()], 1).to(device),
                 t_mask.to(device), h_mask.to(device), None if advantages is None else advantages.to(device))


def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits that predict the last `keep` tokens of each row: (B, S) -> (B, keep, V)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False,
                 logits_to_keep=keep + 1).logits[:, :-1]


def grouped_forward_logits(model, batch: "Batch", group_size: int) -> torch.Tensor:
    """forward_logits(model, batch.ids, batch.attention, H + L) computing each group's shared prompt once.

    Rows g*G .. g*G + G - 1 continue the same prompt (hint included). Pass 1 runs the G-times smaller batch of
    prompts and keeps their keys/values; the cache is copied to each group's G rows; pass 2 runs only the
    targets on top of it. Gradients flow through the cache into pass 1, so the result and its gradient equal
    the one-pass computation (up to float rounding) at about (S/G + L) / (S + L) of its cost.
    """
    from transformers import DynamicCache

    H, L = batch.hint_mask.shape[1], batch.target_mask.shape[1]
    S = batch.ids.shape[1] - L
    p_ids, p_mask = batch.ids[::group_size, :S], batch.attention[::group_size, :S]        # (P, S)
    if not torch.equal(batch.ids[:, :S].view(-1, group_size, S), p_ids[:, None].expand(-1, group_size, -1)):
        raise ValueError(f"score(group_size={group_size}): rows of a group do not share their prompt")
    cache = DynamicCache(config=model.config)
    p_logits = model(input_ids=p_ids, attention_mask=p_mask, position_ids=positions_from_mask(p_mask),
                     past_key_values=cache, use_cache=True, logits_to_keep=H + 1).logits  # (P, H + 1, V)
    cache.batch_repeat_interleave(group_size)
    positions = positions_from_mask(batch.attention)[:, S: S + L - 1]                    # (N, L - 1)
    t_logits = p_logits.new_zeros((batch.ids.shape[0], 0, p_logits.shape[-1]))
    if L > 1:                           # the last target token predicts nothing: it is not fed
        t_logits = model(input_ids=batch.ids[:, S: S + L - 1], attention_mask=batch.attention[:, : S + L - 1],
                         position_ids=positions, past_key_values=cache, use_cache=True).logits  # (N, L-1, V)
    return torch.cat([p_logits.repeat_interleave(group_size, 0), t_logits], 1)            # (N, H + L, V)


def score(model, batch: Batch, temperature: float, vocab_size: int, with_entropy: bool = False,
          group_size: int = 1):
    """Teacher-forced (hint logp (N, H), target logp (N, L), target entropy (N, L) or None) in one forward.

    group_size > 1: consecutive rows in groups of that size share their prompt, which then runs once
    (`grouped_forward_logits`: two passes, the same numbers).
    """
    H, L = batch.hint_mask.shape[1], batch.target_mask.shape[1]
    # gradient checkpointing drops the KV cache in train mode (the recompute would write it twice), and the
    # grouped forward's second pass reads it: then run the plain forward (the same numbers)
    if group_size > 1 and not (model.training and getattr(model, "is_activation_checkpointing", False)):
        logits = grouped_forward_logits(model, batch, group_size)                       # (N, H + L, V)
    else:
        logits = forward_logits(model, batch.ids, batch.attention, H + L)              # (N, H + L, V)
    logp = token_logprobs(logits, batch.ids[:, -(H + L):], temperature, vocab_size)  # (N, H + L)
    entropy = token_entropy(logits[:, H:], temperature, vocab_size) if with_entropy else None
    return logp[:, :H], logp[:, H:], entropy


# ==========================================================================================================
# 5. Training (the paper's UFT algorithm and its baselines) and evaluation
# ==========================================================================================================

def rollout(run: Run, rows: list[dict], step: int, hint_schedule: str) -> tuple[Batch, dict, list[dict]]:
    """Hint each prompt, sample G continuations, reward them; return the training batch and rollout stats."""
    a, tok = run.args, run.tokenizer
    hints = [sample_hint(r["hint"], hint_schedule, step, run.rng, a.T_hint, a.p_low, a.p_high) for r in rows]
    drawn = sum(f for _, _, f in hints) / len(hints)                               # mean k / K this step
    # torchrun: every rank draws the whole step's hints (one shared rng), then keeps only its own prompts
    mine = common.rank_rows(len(rows), a.mini_batch_size)
    rows, hints = [rows[i] for i in mine], [hints[i] for i in mine]
    q_ids = [run.encode(r["question"]) for r in rows]
    h_ids = [[t for f in r["hint"][:n] for t in run.encode(f)] for r, (_, n, _) in zip(rows, hints)]
    prompts = [q + h for q, h in zip(q_ids, h_ids)]
    start = time.perf_counter()
    out = generate(run.model, tok, prompts, num_generations=a.num_generations,
                   max_new_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                   top_k=a.top_k, generator=run.generator)
    seconds = time.perf_counter() - start
    completions = [out.ids[i, : out.lengths[i]].tolist() for i in range(out.ids.shape[0])]
    texts = tok.batch_decode(completions, skip_special_tokens=True)
    owner = out.prompt_index.tolist()
    rewards = torch.tensor([tasks.reward(rows[p], rows[p]["question"] + hints[p][0] + text)
                            for p, text in zip(owner, texts)])
    grouped = rewards.view(len(rows), a.num_generations)                          # (B, G)
    scheduled = hint_fraction(step, a.T_hint, a.p_low, a.p_high)                    # p(t)
    adv = group_advantages(grouped).view(-1)                                       # (N,)
    batch = make_batch([prompts[p] for p in owner], completions, [len(h_ids[p]) for p in owner],
                       tok.pad_token_id, advantages=adv, device=run.model.device)
    # torchrun: the logged statistics cover every rank's rollouts (one process: its own, unchanged)
    rewards, lengths, finished = (common.cat_over_ranks(x) for x in (rewards, out.lengths, out.finished))
    grouped = rewards.view(-1, a.num_generations)                                 # (B, G), all ranks
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
             "train_accuracy": float((rewards == 1.0).float().mean()),
             "zero_std_groups": float((grouped.std(-1) == 0).float().mean()),
             "solved_groups": float((grouped == REWARD_CORRECT).any(-1).float().mean()),  # >= 1 correct
             "hint_fraction": scheduled if hint_schedule == "cosine" else drawn,
             "hint_fraction_drawn": drawn,
             "response_length": float(lengths.float().mean()),
             "truncated": float((~finished).float().mean()),
             "rollout_tokens": int(lengths.sum()),
             "rollout_tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9)}
    samples = [{"step": step, "hint": hints[p][0], "completion": texts[i], "reward": float(rewards[i])}
               for i, p in enumerate(owner[: a.num_generations])]
    return batch, stats, samples


def rl_micro_step(run: Run, part: Batch, old_logp: torch.Tensor | None, n_response: int, n_hint: int,
                  use_hint_nll: bool) -> tuple[torch.Tensor, dict]:
    """Score one micro-batch with the policy (and the frozen reference), then `rl_loss` on it."""
    a, vocab, G = run.args, len(run.tokenizer), run.args.num_generations
    hint_logp, logp, entropy = score(run.model, part, a.temperature, vocab, with_entropy=True, group_size=G)
    old = logp.detach() if old_logp is None else old_logp[:, : logp.shape[1]]  # one update per step: ratio 1
    ref_logp = None
    if run.ref is not None:
        with torch.no_grad():
            ref_logp = score(run.ref, part, a.temperature, vocab, group_size=G)[1]
    return rl_loss(logp, old, ref_logp, entropy, hint_logp, part.target_mask, part.hint_mask, part.advantages,
                   epsilon=a.epsilon, beta=a.beta, entropy_coef=a.entropy_coef,
                   sft_loss_coef=a.sft_loss_coef if use_hint_nll else 0.0, n_response=n_response,
                   n_hint=n_hint)


def sampling_policy_logp(run: Run, batch: Batch, rows_per_pass: int) -> torch.Tensor:
    """Target log-probs (N, L) under the current policy, before any update: the PPO ratio's denominator."""
    a, L = run.args, batch.target_mask.shape[1]
    parts = []
    run.model.eval()
    with torch.no_grad():
        for index in micro_batches(batch.ids.shape[0], rows_per_pass):
            logp = score(run.model, batch.rows(index), a.temperature, len(run.tokenizer),
                         group_size=a.num_generations)[1]                                    # (n, L_part)
            parts.append(widen(logp, L))                                                       # (n, L)
    return torch.cat(parts)


def rl_update(run: Run, batch: Batch, use_hint_nll: bool) -> dict:
    """PPO over mini-batches of `mini_batch_size` prompts, an optimizer step each, over micro-batches.

    Micro-batches hold whole groups (micro_batch_size rows rounded down to a multiple of G, at least one),
    so each forward pass runs a group's shared prompt once.
    """
    a, G = run.args, run.args.num_generations
    # torchrun: each rank holds mini_batch_size / world_size prompts of every update (common.rank_rows)
    rows_per_update = a.mini_batch_size // common.DP.world_size * G
    rows_per_pass = max(1, a.micro_batch_size // G) * G
    updates = list(micro_batches(batch.ids.shape[0], rows_per_update))
    # later updates need the log-probs of the policy that sampled; a single update has them in its own graph
    old_logp = sampling_policy_logp(run, batch, rows_per_pass) if len(updates) > 1 else None
    run.model.train()
    totals, norms = {}, []
    for update in updates:
        mini = batch.rows(update)
        # token means over the whole update: under torchrun its tokens are on every rank, so count them all
        n_response = common.all_reduce_sum(int(mini.target_mask.sum()))
        n_hint = common.all_reduce_sum(int(mini.hint_mask.sum()))
        for index in micro_batches(update.numel(), rows_per_pass):
            part = mini.rows(index)
            old = None if old_logp is None else old_logp[update][index]
            loss, stats = rl_micro_step(run, part, old, n_response, n_hint, use_hint_nll)
            backward(loss, run.step)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / len(updates)
            totals["loss"] = totals.get("loss", 0.0) + loss.item() / len(updates)
        norms.append(optimizer_step(run.model, run.optimizer, a.max_grad_norm))
    # each rank's terms are its share of the global token means (global counts above): they add up
    totals = {k: common.all_reduce_sum(v) for k, v in totals.items()}
    totals["grad_norm"] = sum(norms) / len(norms)
    totals["updates"] = len(updates)
    return totals


def sft_batch(tokenizer, rows: list[dict], device=None, encode=None) -> Batch:
    """question -> answer + EOS; only the answer and its EOS are targets (the prompt is masked by layout).

    encode: text -> token ids (default: the tokenizer without special tokens; a Run passes its cached one).
    """
    encode = encode or (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    targets = [answer_token_ids(r, encode) + [eos] for r in rows]
    return make_batch([encode(r["question"]) for r in rows], targets, [0] * len(rows), tokenizer.pad_token_id,
                      device=device)


def sft_update(model, batch: Batch, vocab_size: int, optimizer, *, micro_batch_size: int,
               max_grad_norm: float, step: int = 0) -> dict:
    """One optimizer step of the token-mean NLL of the batch's targets (gradients summed over micro-batches).

    The SFT loss of `--algo sft` and of sft-rft's first phase, of the built-in model's warm-up and of sft_go's
    plain-SFT reference: loss = sum over target tokens of -log pi / (number of target tokens).
    """
    # torchrun: the batch is this rank's share; the token mean runs over every rank's target tokens
    total, loss_sum = common.all_reduce_sum(int(batch.target_mask.sum())), 0.0
    model.train()
    for index in micro_batches(batch.ids.shape[0], micro_batch_size):
        part = batch.rows(index)
        _, logp, _ = score(model, part, 1.0, vocab_size)                                 # (n, L)
        loss = masked_nll(logp, part.target_mask, num_tokens=total)
        backward(loss, step)
        loss_sum += loss.item()
    norm = optimizer_step(model, optimizer, max_grad_norm)
    loss_sum = common.all_reduce_sum(loss_sum)                 # the ranks' shares of the token mean
    return {"loss": loss_sum, "sft_nll": loss_sum, "grad_norm": norm, "updates": 1}


def training_step(run: Run) -> dict:
    """One step of the run's algorithm at run.step; returns its metrics."""
    a = run.args
    phase = phase_of(a.algo, run.step, a.sft_steps)
    rows = [run.train_rows[i] for i in rows_for_step(len(run.train_rows), a.batch_size, run.step, a.seed)]
    if phase == "sft":
        rows = [rows[i] for i in common.rank_rows(len(rows), a.batch_size)]      # torchrun: this rank's share
        batch = sft_batch(run.tokenizer, rows, run.model.device, run.encode)
        metrics = sft_update(run.model, batch, len(run.tokenizer), run.optimizer,
                             micro_batch_size=a.micro_batch_size, max_grad_norm=a.max_grad_norm,
                             step=run.step)
    else:
        rl_step = run.step - (a.sft_steps if a.algo == "sft-rft" else 0)    # counts from 1 in the RL phase
        if a.algo == "sft-rft" and rl_step == 1:
            run.optimizer, run.scheduler = optimizer_for(a, run.model, "rl")  # fresh AdamW and schedule
            run.ref = frozen_copy(run.model) if a.beta > 0 else None  # RFT stays near the SFT model
        schedule = a.hint_schedule or ALGOS[a.algo][0]
        batch, stats, samples = rollout(run, rows, rl_step, schedule)
        if (run.step % a.eval_steps == 0 or run.step == 1) and common.is_main():
            for s in samples:
                append_jsonl(run.out / "samples.jsonl", {"kind": "train", **s, "step": run.step})
        metrics = {**stats, **rl_update(run, batch, use_hint_nll=ALGOS[a.algo][1])}
    run.scheduler.step()                      # the schedule counts training steps, not optimizer updates
    return {"phase": phase, **metrics}


def train(args) -> dict:
    """Run args.algo for its steps; write the run folder; return the base and final held-out results."""
    from tqdm.auto import tqdm

    run = setup_run(args)
    steps = total_steps(args)
    bar = tqdm(range(run.step + 1, steps + 1), desc=args.algo, initial=run.step, total=steps,
               disable=not common.is_main())
    for step in bar:
        run.step, start = step, time.perf_counter()
        try:
            metrics = training_step(run)
        except FloatingPointError as err:
            bar.close()
            raise common.RunFailed(f"{err}: stopped; the last good checkpoint is in {run.out / 'checkpoint'} "
                                   "(try a lower --learning_rate)") from None
        metrics.update(step=step, lr=run.scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - start)
        record_step(run, metrics, bar, last=step == steps)
    bar.close()
    if not common.is_main():                 # torchrun: rank 0 writes the plot and reads the summary
        return {}
    plot_run(run.out)
    return run_summary(run.out)


def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int = 96, batch_size: int = 256,
             num_samples: int = 4, progress: bool = False) -> tuple[dict, list[dict]]:
    """Accuracy (reward == 1), mean reward, format rate (an answer was extracted) of greedy completions, and
    `rewards`, one per row in order (for paired comparisons of two models). Rows of several sources (a mixed
    file) add `accuracy_by_source` and its unweighted mean `accuracy_source_mean`."""
    from tqdm.auto import tqdm

    rewards, samples, lengths = [], [], []
    block = common.rank_block(len(rows))              # torchrun: this rank's rows (one process: all of them)
    mine = rows[block.start: block.stop]
    for start in tqdm(range(0, len(mine), batch_size), desc="eval", leave=False,
                      disable=not progress or not common.is_main()):
        chunk = mine[start: start + batch_size]
        prompts = [tokenizer(r["question"], add_special_tokens=False)["input_ids"] for r in chunk]
        out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        texts = tokenizer.batch_decode([out.ids[i, : out.lengths[i]].tolist() for i in range(len(chunk))],
                                       skip_special_tokens=True)
        for row, text in zip(chunk, texts):
            rewards.append(tasks.reward(row, row["question"] + text))
            if len(samples) < num_samples:
                shown = tasks.TASKS[tasks.task_of(row) or "countdown"].sample_fields
                samples.append({**{k: row[k] for k in shown}, "completion": text, "reward": rewards[-1]})
        lengths.extend(out.lengths.tolist())
    # torchrun: every rank's rewards, lengths and samples, in row order (one process: its own)
    rewards, lengths = common.gather_in_order(rewards), common.gather_in_order(lengths)
    samples = common.gather_in_order(samples)[:num_samples]
    r = torch.tensor(rewards)
    metrics = {"accuracy": float((r == 1.0).float().mean()), "reward": float(r.mean()),
               "format_rate": float((r > 0).float().mean()), "length": sum(lengths) / len(lengths)}
    by_source = tasks.accuracy_by_source(rows, rewards)
    if len(by_source) > 1:      # a mixed file: each source's accuracy and their unweighted mean
        metrics.update(accuracy_by_source=by_source,
                       accuracy_source_mean=sum(by_source.values()) / len(by_source))
    return {**metrics, "rewards": rewards}, samples


############################################################################################################
# Support code: the built-in models, run folder and checkpoints, command line. Nothing below
# is part of the method; it makes the method runnable.
############################################################################################################


# ----------------------------------------------------------------------------------------------------------
# Models: the built-in base models (a tiny Llama after a short cached warm-up), and loading any model
# ----------------------------------------------------------------------------------------------------------

BUILTIN = "builtin"  # the --model value that selects the small model built in code (no download)
DEFAULT_CACHE = Path(os.environ.get("UFT_CACHE", Path.home() / ".cache" / "uft"))  # built-in models live here


def builtin_init(folder: Path, seed: int = 0, task: str = "countdown") -> Path:
    """Create (once) the built-in model's tokenizer and randomly initialised weights in `folder`.

    The tokenizer is trained on the built-in task's text (countdown or kk), so that text is covered by merges.
    """
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    from transformers import LlamaForCausalLM

    rows = (generate_countdown(2000, seed=10_000 + seed) if task == "countdown"
            else tasks.generate_kk(2000, seed=10_000 + seed, min_people=2, max_people=4))
    tok = build_tokenizer([r["question"] + r["answer"] for r in rows], vocab_size=1024)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), tok.pad_token_id, tok.eos_token_id))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id

    def save(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    save_atomically(save, folder)
    return folder


# What the built-in base model saw (reported in the README). Randomly initialised weights cannot learn the
# never-hinted answer tail by RL, so the base is first taught the format and some arithmetic by plain SFT on
# problems that can never be in a held-out split (see `is_heldout`).
BASE_RECIPE = dict(
    name="builtin",        # the --model value; the cache folder is <name>-v<version>
    version=2,             # bump to rebuild every cached base model (and its tokenizer)
    num_problems=20_000,   # training problems, drawn from the non-held-out part of problem space
    min_nums=3, max_nums=3,  # numbers per warm-up problem
    steps=600,             # SFT steps (~38k problem presentations: about two epochs)
    batch_size=64,         # problems per step
    learning_rate=3e-3,    # AdamW, cosine decay after 5% warm-up
    seed=1234)             # problem draw and initialisation


# Two more bases for the experiments (see the README's Results): a weak one that knows the answer format but
# rarely solves a problem (the paper's small-model regime), and one warmed up on 3-5 numbers (long horizons).
BASE_RECIPES = {r["name"]: r for r in (
    BASE_RECIPE,
    {**BASE_RECIPE, "name": "builtin-weak", "steps": 150},
    {**BASE_RECIPE, "name": "builtin-mix", "min_nums": 3, "max_nums": 5},
    # K&K (--data kk's default model): SFT on deduction traces of 2-3 inhabitants, a quarter of the countdown
    # warm-up's tokens-worth of steps because a trace is ~2.5x as long as a countdown answer
    {**BASE_RECIPE, "name": "builtin-kk", "version": 1, "task": "kk", "min_people": 2, "max_people": 3,
     "num_problems": 10_000, "steps": 300, "batch_size": 32})}


def warmup_rows(recipe: dict) -> list[dict]:
    """A base recipe's SFT rows: its task's problems, never from the held-out part of problem space."""
    if recipe.get("task", "countdown") == "kk":
        return tasks.generate_kk(recipe["num_problems"], seed=recipe["seed"], min_people=recipe["min_people"],
                                 max_people=recipe["max_people"], heldout=False)
    return generate_countdown(recipe["num_problems"], seed=recipe["seed"], min_nums=recipe["min_nums"],
                              max_nums=recipe["max_nums"], heldout=False)


def builtin_base(cache_dir: Path = DEFAULT_CACHE, recipe: dict = BASE_RECIPE, progress: bool = True) -> Path:
    """Folder of a built-in base model; built once (minutes on a laptop CPU), then loaded from the cache."""
    from functools import lru_cache
    from tqdm.auto import tqdm

    folder = Path(cache_dir) / f"{recipe['name']}-v{recipe['version']}" / "base"
    if (folder / "config.json").exists():
        return folder
    init = builtin_init(folder.with_name("init"), recipe["seed"], recipe.get("task", "countdown"))
    model, tok = load_model(str(init), device="cpu")
    rows = warmup_rows(recipe)
    optimizer, scheduler = make_optimizer(model, recipe["learning_rate"], weight_decay=0.01,
                                          warmup_ratio=0.05, steps=recipe["steps"], schedule="cosine")
    encode = lru_cache(maxsize=None)(lambda text: tok(text, add_special_tokens=False)["input_ids"])
    bar = tqdm(range(1, recipe["steps"] + 1), desc=f"building the base model (once; cached in {folder})",
               disable=not progress)
    for step in bar:
        batch = [rows[i] for i in rows_for_step(len(rows), recipe["batch_size"], step, recipe["seed"])]
        metrics = sft_update(model, sft_batch(tok, batch, encode=encode), len(tok), optimizer,
                             micro_batch_size=recipe["batch_size"], max_grad_norm=1.0, step=step)
        bar.set_postfix(nll=f"{metrics['loss']:.3f}")
        scheduler.step()

    def save(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
    save_atomically(save, folder)
    return folder


def load_model(model: str = BUILTIN, *, cache_dir: Path = DEFAULT_CACHE, **options):
    """(model, tokenizer): a built-in name (see BASE_RECIPES; built once, then cached) or anything that
    `common.load_pretrained` takes (hub id, local folder, GGUF file); options: dtype, device, gguf_file,
    trust_remote_code. Every problem the user can fix raises UserError with a one-line message."""
    if model in BASE_RECIPES:
        model = str(builtin_base(cache_dir, BASE_RECIPES[model]))
    return common.load_pretrained(model, **options)


def empty_rollout(num_prompts: int, group_size: int, width: int, pad_id: int, device) -> Rollout:
    """The sampler's output buffers: every row pad, length 0, unfinished."""
    N = num_prompts * group_size
    return Rollout(torch.arange(num_prompts, device=device).repeat_interleave(group_size),
                   torch.full((N, width), pad_id, dtype=torch.long, device=device),
                   torch.zeros(N, dtype=torch.long, device=device),
                   torch.zeros(N, dtype=torch.bool, device=device),
                   torch.zeros((N, width), dtype=torch.float32, device=device))


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                      vocab_size: int | None = None) -> torch.Tensor:
    """Teacher-forced log-probs of ids[:, 1:] with the sampler's mask, positions, temperature: (B, S - 1)."""
    logits = forward_logits(model, ids, mask, ids.shape[1] - 1)
    return token_logprobs(logits, ids[:, 1:], temperature, vocab_size)


# ----------------------------------------------------------------------------------------------------------
# Training plumbing: the run's state, each phase's optimizer, the clip diagnostic, the budget
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything a training step reads or changes."""
    args: object                           # the resolved flags (an argparse.Namespace)
    model: torch.nn.Module
    tokenizer: object
    ref: torch.nn.Module | None            # frozen reference policy, None when beta == 0
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_rows: list[dict]
    test_rows: list[dict]
    rng: random.Random                     # hint draws
    generator: torch.Generator             # sampling
    out: Path
    step: int = 0
    token_cache: dict = dataclasses.field(default_factory=dict)
    val_rows: list[dict] = dataclasses.field(default_factory=list)   # for choosing settings; never reported
    budget: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(BUDGET, 0))  # running totals

    def encode(self, text: str) -> list[int]:
        if text not in self.token_cache:
            self.token_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.token_cache[text]


def optimizer_for(args, model, phase: str):
    """The optimizer of a phase: SFT has its own learning rate and warm-up over its steps; RL runs T steps.

    sft-rft builds a fresh one when its RL phase starts, as the paper's SFT-then-RFT recipe does.
    """
    if phase == "sft":
        steps = args.T if args.algo == "sft" else args.sft_steps
        return make_optimizer(model, args.sft_learning_rate, args.weight_decay, args.sft_warmup_ratio, steps,
                              args.lr_scheduler)
    return make_optimizer(model, args.learning_rate, args.weight_decay, args.warmup_ratio, args.T,
                          args.lr_scheduler)


def clipped_fraction(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                     epsilon: float) -> torch.Tensor:
    """(N, L) bool: tokens where the PPO clip acts (ratio > 1 + eps with A > 0, or < 1 - eps with A < 0).

    With one optimizer update per step the ratio is exactly 1 and nothing is ever clipped.
    """
    ratio = torch.exp(logp - old_logp)
    return ((ratio > 1 + epsilon) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))


def phase_of(algo: str, step: int, sft_steps: int) -> str:
    """'sft' or 'rl' for this step: sft always, sft-rft for its first sft_steps, the others never."""
    return "sft" if algo == "sft" or (algo == "sft-rft" and step <= sft_steps) else "rl"


def total_steps(args) -> int:
    """Training steps of the run: T, plus the SFT phase for sft-rft (whose RL phase gets rft's T steps)."""
    return args.T + (args.sft_steps if args.algo == "sft-rft" else 0)


BUDGET = ("optimizer_steps", "problems_seen", "tokens_generated", "train_seconds")  # one unit for every algo


def add_to_budget(budget: dict, metrics: dict, batch_size: int) -> dict:
    """The running totals after one step (SFT generates no tokens; RL counts every sampled token)."""
    return {"optimizer_steps": budget["optimizer_steps"] + metrics["updates"],
            "problems_seen": budget["problems_seen"] + batch_size,
            "tokens_generated": budget["tokens_generated"] + metrics.get("rollout_tokens", 0),
            "train_seconds": budget["train_seconds"] + metrics["step_seconds"]}


# ----------------------------------------------------------------------------------------------------------
# Run folder: config, metrics, per-problem rewards, samples, plot, atomic checkpoints, resume
# ----------------------------------------------------------------------------------------------------------

def setup_run(args) -> Run:
    """Rows (checked before any model loads), models and optimizer; a fresh run folder (with the base
    model's evaluation) or a resumed one."""
    out = Path(args.output_dir)
    resuming = bool(args.resume) and (out / "checkpoint" / "trainer_state.pt").exists()
    if not resuming and common.is_main():    # torchrun: rank 0 alone owns the run folder
        args.run_id = common.claim_run_folder(out, args.overwrite)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_rows, val_rows, test_rows = load_rows(args)
    with common.main_rank_first():           # torchrun: rank 0 builds and caches the built-in base first
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file,
                                trust_remote_code=args.trust_remote_code)
    ref = None                              # sft-rft makes its reference when its RL phase starts
    if args.beta > 0 and args.algo not in ("sft", "sft-rft"):
        ref = frozen_copy(model)
    if resuming:
        model = load_model(str(out / "checkpoint"), dtype=args.dtype, device=args.device)[0]
        if args.algo == "sft-rft" and (out / "checkpoint" / "ref").exists():
            ref = load_model(str(out / "checkpoint" / "ref"), dtype=args.dtype, device=args.device)[0]
    if common.is_main():                     # torchrun: rank 0 alone writes the run folder
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))
        print(memory_report(args, model, tok, train_rows))
    common.broadcast_parameters(model)       # torchrun: every rank starts from rank 0's weights
    if args.gradient_checkpointing:          # recompute each layer in the backward: activations / layers
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer, scheduler = optimizer_for(args, model, phase_of(args.algo, 1, args.sft_steps))
    device = model.device if model.device.type != "cpu" else "cpu"
    run = Run(args=args, model=model, tokenizer=tok, ref=ref, optimizer=optimizer, scheduler=scheduler,
              train_rows=train_rows, test_rows=test_rows, val_rows=val_rows, rng=random.Random(args.seed),
              generator=torch.Generator(device=device).manual_seed(common.rank_seed(args.seed)), out=out)
    for split in ("train_rows", "val_rows", "test_rows"):
        setattr(run, split, within_prompt_limit(run, getattr(run, split), split.split("_")[0]))
    if resuming:
        restore_checkpoint(run)
        if common.is_main():
            print(f"resumed {out} at step {run.step}")
    else:
        first = {"step": 0, **run_eval(run, progress=True)}
        if common.is_main():
            append_jsonl(out / "metrics.jsonl", first)
            print(f"step 0 | base model: accuracy {first['eval_accuracy']:.3f}  "
                  f"reward {first['eval_reward']:.3f}  format {first['eval_format_rate']:.3f}  "
                  f"({len(run.test_rows)} held-out problems)")
    return run


def within_prompt_limit(run: Run, rows: list[dict], split: str) -> list[dict]:
    """The rows whose question fits --max_prompt_length tokens; the others are skipped and counted on stderr
    (a 20 MB question would otherwise fill memory in the sampler). No row left is a UserError."""
    limit = run.args.max_prompt_length
    kept = []
    for row in rows:
        if len(row["question"]) <= limit or len(run.encode(row["question"])) <= limit:  # chars >= tokens
            kept.append(row)
        else:
            run.token_cache.pop(row["question"], None)
    if len(kept) < len(rows):
        print(f"{split}: {len(rows) - len(kept)} of {len(rows)} rows skipped: question longer than "
              f"--max_prompt_length {limit} tokens", file=sys.stderr)
    if rows and not kept:
        raise UserError(f"no {split} rows left: every question is longer than --max_prompt_length {limit}")
    return kept


def record_step(run: Run, metrics: dict, bar, last: bool) -> None:
    """After a step: budget totals, evaluation every eval_steps, a metrics line, progress, a checkpoint."""
    from tqdm.auto import tqdm

    a = run.args
    run.budget = add_to_budget(run.budget, metrics, a.batch_size)
    metrics.update(run.budget)
    if run.step % a.eval_steps == 0 or last:
        metrics.update(run_eval(run))
        if common.is_main():
            tqdm.write(f"step {run.step} | accuracy {metrics['eval_accuracy']:.3f}  "
                       f"reward {metrics['eval_reward']:.3f}  format {metrics['eval_format_rate']:.3f}")
    common.fault_point("step")
    if common.is_main():                     # torchrun: every rank holds the same metrics; rank 0 logs
        append_jsonl(run.out / "metrics.jsonl", metrics)
    shown = {"reward": "reward_mean", "acc": "train_accuracy", "hint": "hint_fraction", "loss": "loss"}
    bar.set_postfix({name: f"{metrics[k]:.3f}" for name, k in shown.items() if k in metrics})
    if run.step % a.save_steps == 0 or last:
        save_checkpoint(run)


def run_eval(run: Run, progress: bool = False) -> dict:
    """Greedy evaluation on the held-out rows (eval_*) and, when there are any, the validation rows (val_*);
    per-problem rewards go to eval_rewards.jsonl."""
    a, out = run.args, {}
    for split, rows in (("eval", run.test_rows), ("val", run.val_rows)):
        if not rows:
            continue
        metrics, samples = evaluate(run.model, run.tokenizer, rows, a.max_completion_length,
                                    a.eval_batch_size, progress=progress)
        rewards = metrics.pop("rewards")
        if not common.is_main():             # torchrun: every rank has the gathered results; rank 0 writes
            out.update({f"{split}_{k}": v for k, v in metrics.items()})
            continue
        append_jsonl(run.out / "eval_rewards.jsonl", {"step": run.step, "split": split, "rewards": rewards})
        if split == "eval":
            for s in samples:
                append_jsonl(run.out / "samples.jsonl", {"kind": "eval", "step": run.step, **s})
        out.update({f"{split}_{k}": v for k, v in metrics.items()})
    return out


def save_checkpoint(run: Run) -> None:
    """model + tokenizer + optimizer/scheduler/RNG state (+ the reference when it is not the base model).

    The trainer state holds tensors and plain types only, so it loads with weights_only=True. Under torchrun
    every rank calls it: the ranks' sampling streams are gathered, and rank 0 writes."""
    streams = common.gather_in_order([(run.generator.get_state(), torch.get_rng_state())])
    if not common.is_main():
        return

    def save(tmp: Path):
        run.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        if run.ref is not None and run.args.algo == "sft-rft":
            run.ref.save_pretrained(tmp / "ref")
        torch.save({"step": run.step, "run_id": getattr(run.args, "run_id", None), "budget": run.budget,
                    "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                    "rng": run.rng.getstate(), "generator": run.generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "rank_streams": streams}, tmp / "trainer_state.pt")
    save_atomically(save, run.out / "checkpoint")


def restore_checkpoint(run: Run) -> None:
    """Continue from the checkpoint: states back, and the run's logs cut back to its step (each file
    replaced at once, so a kill mid-resume loses nothing)."""
    state = common.load_state(run.out / "checkpoint" / "trainer_state.pt")
    if state.get("run_id") != getattr(run.args, "run_id", None):
        raise UserError(f"{run.out / 'checkpoint'}: belongs to run {state.get('run_id')}, not to the run "
                        f"{getattr(run.args, 'run_id', None)} of {run.out / 'config.json'}; not resuming")
    run.step, run.budget = state["step"], state["budget"]
    a = run.args
    run.optimizer, run.scheduler = optimizer_for(a, run.model, phase_of(a.algo, run.step, a.sft_steps))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.rng.setstate(state["rng"])
    streams = state.get("rank_streams") or [(state["generator"], state["torch_rng"])]
    if len(streams) == common.DP.world_size:     # each rank continues its own sampling stream
        generator_state, torch_state = streams[common.DP.rank]
        run.generator.set_state(generator_state)
        torch.set_rng_state(torch_state)
    elif common.is_main():                       # another world size: the ranks' streams start afresh
        print(f"resume: the checkpoint has {len(streams)} rank(s)' sampling streams, this job "
              f"{common.DP.world_size}: rollouts restart from their seeds (updates are unaffected)")
    if not common.is_main():
        return
    for name in ("metrics.jsonl", "eval_rewards.jsonl", "samples.jsonl"):    # drop the steps after it
        if (run.out / name).exists():
            kept = [m for m in common.read_log(run.out / name) if m.get("step", 0) <= run.step]
            common.rewrite_jsonl(run.out / name, kept)


def paired_comparison(before: list[float], after: list[float]) -> dict:
    """Two models' rewards on the same problems -> the accuracy gain with a 95% interval, wins and losses.

    Per problem d = [after correct] - [before correct]; the interval is mean(d) +- 1.96 sd(d) / sqrt(n);
    the exact McNemar p counts the problems that changed (wins vs losses under a fair coin).
    >>> r = paired_comparison([1, 0, 0, 1], [1, 1, 1, 0])
    >>> r["gain"], r["wins"], r["losses"], round(r["p_mcnemar"], 3)
    (0.25, 2, 1, 1.0)
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_comparison: need two equal, non-empty lists ({len(before)}, {len(after)})")
    d = [float(b == REWARD_CORRECT) - float(a == REWARD_CORRECT) for a, b in zip(before, after)]
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1))
    wins, losses = d.count(1.0), d.count(-1.0)
    tail = sum(math.comb(wins + losses, i) for i in range(min(wins, losses) + 1)) / 2 ** (wins + losses)
    return {"gain": mean, "low": mean - 1.96 * sd / math.sqrt(n), "high": mean + 1.96 * sd / math.sqrt(n),
            "wins": wins, "losses": losses, "p_mcnemar": min(1.0, 2 * tail), "n": n}


def run_summary(out: Path) -> dict:
    """Base and final held-out accuracy of a finished run folder, with the paired comparison of the two."""
    evals = [m for m in read_jsonl(out / "metrics.jsonl") if "eval_accuracy" in m]
    rewards = [r["rewards"] for r in read_jsonl(out / "eval_rewards.jsonl") if r["split"] == "eval"]
    return {"base_accuracy": evals[0]["eval_accuracy"], "final_accuracy": evals[-1]["eval_accuracy"],
            "comparison": paired_comparison(rewards[0], rewards[-1]), "output_dir": str(out)}


def plot_run(out: Path) -> Path:
    """plot.png: held-out accuracy, training reward and hint fraction over steps."""
    metrics = read_jsonl(out / "metrics.jsonl")
    shown = [("eval_accuracy", "held-out accuracy (greedy, no hint)", {"marker": "o"}),
             ("reward_mean", "training reward (mean)", {}), ("hint_fraction", "hint fraction p(t)", {})]
    panels = [(title, [(key, [(m["step"], m[key]) for m in metrics if key in m], style)])
              for key, title, style in shown]
    return plot_panels(out / "plot.png", panels)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def read_rows(args, files: str) -> list[dict]:
    """Rows of comma-separated files of the released schema, each row checked by its own task (--task for rows
    without a data_source, --math_levels for MATH rows)."""
    levels = {int(x) for x in args.math_levels.split(",")} if args.math_levels else None
    try:
        return [row for path in files.split(",")
                for row in tasks.load_task_rows(path.strip(), task=args.task, math_levels=levels)]
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None


def load_rows(args) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows: a built-in split (countdown, kk), or --data / --test_data files of the
    released schema (no validation rows)."""
    if args.data == "countdown":
        split = dict(seed=args.seed, min_nums=args.min_nums, max_nums=args.max_nums)
        train, test = countdown_split(args.num_train, args.num_test, **split)
        val = countdown_validation(args.num_val, args.num_test, **split) if args.num_val else []
        return train, val, test
    if args.data == "kk":                       # the task's own seeded, disjoint split
        people = dict(min_people=args.min_people, max_people=args.max_people)
        train, test = tasks.kk_split(args.num_train, args.num_test, args.seed, **people)
        return train, [], test
    rows = read_rows(args, args.data)
    test_rows = read_rows(args, args.test_data) if args.test_data else None
    if test_rows is not None:
        return rows[: args.num_train], [], test_rows[: args.num_test]
    if len(rows) <= args.num_test:
        raise UserError(f"--data {args.data}: {len(rows)} rows leave nothing to train on after --num_test "
                        f"{args.num_test} held-out rows; lower --num_test or pass --test_data")
    return rows[args.num_test: args.num_test + args.num_train], [], rows[: args.num_test]


# Every setting of a run, grouped by topic: (flag, default, help[, argparse options]). `--help`, the README's
# flag table and config.json all come from this table. Defaults are CPU-sized; the released GPU runs' values
# are named where they differ (docs/method.md has the full comparison).
MODEL_FLAGS = [
    ("model", None, "'builtin' (default; 'builtin-kk' with --data kk; experiments: 'builtin-weak', "
                    "'builtin-mix'), a hub id, or a local folder", {"type": str}),
    ("gguf_file", None, "a .gguf file (in --model's folder, or a full path)", {"type": str}),
    ("dtype", "float32", "weights and compute dtype", {"choices": list(DTYPES)}),
    ("device", "auto", "where to train", {"choices": ["auto", "cpu", "cuda", "mps"]}),
    ("trust_remote_code", False, "allow model code from the hub", {"action": "store_true"}),
]
FLAGS = {
    "algorithm": [
        ("algo", "uft", "what to train", {"choices": list(ALGOS)}),
        ("T", 150, "training steps (sft-rft: its RL steps, after its SFT steps)", {"range": "[1, inf)"}),
        ("T_hint", 50, "steps with hints; no hint after it (plain RFT)", {"range": "[1, inf)"}),
        ("p_low", 0.05, "hint fraction at the end of the cosine decay", {"range": "[0, 1]"}),
        ("p_high", 0.5, "hint fraction at the start of the cosine decay (released GPU runs: 0.95)",
         {"range": "[0, 1]"}),
        ("hint_schedule", None, "override the algo's schedule (uft: cosine, r3: uniform, rft: none); "
                                "staged = ablation", {"choices": SCHEDULES, "type": str}),
        ("sft_steps", None, "sft-rft: SFT steps before its T RFT steps (default: T, what --algo sft gets)",
         {"type": int, "range": "[1, inf)"}),
        ("sft_epochs", None, "SFT length in passes over the training problems (sets T for sft, --sft_steps "
                             "for sft-rft)", {"type": float, "range": "(0, inf)"}),
        ("sft_learning_rate", 2e-4, "SFT's AdamW learning rate (sft, and sft-rft's first phase; released GPU "
                                    "runs: 1e-5)", {"range": "(0, inf)"}),
        ("sft_warmup_ratio", 0.0, "fraction of the SFT steps spent warming up (released GPU runs: 0.1)",
         {"range": "[0, 1]"}),
    ],
    "objective": [
        ("num_generations", 4, "G: rollouts per prompt (one group)", {"range": "[1, inf)"}),
        ("epsilon", 0.2, "PPO clip range; with one update per step (mini_batch_size = batch_size) the "
                         "ratio is 1 and the clip never acts", {"range": "[0, 1]"}),
        ("beta", 0.001, "k3 KL coefficient; 0 keeps no reference model", {"range": "[0, inf)"}),
        ("entropy_coef", 0.0, "entropy bonus on response tokens (released GPU runs: 0.001)",
         {"range": "[0, inf)"}),
        ("sft_loss_coef", 0.001, "hint-token NLL coefficient (uft only; the released value, chosen on "
                                 "validation)", {"range": "[0, inf)"}),
    ],
    "optimisation": [
        ("batch_size", 32, "prompts per step (SFT: problems per step)", {"range": "[1, inf)"}),
        ("mini_batch_size", 32, "prompts per optimizer update (PPO mini-batch)", {"range": "[1, inf)"}),
        ("micro_batch_size", 64, "rows per forward pass (gradient accumulation); RL: rounded down to whole "
                                 "groups", {"range": "[1, inf)"}),
        ("learning_rate", 2e-4, "AdamW learning rate (released GPU runs: 1e-6)", {"range": "(0, inf)"}),
        ("weight_decay", 0.01, "AdamW weight decay", {"range": "[0, inf)"}),
        ("lr_scheduler", "cosine", "after warm-up; cosine decays to 0 at the last step (released GPU runs: "
                                   "constant)", {"choices": ["constant", "cosine"]}),
        ("warmup_ratio", 0.0, "fraction of T spent warming up", {"range": "[0, 1]"}),
        ("max_grad_norm", 1.0, "gradient-norm clip", {"range": "(0, inf)"}),
        ("gradient_checkpointing", False, "recompute each layer in the backward: activations shrink about "
                                          "layers-fold for one more forward's compute",
         {"action": "store_true"}),
        ("bf16", False, "bf16 autocast of the forward passes (meant for CUDA); weights and AdamW state stay "
                        "in --dtype", {"action": "store_true"}),
    ],
    "sampling": [
        ("temperature", 1.0, "rollout temperature (eval is greedy)", {"range": "[0, inf)"}),
        ("top_p", 1.0, "nucleus sampling; 1 = off", {"range": "(0, 1]"}),
        ("top_k", 0, "top-k sampling; 0 = off", {"range": "[0, inf)"}),
        ("max_completion_length", None, "new tokens per rollout / eval answer (default 64; --data kk: 128)",
         {"type": int, "range": "[1, inf)"}),
    ],
    "data": [
        ("data", "countdown", "'countdown' or 'kk' (built in), or a .parquet/.jsonl/.json file"),
        ("test_data", None, "held-out file(s), comma-separated (default: the first num_test rows of --data)",
         {"type": str}),
        ("task", "countdown", "the task of file rows without a data_source (rows with one use its task)",
         {"choices": list(tasks.TASKS)}),
        ("math_levels", None, "MATH rows: keep only these levels, comma-separated (the paper: 3,4,5); "
                              "default all", {"type": str}),
        ("num_train", 5000, "training problems", {"range": "[1, inf)"}),
        ("num_test", 500, "held-out problems for evaluation", {"range": "[1, inf)"}),
        ("num_val", 0, "built-in countdown: validation problems (disjoint from the held-out ones) to choose "
                       "settings on; evaluated beside them as val_*", {"range": "[0, inf)"}),
        ("min_nums", 3, "built-in countdown: fewest numbers per problem", {"range": "[3, 6]"}),
        ("max_nums", 3, "built-in countdown: most numbers per problem", {"range": "[3, 6]"}),
        ("min_people", 2, "built-in K&K: fewest inhabitants per puzzle (the paper: 3-7)", {"range": "[2, 8]"}),
        ("max_people", 3, "built-in K&K: most inhabitants per puzzle", {"range": "[2, 8]"}),
        ("max_prompt_length", 1024, "rows whose question is longer (in tokens) are skipped and counted "
                                    "(released runs: 256 countdown, 1024 MATH and K&K)",
         {"range": "[1, inf)"}),
    ],
    "model": MODEL_FLAGS,
    "run": [
        ("output_dir", None, "run folder (default runs/<algo>-<time>)", {"type": str}),
        ("overwrite", False, "replace the run that --output_dir holds (otherwise refused)",
         {"action": "store_true"}),
        ("resume", None, "a run folder to continue from its last checkpoint, with its saved flags (no "
                         "other flag is accepted)", {"type": str}),
        ("eval_only", False, "only evaluate --model (or a run folder's checkpoint) on the held-out rows "
                             "(--test_data); writes the same metrics and samples", {"action": "store_true"}),
        ("eval_steps", 25, "evaluate every this many steps", {"range": "[1, inf)"}),
        ("eval_batch_size", 256, "prompts per greedy eval batch", {"range": "[1, inf)"}),
        ("save_steps", 25, "checkpoint every this many steps", {"range": "[1, inf)"}),
        ("seed", 0, "data order, hints, sampling and initialisation", {"range": "[0, inf)"}),
    ],
}


def add_model_flags(parser) -> None:
    """The model-loading flags, shared by uft.py and sft_go.py (they feed `load_model`)."""
    add_flags(parser, "model", MODEL_FLAGS)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="uft.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="UFT and its baselines (SFT, RFT, SFT-RFT, R3) on countdown. With no flags: UFT on the "
                    "built-in ~1M-parameter model, CPU, a few minutes. Defaults are CPU-sized; the paper's "
                    "GPU settings are in the README.")
    for topic, flags in FLAGS.items():
        add_flags(p, topic, flags)
    return p


def check_args(p, args) -> None:
    """Invalid values and combinations fail at start, argparse-style (usage line + message, exit 2)."""
    common.check_ranges(p, args, [MODEL_FLAGS, *FLAGS.values()])
    if not args.p_low <= args.p_high:
        p.error(f"need --p_low <= --p_high (got p_low={args.p_low}, p_high={args.p_high})")
    if not args.T_hint <= args.T:
        p.error(f"--T_hint must be in 1..T={args.T} (got {args.T_hint})")
    if args.algo != "sft" and args.num_generations < 2:
        p.error(f"--num_generations must be >= 2 for --algo {args.algo}: group advantages need a group")
    if args.batch_size % args.mini_batch_size:
        p.error(f"--batch_size {args.batch_size} is not divisible by --mini_batch_size "
                f"{args.mini_batch_size}")
    if not args.min_nums <= args.max_nums or not args.min_people <= args.max_people:
        p.error(f"need --min_nums <= --max_nums and --min_people <= --max_people (got {args.min_nums}, "
                f"{args.max_nums}, {args.min_people}, {args.max_people})")
    if args.num_val and args.data != "countdown":
        p.error("--num_val is for the built-in countdown only")
    for name in ("data", "test_data"):
        for path in (getattr(args, name) or "").split(","):
            if path and path not in tasks.GENERATED and not Path(path.strip()).is_file():
                where = f" (not one of {', '.join(tasks.GENERATED)})" if name == "data" else ""
                p.error(f"--{name} {path!r}: no such file{where}")
    if args.math_levels and not all(x.strip().isdigit() for x in args.math_levels.split(",")):
        p.error(f"--math_levels {args.math_levels!r}: give comma-separated level numbers, e.g. 3,4,5")
    resolve_sft_length(p, args)


def resolve_sft_length(p, args) -> None:
    """--sft_epochs becomes steps (T for sft, --sft_steps for sft-rft); --sft_steps defaults to T."""
    if args.sft_epochs is not None:
        steps = math.ceil(args.sft_epochs * args.num_train / args.batch_size)
        args.T, args.sft_steps = (steps, args.sft_steps) if args.algo == "sft" else (args.T, steps)
        args.sft_epochs = None               # applied: a resumed run must not apply it again
    if args.sft_steps is None:
        args.sft_steps = args.T


# Flags whose default depends on --data: (built-in countdown or a file, --data kk). A K&K run starts from
# the K&K base and needs room for a trace (2-3 inhabitants: ~60 tokens, at most ~120; countdown ~40).
DATA_DEFAULTS = {"model": (BUILTIN, "builtin-kk"), "max_completion_length": (64, 128)}


def data_defaults(args, table: dict = DATA_DEFAULTS) -> None:
    """Fill the flags left at None from `table` by --data."""
    for flag, (other, kk) in table.items():
        if getattr(args, flag) is None:
            setattr(args, flag, kk if args.data == "kk" else other)


def parse_args(argv=None):
    import argparse

    p = build_parser()
    args = p.parse_args(argv)
    if args.resume:
        extra = [f"--{name}" for name in common.given_flags(build_parser, argv) if name != "resume"]
        if extra:          # one behaviour: a resumed run is the run that was started, never a mix
            p.error(f"--resume takes no other flag (got {' '.join(extra)}): a resumed run keeps its saved "
                    "flags; start a new run (--output_dir) to change them")
        folder = Path(args.resume)
        common.recover_run_folder(folder)          # a kill during a checkpoint swap or a log rewrite
        if not (folder / "checkpoint" / "trainer_state.pt").exists():
            p.error(f"--resume {args.resume!r}: no checkpoint there (expected checkpoint/trainer_state.pt)")
        try:
            saved = common.read_config(folder)
        except UserError as err:
            p.error(str(err))
        saved.update(resume=args.resume, output_dir=args.resume)
        args = argparse.Namespace(**{**vars(p.parse_args([])), **saved})   # newer flags: their defaults
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / f"{args.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    data_defaults(args)
    check_args(p, args)
    return args


def evaluate_only(args) -> dict:
    """--eval_only: greedy evaluation of --model (a run folder: its checkpoint) on the held-out rows
    (--test_data files, else those of --data), written like a training run's step 0: config.json,
    metrics.jsonl, eval_rewards.jsonl, samples.jsonl."""
    import types

    out = Path(args.output_dir)
    if common.is_main():                     # torchrun: rank 0 alone owns the run folder
        args.run_id = common.claim_run_folder(out, args.overwrite)
    if args.test_data or args.data not in tasks.GENERATED:
        test_rows = read_rows(args, args.test_data or args.data)[: args.num_test]
    else:                                  # the built-in split's held-out side (it ignores num_train)
        test_rows = load_rows(argparse_copy(args, num_train=1))[2]
    if not test_rows:
        raise UserError(f"--eval_only: no held-out rows with a reward in {args.test_data or args.data}")
    if common.is_main():
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    checkpoint = Path(args.model) / "checkpoint"
    name = str(checkpoint) if (checkpoint / "config.json").exists() else args.model
    with common.main_rank_first():
        model, tok = load_model(name, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file,
                                trust_remote_code=args.trust_remote_code)
    view = types.SimpleNamespace(args=args, model=model, tokenizer=tok, test_rows=test_rows, val_rows=[],
                                 out=out, step=0, token_cache={})          # what run_eval reads of a Run
    view.encode = lambda text: Run.encode(view, text)
    view.test_rows = within_prompt_limit(view, test_rows, "test")
    metrics = {"step": 0, **run_eval(view, progress=True)}
    if common.is_main():
        append_jsonl(out / "metrics.jsonl", metrics)
    return {**metrics, "model": name, "n": len(test_rows)}


def argparse_copy(args, **changes):
    """A copy of parsed flags with some values changed."""
    import argparse
    return argparse.Namespace(**{**vars(args), **changes})


def print_evaluation(result: dict) -> None:
    """The --eval_only summary: overall figures, then one line per data_source of a mixed file."""
    print(f"\n{result['model']} on {result['n']} held-out rows: accuracy {result['eval_accuracy']:.3f}  "
          f"reward {result['eval_reward']:.3f}  format {result['eval_format_rate']:.3f}")
    for source, accuracy in result.get("eval_accuracy_by_source", {}).items():
        print(f"  {source}: accuracy {accuracy:.3f}")
    if "eval_accuracy_source_mean" in result:
        print(f"  mean over sources: {result['eval_accuracy_source_mean']:.3f}")


def where_to_resume(args) -> str:
    """What a run that stops early prints last: its last checkpoint and the command that continues it."""
    out = Path(args.output_dir)
    state = out / "checkpoint" / "trainer_state.pt"
    if args.eval_only or not state.exists():
        return f"no checkpoint in {out}; run the same command with --overwrite to start again"
    step = common.load_state(state)["step"]
    return f"the last checkpoint is {state.parent} (step {step}); resume with: python uft.py --resume {out}"


def check_world(args) -> None:
    """Under torchrun every rank takes an equal share of each optimizer update's prompts."""
    world = common.DP.world_size
    if world > 1 and (args.batch_size % world or args.mini_batch_size % world):
        raise UserError(f"--batch_size {args.batch_size} and --mini_batch_size {args.mini_batch_size} must "
                        f"both be divisible by the {world} processes")


def bf16_autocast(args):
    """--bf16: forward passes in bfloat16 where autocast deems it safe (matmuls); weights stay in --dtype."""
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(common.resolve_device(args.device).type, dtype=torch.bfloat16)


def memory_report(args, model, tokenizer, rows: list[dict]) -> str:
    """The start-of-run line: `common.memory_estimate` for this model and these flags, on one device."""
    def lengths(texts):
        return max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    sample = rows[:200]
    question = lengths([r["question"] for r in sample])
    hint = lengths(["".join(r.get("hint") or [""]) for r in sample])        # a full hint, the longest case
    answer = lengths([r.get("answer") or "" for r in sample]) + 1           # + EOS
    G, world = args.num_generations, common.DP.world_size
    rl = args.algo != "sft"
    completion = hint + args.max_completion_length if rl else answer        # scored tokens per row
    rows_per_pass = max(1, args.micro_batch_size // G) * G if rl else args.micro_batch_size
    eval_rows = min(args.eval_batch_size, -(-args.num_test // world))          # a greedy batch, this rank
    sampled = max(args.batch_size // world * G if rl else 0, eval_rows)       # rows sampled at once
    terms = common.memory_estimate(
        common.model_shape(model), weight_bytes=DTYPES[args.dtype].itemsize,
        activation_bytes=2 if args.bf16 or args.dtype != "float32" else 4, rows_per_pass=rows_per_pass,
        tokens_per_row=question + completion, scored_per_row=completion, rollout_rows=sampled,
        rollout_tokens=question + hint + args.max_completion_length, reference=rl and args.beta > 0,
        gradient_checkpointing=args.gradient_checkpointing, logit_copies=5 if rl else 2)
    f = common.format_bytes
    return (f"memory estimate per device: weights {f(terms['weights'])} + gradients {f(terms['gradients'])} "
            f"+ AdamW {f(terms['optimizer'])} + reference {f(terms['reference'])} + the larger of "
            f"activations {f(terms['activations'])} ({rows_per_pass} rows x {question + completion} tokens "
            f"a micro-batch) and sampling KV cache {f(terms['kv_cache'])} ({sampled} rows): peak about "
            f"{f(terms['peak'])}; too much? lower --micro_batch_size or add --gradient_checkpointing")


def main(argv=None) -> int:
    """The command line: exit status 0 done, 2 bad input, 1 a failure mid-run, 130/143 SIGINT/SIGTERM."""
    args = parse_args(argv)
    quiet_libraries()
    return common.run_cli(lambda: run_and_report(args), lambda: where_to_resume(args))


def run_and_report(args) -> int:
    common.init_distributed(args.device)     # under torchrun: join the job (otherwise nothing happens)
    check_world(args)
    start = time.time()
    if args.eval_only:
        result = evaluate_only(args)
        if common.is_main():
            print_evaluation(result)
        return 0
    with bf16_autocast(args):
        result = train(args)
    if not common.is_main():
        return 0
    minutes = (time.time() - start) / 60
    c = result["comparison"]
    verdict = ("an improvement" if c["low"] > 0 else "a drop" if c["high"] < 0 else
               "not distinguishable from no change on this many problems")
    print(f"\n{args.algo}: held-out accuracy {result['base_accuracy']:.3f} (base) -> "
          f"{result['final_accuracy']:.3f} after {total_steps(args)} steps, {minutes:.1f} min. "
          f"Run folder: {result['output_dir']}\nchange {c['gain']:+.3f}, 95% interval {c['low']:+.3f} to "
          f"{c['high']:+.3f} over {c['n']} held-out problems ({c['wins']} gained, {c['losses']} lost): "
          f"{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
