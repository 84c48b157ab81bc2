"""UFT: Unifying Supervised and Reinforcement Fine-Tuning (Liu, Farina, Ozdaglar; arXiv 2505.16984).

UFT is GRPO-style RL whose prompts carry a hint, a prefix of the reference solution: the hint shrinks over
training (cosine decay) and its tokens get a log-likelihood term. One loop (`train`) runs it and its baselines
(sft, rft, sft-rft, r3). docs/method.md states every formula; tasks and rewards live in tasks.py.

Reading order (the method first, support code after the banner):
    1. the sampler                 Rollout, filter_top_k_top_p, sample_next, prefill, decode_step, generate
    2. hints                       hint_fraction, cut_points, hint_chunks, sample_hint
    3. the objective's terms       group_advantages, policy_gradient_loss, kl_k3, masked_nll, rl_loss
    4. batches and scoring         Batch, make_batch, grouped_forward_logits, score
    5. training                    State, rl_update, sft_update, train (the loop)
    --- support code ---           evaluate (greedy, held-out), the command line
Support modules: models.py (the built-in models, loading), runs.py (run folder, checkpoints), common.py.

Run:
    python uft.py                                   # CPU: UFT on the built-in model and countdown, minutes
    python uft.py --model Qwen/Qwen2.5-0.5B --device cuda --dtype bfloat16   # one GPU, a hub model
    python uft.py --model <dir> --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf   # a GGUF checkpoint
    torchrun --nproc_per_node 4 uft.py --model Qwen/Qwen2.5-1.5B --device cuda --bf16   # 4 GPUs (docs/scaling.md)
    python uft.py --help                            # every flag with its default
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import guards

if __name__ == "__main__":       # Ctrl-C while torch and transformers load: exit 130, one line, no traceback
    guards.exit_quietly_on_ctrl_c()

import torch  # noqa: E402

import common  # noqa: E402
import tasks  # noqa: E402
from common import (DTYPES, UserError, add_flags, append_jsonl, backward,  # noqa: F401, E402
                    build_tokenizer, find_gguf_package_dir, frozen_copy, make_optimizer, mask_padded_vocab,
                    micro_batches, optimizer_step, plot_panels, quiet_libraries, read_jsonl, rows_for_step,
                    save_atomically, shard, stop_token_ids, timed, tiny_llama_config, widen)
from tasks import (REWARD_CORRECT, answer_token_ids, countdown_question, countdown_reward,  # noqa: F401, E402
                   countdown_split, countdown_validation, generate_countdown, load_task_rows, solve_countdown)

sys.modules.setdefault("uft", sys.modules[__name__])   # `python uft.py` and `import uft` are one module
import models  # noqa: E402  (support modules; they import uft back)
import runs  # noqa: E402
from models import (BASE_RECIPE, BASE_RECIPES, BUILTIN, DEFAULT_CACHE, builtin_base,  # noqa: E402,F401
                    builtin_init, load_model, warmup_rows)
from runs import paired_comparison, plot_run, run_summary  # noqa: E402,F401

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

    A group whose rewards are all equal gets A = 0 exactly: it carries no policy-gradient signal. (In float32
    a group of eight 0.1s has mean 0.1 + 7e-9 and std 8e-9, which gives A = -0.0074 for every sample; Adam
    turns that into full-size steps against every sampled answer. docs/method.md, deviation 9.)
    >>> group_advantages(torch.tensor([[1.0, 0.0], [0.1, 0.1]]))
    tensor([[ 0.7071, -0.7071],
            [ 0.0000,  0.0000]])
    """
    # BEGIN SOLUTION: (r - group mean) / (unbiased group std + eps) in float64; equal groups (and G = 1) get 0
    r = rewards.double()
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if r.shape[-1] > 1 else torch.zeros_like(mean)
    equal = (rewards == rewards[..., :1]).all(-1, keepdim=True)                     # (B, 1)
    return torch.where(equal, 0.0, (r - mean) / (std + eps)).to(rewards.dtype)
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

def clipped_fraction(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                     epsilon: float) -> torch.Tensor:
    """(N, L) bool: tokens where the PPO clip acts (ratio > 1 + eps with A > 0, or < 1 - eps with A < 0).

    With one optimizer update per step the ratio is exactly 1 and nothing is ever clipped.
    """
    ratio = torch.exp(logp - old_logp)
    return ((ratio > 1 + epsilon) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))



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

def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                      vocab_size: int | None = None) -> torch.Tensor:
    """Teacher-forced log-probs of ids[:, 1:] with the sampler's mask, positions, temperature: (B, S - 1)."""
    logits = forward_logits(model, ids, mask, ids.shape[1] - 1)
    return token_logprobs(logits, ids[:, 1:], temperature, vocab_size)



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


def empty_rollout(num_prompts: int, group_size: int, width: int, pad_id: int, device) -> Rollout:
    """The sampler's output buffers: every row pad, length 0, unfinished."""
    N = num_prompts * group_size
    return Rollout(torch.arange(num_prompts, device=device).repeat_interleave(group_size),
                   torch.full((N, width), pad_id, dtype=torch.long, device=device),
                   torch.zeros(N, dtype=torch.long, device=device),
                   torch.zeros(N, dtype=torch.bool, device=device),
                   torch.zeros((N, width), dtype=torch.float32, device=device))


# ==========================================================================================================
# 5. Training: the state, the pieces of a step, and the loop (the paper's Algorithm 1 and its baselines)
# ==========================================================================================================

def phase_of(algo: str, step: int, sft_steps: int) -> str:
    """'sft' or 'rl' for this step: sft always, sft-rft for its first sft_steps, the others never."""
    return "sft" if algo == "sft" or (algo == "sft-rft" and step <= sft_steps) else "rl"


def total_steps(args) -> int:
    """Training steps of the run: T, plus the SFT phase for sft-rft (whose RL phase gets rft's T steps)."""
    return args.T + (args.sft_steps if args.algo == "sft-rft" else 0)


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


@dataclasses.dataclass
class State:
    """What a training step changes, and a checkpoint saves; every setting comes in as an argument."""
    model: torch.nn.Module                          # the policy being trained
    ref: torch.nn.Module | None                     # frozen reference of the KL term; None when beta == 0
    optimizer: torch.optim.Optimizer                # AdamW of the current phase (sft-rft: a new one at its switch)
    scheduler: torch.optim.lr_scheduler.LambdaLR    # its learning rate, stepped once per training step
    rng: random.Random                              # hint draws
    generator: torch.Generator                      # sampling
    step: int = 0                                   # the step being run (after it, the last one finished)


def hinted_prompts(rows: list[dict], hints: list[tuple], encode) -> tuple[list[list[int]], list[int]]:
    """Question + hint token ids per row, and each hint's length in tokens (the hint-NLL mask).

    Fragments are encoded one by one, as SFT encodes answers, so a hint is the first tokens of the answer.
    """
    q_ids = [encode(r["question"]) for r in rows]
    h_ids = [[t for f in r["hint"][:n] for t in encode(f)] for r, (_, n, _) in zip(rows, hints)]
    return [q + h for q, h in zip(q_ids, h_ids)], [len(h) for h in h_ids]


def completions(tokenizer, out: Rollout) -> tuple[list[list[int]], list[str]]:
    """Each row's completion ids (its EOS included) and text (special tokens dropped)."""
    ids = [out.ids[i, : out.lengths[i]].tolist() for i in range(out.ids.shape[0])]
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=True)


def rollout_stats(rewards: torch.Tensor, out: Rollout, G: int, hint_shown: float, drawn: float,
                  seconds: float) -> dict:
    """The step's rollout statistics, over every process's rollouts."""
    rewards, lengths, finished = (common.cat_over_ranks(x) for x in (rewards, out.lengths, out.finished))
    grouped = rewards.view(-1, G)                                                   # (B, G)
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "train_accuracy": float((rewards == 1.0).float().mean()),
            "train_format_rate": float((rewards > 0).float().mean()),                   # an answer found
            "formatted_groups": float((grouped > 0).any(-1).float().mean()),            # >= 1 with one
            "zero_std_groups": float((grouped == grouped[:, :1]).all(-1).float().mean()),   # A = 0
            "solved_groups": float((grouped == REWARD_CORRECT).any(-1).float().mean()),   # >= 1 correct
            "hint_fraction": hint_shown, "hint_fraction_drawn": drawn,
            "response_length": float(lengths.float().mean()),
            "truncated": float((~finished).float().mean()),
            "rollout_tokens": int(lengths.sum()),
            "rollout_tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9)}


def rl_micro_step(model, ref, part: Batch, old_logp: torch.Tensor | None, n_response: int, n_hint: int,
                  a, vocab: int, use_hint_nll: bool) -> tuple[torch.Tensor, dict]:
    """Score one micro-batch with the policy (and the frozen reference), then `rl_loss` on it."""
    G = a.num_generations
    hint_logp, logp, entropy = score(model, part, a.temperature, vocab, with_entropy=True, group_size=G)
    old = logp.detach() if old_logp is None else old_logp[:, : logp.shape[1]]  # one update per step: ratio 1
    ref_logp = None
    if ref is not None:
        with torch.no_grad():
            ref_logp = score(ref, part, a.temperature, vocab, group_size=G)[1]
    return rl_loss(logp, old, ref_logp, entropy, hint_logp, part.target_mask, part.hint_mask, part.advantages,
                   epsilon=a.epsilon, beta=a.beta, entropy_coef=a.entropy_coef,
                   sft_loss_coef=a.sft_loss_coef if use_hint_nll else 0.0, n_response=n_response,
                   n_hint=n_hint)


def sampling_policy_logp(model, batch: Batch, a, vocab: int, rows_per_pass: int) -> torch.Tensor:
    """Target log-probs (N, L) under the current policy, before any update: the PPO ratio's denominator."""
    L, parts = batch.target_mask.shape[1], []
    model.eval()
    with torch.no_grad():
        for index in micro_batches(batch.ids.shape[0], rows_per_pass):
            logp = score(model, batch.rows(index), a.temperature, vocab, group_size=a.num_generations)[1]
            parts.append(widen(logp, L))                                                       # (n, L)
    return torch.cat(parts)


def rl_update(state: State, batch: Batch, a, vocab: int, use_hint_nll: bool) -> dict:
    """PPO over mini-batches of `mini_batch_size` prompts, an optimizer step each, over micro-batches.

    Micro-batches hold whole groups (micro_batch_size rows rounded down to a multiple of G, at least one),
    so each forward pass runs a group's shared prompt once. Token means run over the whole mini-batch
    (`total`: summed over processes), so accumulated micro-batch losses add up to them.
    """
    G = a.num_generations
    rows_per_update = common.per_process(a.mini_batch_size) * G          # this process's rows of an update
    rows_per_pass = max(1, a.micro_batch_size // G) * G
    updates = list(micro_batches(batch.ids.shape[0], rows_per_update))
    # later updates need the log-probs of the policy that sampled; a single update has them in its own graph
    old_logp = sampling_policy_logp(state.model, batch, a, vocab, rows_per_pass) if len(updates) > 1 else None
    state.model.train()
    totals, norms, skipped = {}, [], 0
    for update in updates:
        mini = batch.rows(update)
        n_response, n_hint = common.total(int(mini.target_mask.sum())), common.total(int(mini.hint_mask.sum()))
        # --skip_silent_updates: with every A = 0 (and no hint NLL) an update carries no signal, but Adam would
        # still step, replaying its momentum from the last rare success (docs/sparse-rewards.md)
        signal = common.total(int(mini.advantages.any())) or (use_hint_nll and a.sft_loss_coef > 0 and n_hint)
        silent = a.skip_silent_updates and not signal
        for index in micro_batches(update.numel(), rows_per_pass):
            part, old = mini.rows(index), None if old_logp is None else old_logp[update][index]
            loss, stats = rl_micro_step(state.model, state.ref, part, old, n_response, n_hint, a, vocab,
                                        use_hint_nll)
            if not silent:                   # a silent update is scored (its terms are logged), not stepped
                backward(loss, state.step)
            for k, v in {**stats, "loss": loss.item()}.items():
                totals[k] = totals.get(k, 0.0) + v / len(updates)
        skipped += silent
        norms.append(0.0 if silent else optimizer_step(state.model, state.optimizer, a.max_grad_norm))
    totals = {k: common.total(v) for k, v in totals.items()}    # each process's share of the token means
    return {**totals, "grad_norm": sum(norms) / len(norms), "updates": len(updates) - skipped}


def sft_batch(tokenizer, rows: list[dict], device=None, encode=None) -> Batch:
    """question -> answer + EOS; only the answer and its EOS are targets (the prompt is masked by layout).

    encode: text -> token ids (default: the tokenizer without special tokens; a run passes its cached one).
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
    total, loss_sum = common.total(int(batch.target_mask.sum())), 0.0     # over every process's targets
    model.train()
    for index in micro_batches(batch.ids.shape[0], micro_batch_size):
        part = batch.rows(index)
        _, logp, _ = score(model, part, 1.0, vocab_size)                                 # (n, L)
        loss = masked_nll(logp, part.target_mask, num_tokens=total)
        backward(loss, step)
        loss_sum += loss.item()
    norm = optimizer_step(model, optimizer, max_grad_norm)
    loss_sum = common.total(loss_sum)                          # the processes' shares of the token mean
    return {"loss": loss_sum, "sft_nll": loss_sum, "grad_norm": norm, "updates": 1}


def train(args) -> dict:
    """Run args.algo for its steps (uft: the paper's Algorithm 1); write the run folder; return the base and
    final held-out results. A step: problems -> hints -> G samples each -> rewards -> group advantages ->
    score and loss -> optimizer step -> log, evaluate, save."""
    a, G = args, args.num_generations
    run = runs.start(a)              # rows, model, State; the base model evaluated (or a checkpoint resumed)
    state, tok, vocab = run.state, run.tokenizer, len(run.tokenizer)
    for step in runs.steps(run, total_steps(a)):
        state.step, start, samples = step, time.perf_counter(), []
        rows = [run.train_rows[i] for i in rows_for_step(len(run.train_rows), a.batch_size, step, a.seed)]
        phase = phase_of(a.algo, step, a.sft_steps)
        if phase == "sft":                   # sft, and sft-rft's first sft_steps: the NLL of whole answers
            batch = sft_batch(tok, shard(rows, a.batch_size), state.model.device, run.encode)
            metrics = sft_update(state.model, batch, vocab, state.optimizer, micro_batch_size=a.micro_batch_size,
                                 max_grad_norm=a.max_grad_norm, step=step)
        else:
            t = step - (a.sft_steps if a.algo == "sft-rft" else 0)        # counts from 1 in the RL phase
            if a.algo == "sft-rft" and t == 1:   # the switch: fresh AdamW and schedule; the KL keeps RFT near SFT
                state.optimizer, state.scheduler = optimizer_for(a, state.model, "rl")
                state.ref = frozen_copy(state.model) if a.beta > 0 else None
            schedule, use_hint_nll = a.hint_schedule or ALGOS[a.algo][0], ALGOS[a.algo][1]
            hints = [sample_hint(r["hint"], schedule, t, state.rng, a.T_hint, a.p_low, a.p_high) for r in rows]
            drawn = sum(f for _, _, f in hints) / len(hints)                  # mean k / K this step
            rows, hints = shard(rows, a.mini_batch_size), shard(hints, a.mini_batch_size)  # one process: all
            prompts, hint_lengths = hinted_prompts(rows, hints, run.encode)
            sampled, seconds = timed(generate, state.model, tok, prompts, num_generations=G,
                                     max_new_tokens=a.max_completion_length, temperature=a.temperature,
                                     top_p=a.top_p, top_k=a.top_k, generator=state.generator)
            ids, texts = completions(tok, sampled)
            owner = sampled.prompt_index.tolist()                             # row -> its prompt
            rewards = torch.tensor([tasks.reward(rows[p], rows[p]["question"] + hints[p][0] + text)
                                    for p, text in zip(owner, texts)])                       # (N,)
            trained = torch.where(rewards == tasks.REWARD_WRONG, a.format_reward, rewards)  # released: 0.1
            advantages = group_advantages(trained.view(-1, G)).view(-1)                       # (N,)
            batch = make_batch([prompts[p] for p in owner], ids, [hint_lengths[p] for p in owner],
                               tok.pad_token_id, advantages=advantages, device=state.model.device)
            shown = hint_fraction(t, a.T_hint, a.p_low, a.p_high) if schedule == "cosine" else drawn
            metrics = {**rollout_stats(rewards, sampled, G, shown, drawn, seconds),
                       **rl_update(state, batch, a, vocab, use_hint_nll)}    # score, loss, optimizer step
            samples = [{"hint": hints[p][0], "completion": texts[i], "reward": float(rewards[i])}
                       for i, p in enumerate(owner[:G])]                      # the first group
        state.scheduler.step()               # the schedule counts training steps, not optimizer updates
        metrics = {"phase": phase, **metrics, "step": step, "lr": state.scheduler.get_last_lr()[0],
                   "step_seconds": time.perf_counter() - start}
        runs.end_step(run, metrics, samples)  # budget; evaluate every eval_steps; metrics.jsonl; checkpoint
    return runs.finish(run)


############################################################################################################
# Support code: evaluation and the command line. Nothing below is part of the method; it measures the method
# and makes it runnable.
############################################################################################################

def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int = 96, batch_size: int = 256,
             num_samples: int = 4, progress: bool = False) -> tuple[dict, list[dict]]:
    """Accuracy (reward == 1), mean reward, format rate (an answer was extracted) of greedy completions, and
    `rewards`, one per row in order (for paired comparisons of two models). Rows of several sources (a mixed
    file) add `accuracy_by_source` and its unweighted mean `accuracy_source_mean`."""
    from tqdm.auto import tqdm

    rewards, samples, lengths = [], [], []
    block = common.rank_block(len(rows))              # this process's rows (one process: all of them)
    mine = rows[block.start: block.stop]
    for start in tqdm(range(0, len(mine), batch_size), desc="eval", leave=False,
                      disable=not progress or not common.is_main()):
        chunk = mine[start: start + batch_size]
        prompts = [tokenizer(r["question"], add_special_tokens=False)["input_ids"] for r in chunk]
        out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        texts = completions(tokenizer, out)[1]
        for row, text in zip(chunk, texts):
            rewards.append(tasks.reward(row, row["question"] + text))
            if len(samples) < num_samples:
                shown = tasks.TASKS[tasks.task_of(row) or "countdown"].sample_fields
                samples.append({**{k: row[k] for k in shown}, "completion": text, "reward": rewards[-1]})
        lengths.extend(out.lengths.tolist())
    rewards, lengths = common.gather_in_order(rewards), common.gather_in_order(lengths)   # every process's
    samples = common.gather_in_order(samples)[:num_samples]
    r = torch.tensor(rewards)
    metrics = {"accuracy": float((r == 1.0).float().mean()), "reward": float(r.mean()),
               "format_rate": float((r > 0).float().mean()), "length": sum(lengths) / len(lengths)}
    by_source = tasks.accuracy_by_source(rows, rewards)
    if len(by_source) > 1:      # a mixed file: each source's accuracy and their unweighted mean
        metrics.update(accuracy_by_source=by_source,
                       accuracy_source_mean=sum(by_source.values()) / len(by_source))
    return {**metrics, "rewards": rewards}, samples


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def read_rows(args, files: str, split: str = "train") -> list[dict]:
    """Rows of comma-separated files, folders or Hub datasets (their `split`) of the released schema, each row
    checked by its own task (--task for rows without a data_source, --math_levels for MATH rows)."""
    levels = {int(x) for x in args.math_levels.split(",")} if args.math_levels else None
    columns = tasks.parse_columns(getattr(args, "data_columns", None))
    try:
        return [row for path in files.split(",")
                for row in tasks.load_task_rows(path.strip(), split, task=args.task, math_levels=levels,
                                                columns=columns)]
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None


def load_rows(args) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows: a built-in split (countdown, kk, tree), or --data / --test_data files of
    the released schema (no validation rows); countdown questions in --prompt_style."""
    style = getattr(args, "prompt_style", "released")          # runs saved before the flag: released
    try:
        return tuple(tasks.restyle(rows, style) for rows in unstyled_rows(args))
    except ValueError as err:
        raise UserError(str(err)) from None


def unstyled_rows(args) -> tuple[list[dict], list[dict], list[dict]]:
    """load_rows before --prompt_style."""
    if args.data == "countdown":
        split = dict(seed=args.seed, min_nums=args.min_nums, max_nums=args.max_nums)
        train, test = countdown_split(args.num_train, args.num_test, **split)
        val = countdown_validation(args.num_val, **split) if args.num_val else []
        return train, val, test
    if args.data == "tree":                     # num_train trees, trained and evaluated on (tasks.tree_split)
        train, test = tasks.tree_split(args.num_train, 0, args.seed, args.tree_branching, args.tree_height,
                                       args.tree_ids)
        return train, [], test
    if args.data == "kk":                       # the task's own seeded, disjoint split
        people = dict(min_people=args.min_people, max_people=args.max_people)
        train, test = tasks.kk_split(args.num_train, args.num_test, args.seed, **people)
        return train, [], test
    rows = read_rows(args, args.data, args.data_split)
    test_rows = read_rows(args, args.test_data, args.test_split) if args.test_data else None
    if test_rows is not None:
        return rows[: args.num_train], [], test_rows[: args.num_test]
    if len(rows) <= args.num_test:
        raise UserError(f"--data {args.data}: {len(rows)} rows leave nothing to train on after --num_test "
                        f"{args.num_test} held-out rows; lower --num_test or pass --test_data")
    return rows[args.num_test: args.num_test + args.num_train], [], rows[: args.num_test]


# Every setting of a run, grouped by topic: (flag, default, help[, argparse options]). `--help`, the flag
# table of docs/flags.md and config.json all come from this table. Defaults are CPU-sized; the released GPU
# runs' values are named where they differ (docs/method.md has the full comparison).
MODEL_FLAGS = [
    ("model", None, "'builtin' (default; 'builtin-kk' with --data kk; experiments: 'builtin-weak', "
                    "'builtin-mix'), a hub id, or a local folder", {"type": str}),
    ("gguf_file", None, "a .gguf file (in --model's folder, or a full path)", {"type": str}),
    ("dtype", "float32", "weights and compute dtype", {"choices": list(DTYPES)}),
    ("device", "auto", "where to train", {"choices": ["auto", "cpu", "cuda", "mps"]}),
    ("trust_remote_code", False, "allow model code from the hub", {"action": "store_true"}),
    ("chat_template", False, "wrap each question in the tokenizer's chat template (instruct models): the user "
                             "turn, then the released 'Assistant:' opening and any hint in the assistant turn",
     {"action": "store_true"}),
    ("prompt_style", "released", "countdown questions: 'released' (the paper's prompt, for base models) or "
                                 "'short' (no preamble; for small instruct models)",
     {"choices": list(tasks.PROMPT_STYLES)}),
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
        ("beta", 0.05, "k3 KL coefficient; 0 keeps no reference model (released: 0.001; 0.05 chosen on "
                       "validation, docs/collapse.md)", {"range": "[0, inf)"}),
        ("entropy_coef", 0.0, "entropy bonus on response tokens (released GPU runs: 0.001)",
         {"range": "[0, inf)"}),
        ("format_reward", 0.1, "training reward of an answer that is extracted but wrong (the released 0.1; "
                               "evaluation keeps 0.1); 0 leaves correct answers the only signal",
         {"range": "[0, 1]"}),
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
        ("skip_silent_updates", False, "RL: skip the optimizer update when every group's advantage is 0 and no "
                                       "hint NLL applies (not in the paper; docs/sparse-rewards.md)",
         {"action": "store_true"}),
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
        ("data", "countdown", "'countdown', 'kk' or 'tree' (built in), or a .parquet/.json/.jsonl/.csv file, a "
                              "save_to_disk folder or a Hub dataset id (owner/name), read by `datasets`"),
        ("test_data", None, "held-out data, comma-separated (default: the first num_test rows of --data)",
         {"type": str}),
        ("data_split", "train", "the split of --data when it is a Hub dataset or a save_to_disk DatasetDict"),
        ("test_split", "test", "the split of --test_data when it is a Hub dataset or a save_to_disk DatasetDict"),
        ("data_columns", None, "rename a dataset's columns to the project's fields: ours=theirs,... "
                               "(e.g. nums=numbers,target=answer)", {"type": str}),
        ("task", "countdown", "the task of file rows without a data_source (rows with one use its task)",
         {"choices": list(tasks.TASKS)}),
        ("math_levels", None, "MATH rows: keep only these levels, comma-separated (the paper: 3,4,5); "
                              "default all", {"type": str}),
        ("num_train", 5000, "training problems", {"range": "[1, inf)"}),
        ("num_test", 500, "held-out problems for evaluation", {"range": "[1, inf)"}),
        ("num_val", 0, "built-in countdown: validation problems (disjoint from the held-out ones) to choose "
                       "settings on; evaluated beside them as val_*", {"range": "[0, 1000]"}),
        ("min_nums", 3, "built-in countdown: fewest numbers per problem", {"range": "[3, 6]"}),
        ("max_nums", 3, "built-in countdown: most numbers per problem", {"range": "[3, 6]"}),
        ("min_people", 2, "built-in K&K: fewest inhabitants per puzzle (the paper: 3-7)", {"range": "[2, 8]"}),
        ("max_people", 3, "built-in K&K: most inhabitants per puzzle", {"range": "[2, 8]"}),
        ("tree_branching", 3, "built-in tree: B, choices per level", {"range": "[2, 8]"}),
        ("tree_height", 4, "built-in tree: H, levels (the path has H choices)", {"range": "[1, 20]"}),
        ("tree_ids", "test", "built-in tree: the id range the seed draws trees from (choose settings on "
                             "'validation')", {"choices": ["test", "validation"]}),
        ("max_prompt_length", 1024, "rows whose question is longer (in tokens) are skipped and counted "
                                    "(released runs: 256 countdown, 1024 MATH and K&K)",
         {"range": "[1, inf)"}),
    ],
    "model": MODEL_FLAGS,
    "run": [
        ("output_dir", None, "run folder (default runs/<algo>-<date>-<time>-<pid>)", {"type": str}),
        ("overwrite", False, "replace the run that --output_dir holds (otherwise refused)",
         {"action": "store_true"}),
        ("resume", None, "a run folder to continue from its last checkpoint, with its saved flags (no "
                         "other flag is accepted)", {"type": str}),
        ("eval_only", False, "only evaluate --model (or a run folder's checkpoint) on the held-out rows "
                             "(--test_data); writes the same metrics and samples", {"action": "store_true"}),
        ("eval_steps", 50, "evaluate every this many steps", {"range": "[1, inf)"}),
        ("stop_at", None, "end the run at the first evaluation whose held-out accuracy reaches this "
                          "(steps-to-solve experiments)", {"type": float, "range": "[0, 1]"}),
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
                    "GPU settings are in docs/scaling.md.")
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
    if args.num_val and args.data != "countdown":
        p.error("--num_val is for the built-in countdown only")
    check_data_flags(p, args, separator=",")
    if args.math_levels and not all(x.strip().isdigit() for x in args.math_levels.split(",")):
        p.error(f"--math_levels {args.math_levels!r}: give comma-separated level numbers, e.g. 3,4,5")
    resolve_sft_length(p, args)


def check_data_flags(p, args, separator: str | None = None) -> None:
    """The data flags uft.py and sft_go.py share: each --data / --test_data file exists (several, split at
    `separator`), and the built-in tasks' size ranges are in order."""
    if not args.min_nums <= args.max_nums or not args.min_people <= args.max_people:
        p.error(f"need --min_nums <= --max_nums and --min_people <= --max_people (got {args.min_nums}, "
                f"{args.max_nums}, {args.min_people}, {args.max_people})")
    for name in ("data", "test_data"):
        value = getattr(args, name) or ""
        for path in value.split(separator) if separator else [value]:
            if not path or path in tasks.GENERATED:
                continue
            try:
                tasks.data_location(path.strip())   # a file, a save_to_disk folder or a Hub dataset id
            except FileNotFoundError:
                where = f" (not one of {', '.join(tasks.GENERATED)})" if name == "data" else ""
                p.error(f"--{name} {path!r}: no such file{where}")
            except ValueError as err:
                p.error(f"--{name}: {err}")
    try:
        tasks.parse_columns(getattr(args, "data_columns", None))
    except ValueError as err:
        p.error(f"--data_columns: {err}")


def flag(name: str) -> tuple:
    """The entry of flag `name` in FLAGS (sft_go.py shares some)."""
    return next(entry for entries in FLAGS.values() for entry in entries if entry[0] == name)


def resolve_sft_length(p, args) -> None:
    """--sft_epochs becomes steps (T for sft, --sft_steps for sft-rft); --sft_steps defaults to T."""
    if args.sft_epochs is not None:
        steps = math.ceil(args.sft_epochs * args.num_train / args.batch_size)
        args.T, args.sft_steps = (steps, args.sft_steps) if args.algo == "sft" else (args.T, steps)
        args.sft_epochs = None               # applied: a resumed run must not apply it again
    if args.sft_steps is None:
        args.sft_steps = args.T


# Flags whose default depends on --data: (built-in countdown or a file, --data kk, --data tree). A K&K run
# starts from the K&K base and needs room for a trace (2-3 inhabitants: ~60 tokens, at most ~120; countdown
# ~40); a tree answer is one token per level, " ." and EOS.
DATA_DEFAULTS = {"model": (BUILTIN, "builtin-kk", "builtin-tree"), "max_completion_length": (64, 128, 24)}


def data_defaults(args, table: dict = DATA_DEFAULTS) -> None:
    """Fill the flags left at None from `table` by --data (a table without a tree column: kk's value)."""
    column = {"kk": 1, "tree": 2}.get(args.data, 0)
    for flag, values in table.items():
        if getattr(args, flag) is None:
            setattr(args, flag, values[min(column, len(values) - 1)])


def parse_args(argv=None):
    import argparse

    p = build_parser()
    args = p.parse_args(argv)
    guards.refuse_empty_values(p, args)           # --output_dir '' or UFT_CACHE='' would mean "here"
    if args.resume:
        extra = [f"--{name}" for name in common.given_flags(build_parser, argv) if name != "resume"]
        if extra:          # one behaviour: a resumed run is the run that was started, never a mix
            p.error(f"--resume takes no other flag (got {' '.join(extra)}): a resumed run keeps its saved "
                    "flags; start a new run (--output_dir) to change them")
        folder = Path(args.resume)
        try:
            if folder.is_dir() and guards.is_first_rank():
                guards.own_folder(folder, "--resume")    # refused while the run still trains
            common.recover_run_folder(folder)          # a kill during a checkpoint swap or a log rewrite
            if not (folder / "checkpoint" / "trainer_state.pt").exists():
                p.error(f"--resume {args.resume!r}: no checkpoint there (expected checkpoint/trainer_state.pt)")
            saved = common.read_config(folder)
            guards.check_resume(folder, saved, p)      # as trained: types, values, data files unchanged
        except UserError as err:
            p.error(str(err))
        saved.update(resume=args.resume, output_dir=args.resume)
        args = argparse.Namespace(**{**vars(p.parse_args([])), **saved})   # newer flags: their defaults
    if args.output_dir is None:
        args.output_dir = guards.default_output_dir(args.algo)
    data_defaults(args)
    check_args(p, args)
    if not args.resume:
        guards.pin_data_files(args, tasks.GENERATED)   # absolute paths and sha256s, for a later --resume
    return args



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


def main(argv=None) -> int:
    """The command line: exit status 0 done, 2 bad input, 1 a failure mid-run, 130/143 SIGINT/SIGTERM."""
    with guards.owned_folders():             # the run folder's lock is given up however the run ends
        args = parse_args(argv)
        quiet_libraries()
        return common.run_cli(lambda: run_and_report(args), lambda: runs.where_to_resume(args))


def run_and_report(args) -> int:
    common.init_distributed(args.device)     # under torchrun: join the job (otherwise nothing happens)
    check_world(args)
    start = time.time()
    if args.eval_only:
        result = runs.evaluate_only(args)
        if common.is_main():
            runs.print_evaluation(result)
        return 0
    try:
        with bf16_autocast(args):
            result = train(args)
    except FloatingPointError as err:
        raise common.RunFailed(f"{err}: stopped; the last good checkpoint is in "
                               f"{Path(args.output_dir) / 'checkpoint'} (try a lower --learning_rate)") from None
    if common.is_main():
        runs.print_result(args.algo, result, minutes=(time.time() - start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
