"""SFT-GO: Supervised Fine-Tuning with Group Optimization (Kim, Thakur, Park, Wei, Bao; arXiv 2506.15021).

Plain SFT averages the loss over every response token, so a few informative tokens are drowned by many
easy ones. SFT-GO splits each response into an *important* and an *unimportant* token group and trains on

    L_GO = (1 - lam) * L_CE + lam * max_g L_g        (L_g = token-mean loss of group g; the paper: lam = 0.9)

This file holds the token-importance scores (TF-IDF, excess loss, a token classifier, random), the top-eta
grouping, the worst-group loss (hard max or online Group-DRO weights), the lambda schedules, the Rho-1 and
plain-CE baselines, and a trainer that writes a run folder. The method is documented in docs/method.md
(Part II). Model loading, batches, scoring and the plain SFT step come from uft.py; data order,
micro-batches and the optimizer from common.py; countdown and its answer pieces from tasks.py.

Run:
    python sft_go.py            # CPU, ~3 min: plain SFT, then SFT-GO (TF-IDF, lam 0.3, eta 0.7: the setting
                                # chosen on validation problems), same seed and budget; ends with the paired
                                # change of held-out accuracy and its 95% interval
    python sft_go.py --loss go --grouping excess          # excess-loss groups (builds a cached reference)
    python sft_go.py --loss ce,go,rho1 --grouping random  # the random-group control and Rho-1
    python sft_go.py --model meta-llama/Llama-3.2-1B --device cuda --dtype bfloat16 --data alpaca.jsonl \\
        --loss ce,go --grouping classifier --classifier microsoft/llmlingua-2-xlm-roberta-large-meetingbank \\
        --learning_rate 1e-5 --T 1000 --batch_size 64 --micro_batch_size 8    # one GPU, a hub model
    torchrun --nproc_per_node 2 sft_go.py --model <model> --device cuda     # data parallel (docs/scaling.md)
    python sft_go.py --help     # every flag with its default
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import guards

if __name__ == "__main__":       # Ctrl-C while torch and transformers load: exit 130, one line, no traceback
    guards.exit_quietly_on_ctrl_c()

import torch  # noqa: E402

import common  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
import tasks  # noqa: E402
import uft  # noqa: E402
from common import (UserError, add_flags, append_jsonl, backward, check_offsets, highlighted_html,  # noqa: E402
                    make_optimizer, micro_batches, optimizer_step, rows_for_step, widen)
from models import DEFAULT_CACHE, load_model  # noqa: E402
from runs import plot_losses, run_folders, summary_table, where_to_restart  # noqa: F401, E402
from tasks import answer_pieces, as_sft_row, load_sft_rows  # noqa: E402
from uft import Batch, make_batch, score, sft_update  # noqa: E402

UNIMPORTANT, IMPORTANT, UNSUPERVISED = 0, 1, -1   # group ids of response tokens; prompt and padding: -1
LOSSES, GROUPINGS = ("ce", "go", "rho1"), ("tfidf", "excess", "classifier", "random")
LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "exp")
EXP_DECAY_RATE = 5.0    # 'exp' schedule: lam0 * exp(-5 t / T), i.e. lam is 0.7% of lam0 at the end
WORD = re.compile(r"\w+|[^\w\s]")   # a word: a run of letters/digits/_ or one punctuation mark

# --- Data: rows {prompt, response} from built-in countdown or files (tasks.load_sft_rows) --------

def load_rows(args) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows, as uft.load_rows: uft's built-in split (countdown, kk; validation rows
    with countdown's --num_val) as prompt/response rows, or --data (and --test_data) files (no validation)."""
    if args.data in tasks.GENERATED:
        return tuple([as_sft_row(r) for r in rows] for rows in uft.load_rows(args))
    rows = load_sft_rows(args.data)
    if args.test_data:
        return rows[: args.num_train], [], load_sft_rows(args.test_data)[: args.num_test]
    if len(rows) <= args.num_test:
        raise UserError(f"--data {args.data}: {len(rows)} rows, need more than --num_test {args.num_test}")
    return rows[args.num_test: args.num_test + args.num_train], [], rows[: args.num_test]


def split_rows(train: list[dict], val: list[dict], test: list[dict]) -> dict[str, list[dict]]:
    """Split name -> rows; validation last and only when there is some (random scores are drawn per split in
    this order, see static_scores)."""
    return {"train": train, "test": test, **({"val": val} if val else {})}


@dataclasses.dataclass
class Encoded:
    """Token ids of a list of rows; each response ends with EOS, whose character span is empty."""
    prompts: list[list[int]]
    responses: list[list[int]]
    offsets: list[list[tuple[int, int]]]   # character span of each response token in the response text


def encode_rows(tokenizer, rows: list[dict], max_prompt: int, max_response: int,
                offsets: bool = True) -> Encoded:
    """Prompt and response tokenised separately (as the sampler sees them); long prompts keep their end.

    A response is tokenised piece by piece (`tasks.answer_pieces`: countdown answers hint fragment by
    fragment, as uft's SFT does, so SFT-GO trains on the built-in model's token boundaries).
    offsets=False skips the character offsets (slow tokenizers have none; only word scores need them).
    """
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    pieces = [answer_pieces(r, key="response") for r in rows]
    enc = tokenizer([p for ps in pieces for p in ps], add_special_tokens=False,
                    return_offsets_mapping=offsets)
    responses, spans, k = [], [], 0
    for ps in pieces:
        ids, offs, start = [], [], 0
        for piece in ps:                                 # concatenate the pieces, shifting their offsets
            ids += enc["input_ids"][k]
            offs += [(a + start, b + start) for a, b in enc["offset_mapping"][k]] if offsets else []
            start, k = start + len(piece), k + 1
        responses.append((ids + [tokenizer.eos_token_id])[:max_response])
        spans.append((offs + [(start, start)])[:max_response])          # EOS: an empty span at the end
    return Encoded([p[-max_prompt:] for p in prompts], responses, spans if offsets else [])


# --- Token importance (docs/method.md section 11): a score per response token, higher = important

def smooth_idf(docs: list[list]) -> tuple[dict, float]:
    """idf(t) = ln((1 + n) / (1 + df(t))) + 1 over n documents, and the idf of an unseen term (df = 0).

    >>> idf, unseen = smooth_idf([["a", "b"], ["b"]])       # df(a) = 1, df(b) = 2
    >>> idf["a"], idf["b"], unseen                          # ln(3/2) + 1, ln(3/3) + 1, ln(3) + 1
    (1.4054651081081644, 1.0, 2.09861228866811)
    """
    n = len(docs)
    df = Counter(term for doc in docs for term in set(doc))
    return {t: math.log((1 + n) / (1 + d)) + 1 for t, d in df.items()}, math.log(1 + n) + 1


def tfidf_scores(docs: list[list], idf_docs: list[list] | None = None) -> list[list[float]]:
    """tf-idf of every term occurrence: tf = the term's count in its document, idf from idf_docs or docs.

    Terms are token ids (`--tfidf_unit token`) or lower-cased words (`word`). Computed once, before training.
    >>> tfidf_scores([["a", "b", "a"], ["b"]])   # idf(a) = ln(3/2) + 1, idf(b) = 1
    [[2.8109302162163288, 1.0, 2.8109302162163288], [1.0]]
    """
    # BEGIN SOLUTION: tf (count of the term in its document) * smooth idf, for every occurrence
    idf, unseen = smooth_idf(docs if idf_docs is None else idf_docs)
    out = []
    for doc in docs:
        tf = Counter(doc)
        out.append([tf[t] * idf.get(t, unseen) for t in doc])
    return out
    # END SOLUTION


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of `text` (runs of \\w, or single punctuation marks).

    >>> word_spans("(12 + 7) is 19")
    [(0, 1), (1, 3), (4, 5), (6, 7), (7, 8), (9, 11), (12, 14)]
    """
    return [m.span() for m in WORD.finditer(text)]


def spans_to_tokens(spans: list[tuple[int, int]], span_scores: list[float],
                    token_offsets: list[tuple[int, int]], empty: float = 0.0) -> list[float]:
    """Each token gets the max score of the spans its characters overlap; `empty` if it overlaps none.

    A token like 'Ġ+' (offsets (2, 4) in "12 + 7") overlaps the word '+'; a bare space or EOS none.
    >>> spans_to_tokens([(0, 2), (3, 4)], [0.2, 0.9], [(0, 1), (1, 2), (2, 4), (4, 5)])
    [0.2, 0.2, 0.9, 0.0]
    """
    out = []
    for start, end in token_offsets:
        hits = [s for (a, b), s in zip(spans, span_scores) if start < b and a < end]
        out.append(max(hits) if hits else empty)
    return out


def word_tfidf_scores(texts: list[str], offsets: list[list[tuple[int, int]]],
                      idf_texts: list[str] | None = None) -> list[list[float]]:
    """`--tfidf_unit word`: tf-idf of lower-cased words, moved onto the tokens that overlap each word."""
    spans = [word_spans(t) for t in texts]
    words = [[t[a:b].lower() for a, b in s] for t, s in zip(texts, spans)]
    idf_words = None if idf_texts is None else [[t[a:b].lower() for a, b in word_spans(t)]
                                                for t in idf_texts]
    scores = tfidf_scores(words, idf_words)
    return [spans_to_tokens(s, w, o) for s, w, o in zip(spans, scores, offsets)]


def subwords_to_words(spans: list[tuple[int, int]], subword_offsets: list[tuple[int, int]],
                      subword_scores: list[float]) -> list[float]:
    """Mean score of the classifier sub-words overlapping each word (0 for a word cut by truncation).

    >>> subwords_to_words([(0, 4), (5, 7)], [(0, 2), (2, 4), (5, 7)], [0.2, 0.6, 0.9])
    [0.4, 0.9]
    """
    out = []
    for a, b in spans:
        hits = [s for (start, end), s in zip(subword_offsets, subword_scores) if start < b and a < end]
        out.append(sum(hits) / len(hits) if hits else 0.0)
    return out


@torch.no_grad()
def classifier_scores(classifier, cls_tokenizer, texts: list[str], offsets: list[list[tuple[int, int]]],
                      label: int = 1, batch_size: int = 32, overlap: int = 64) -> list[list[float]]:
    """LLMLingua-2-style scores: P(label = keep) per classifier sub-word, mean per word, max per token.
    A text longer than the classifier's limit is scored in windows that overlap by `overlap` sub-words
    (at most a quarter of the limit); a sub-word seen in two windows gets the mean of its scores."""
    classifier.eval()
    limit = min(cls_tokenizer.model_max_length, getattr(classifier.config, "max_position_embeddings", 512))
    enc = cls_tokenizer(texts, return_offsets_mapping=True, truncation=True, max_length=limit,
                        stride=min(overlap, limit // 4), return_overflowing_tokens=True)
    owner = enc["overflow_to_sample_mapping"]                                   # window -> text
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    seen = [{} for _ in texts]                                  # per text: sub-word span -> [sum, count]
    for start in range(0, len(owner), batch_size):
        windows = range(start, min(start + batch_size, len(owner)))
        batch = cls_tokenizer.pad({k: [enc[k][w] for w in windows] for k in inputs}, return_tensors="pt")
        with torch.no_grad():
            logits = classifier(**batch.to(classifier.device)).logits.float()             # (b, S, labels)
        keep = logits.softmax(-1)[..., label].cpu()                                       # (b, S)
        for row, w in enumerate(windows):
            for i, (a, b) in enumerate(enc["offset_mapping"][w]):
                if b > a:                                                     # not CLS/SEP/pad
                    total = seen[owner[w]].setdefault((a, b), [0.0, 0])
                    total[0] += float(keep[row, i])
                    total[1] += 1
    out = []
    for t, text in enumerate(texts):
        subs = sorted(seen[t])
        spans = word_spans(text)
        words = subwords_to_words(spans, subs, [seen[t][o][0] / seen[t][o][1] for o in subs])
        out.append(spans_to_tokens(spans, words, offsets[t]))
    return out


def random_scores(lengths: list[int], seed: int) -> list[list[float]]:
    """The control: i.i.d. uniform scores, fixed per sample (a random split with the same eta)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g).tolist() for n in lengths]


def excess_loss_scores(token_losses: torch.Tensor, ref_losses: torch.Tensor) -> torch.Tensor:
    """Rho-1's score: current loss minus the reference's, detached (a token the reference already knows
    but the model does not is learnable and matters). (B, L), (B, L) -> (B, L)."""
    return token_losses.detach() - ref_losses


def pad_scores(scores: list[list[float]], width: int, device=None) -> torch.Tensor:
    """Per-row score lists -> (B, width), cut or zero-padded to the batch's response width."""
    out = torch.zeros(len(scores), width)
    for row, s in enumerate(scores):
        s = s[:width]
        out[row, : len(s)] = torch.tensor(s, dtype=torch.float32)
    return out.to(device)


def important_count(n: torch.Tensor, eta: float) -> torch.Tensor:
    """How many of n tokens are important: round(eta n), halves up, kept in [1, n - 1] when n >= 2.

    >>> important_count(torch.tensor([1, 2, 10, 11]), 0.3)
    tensor([0, 1, 3, 3])
    """
    k = torch.floor(eta * n + 0.5).long()
    return torch.where(n >= 2, k.clamp(min=1).minimum(n - 1), k)


def top_eta_groups(scores: torch.Tensor, mask: torch.Tensor, eta: float = 0.3,
                   per: str = "sample") -> torch.Tensor:
    """Group ids (B, L): 1 for the top eta fraction of each sample's supervised tokens by score, 0 for the
    rest, -1 where mask is False (prompt, padding). Ties go to the earlier position. per="batch" ranks all
    the batch's tokens together (Rho-1's selection; ties then go to the earlier row).

    >>> top_eta_groups(torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.0]]), torch.tensor([[1, 1, 1, 1, 0]]).bool(), 0.5)
    tensor([[ 0,  1,  1,  0, -1]])
    """
    # BEGIN SOLUTION: 1: each row's top important_count(n, eta) (ties: earlier); 0: rest; -1 off mask
    if per == "batch":
        return top_eta_groups(scores.reshape(1, -1), mask.reshape(1, -1), eta).view_as(mask)
    ranked = scores.float().masked_fill(~mask, float("-inf"))                 # (B, L)
    order = ranked.argsort(dim=-1, descending=True, stable=True)              # ties: earlier first
    rank = order.argsort(dim=-1)                                              # (B, L) 0 = most important
    k = important_count(mask.sum(-1), eta)                                    # (B,)
    groups = (rank < k[:, None]).long()
    return groups.masked_fill(~mask, UNSUPERVISED)
    # END SOLUTION


# --- The loss (docs/method.md section 9): per-token losses first, reductions second ---------------

def token_nll(model, batch: Batch, vocab_size: int) -> torch.Tensor:
    """-log p(y_t | x, y_<t) of every target column, one forward: (B, L); read it via batch.target_mask."""
    return -score(model, batch, 1.0, vocab_size)[1]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, reduce: str = "batch") -> tuple[torch.Tensor, bool]:
    """(mean, non-empty): token-mean over the whole batch, or per sample then over the samples with tokens.

    An empty mask gives (0 with a graph, False) - callers decide; values outside the mask never leak in.
    >>> masked_mean(torch.tensor([[1., 3.], [5., 0.]]), torch.tensor([[1, 1], [1, 0]]).bool(), "per_sample")
    (tensor(3.5000), True)
    """
    values = torch.where(mask, values, torch.zeros_like(values))
    if reduce == "batch":
        n = mask.sum()
        return values.sum() / n.clamp(min=1), bool(n > 0)
    n = mask.sum(-1)                                                          # (B,)
    has = n > 0
    per_sample = values.sum(-1) / n.clamp(min=1)                              # (B,)
    return (per_sample * has).sum() / has.sum().clamp(min=1), bool(has.any())


def group_means(token_losses: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor,
                reduce: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_g (2,), present (2,) bool) for g = 0 unimportant, 1 important."""
    pairs = [masked_mean(token_losses, mask & (groups == g), reduce) for g in (UNIMPORTANT, IMPORTANT)]
    means = torch.stack([m for m, _ in pairs])
    return means, torch.tensor([p for _, p in pairs], device=means.device)


def worst_group_loss(token_losses: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, lam: float,
                     reduce: str = "batch", weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L_GO = (1 - lam) L_CE + lam max_g L_g, and a dict of detached statistics.

    token_losses, groups, mask: (B, L). An empty group is left out of the max, so with one group empty
    L_GO = L_CE for any lam. weights (2,): use sum_g w_g L_g (Group-DRO's q, or Rho-1's (0, 1)) instead of
    the hard max; weight on an empty group is dropped and the rest renormalised. A batch with no supervised
    token raises ValueError (a silent 0 or NaN would hide a data bug).
    With reduce="batch" a token's gradient weight is (1 - lam)/N, plus lam/N_w inside the worst group.
    >>> losses, mask = torch.tensor([[1.0, 3.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool)
    >>> loss, stats = worst_group_loss(losses, torch.tensor([[0, 1, 0]]), mask, 0.9)
    >>> loss, stats["worst_group"]           # CE 2, L_0 = 1.5, L_1 = 3: 0.1 * 2 + 0.9 * 3
    (tensor(2.9000), 1)
    """
    # BEGIN SOLUTION: (1 - lam) CE + lam * worst non-empty group mean (or weighted); and the stats
    if not mask.any():
        raise ValueError("worst_group_loss: no supervised token in the batch (every position is masked)")
    ce, _ = masked_mean(token_losses, mask, reduce)
    means, present = group_means(token_losses, groups, mask, reduce)
    worst = int(means.detach().masked_fill(~present, float("-inf")).argmax())
    if weights is None:
        worst_loss = means[worst]
    else:
        w = weights.to(means.device) * present
        w = w if w.sum() > 0 else present.float()
        worst_loss = (w / w.sum() * means).sum()
    loss = (1 - lam) * ce + lam * worst_loss
    means = means.detach()
    stats = {"ce": float(ce.detach()), "worst_group": worst if bool(present.all()) else -1,
             "loss_unimportant": float(means[0]) if present[0] else None,
             "loss_important": float(means[1]) if present[1] else None}
    return loss, stats
    # END SOLUTION


def update_dro_weights(q: torch.Tensor, group_losses: torch.Tensor, present: torch.Tensor,
                       eta_q: float = 0.01) -> torch.Tensor:
    """Online Group DRO (Sagawa et al. 2020): q_g <- q_g exp(eta_q L_g), renormalised; an empty g keeps q_g.

    >>> both = torch.tensor([True, True])
    >>> update_dro_weights(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 3.0]), both, 0.5)
    tensor([0.2689, 0.7311])
    """
    q = q * torch.exp(eta_q * group_losses.detach().cpu() * present.cpu())
    return q / q.sum()


def lambda_at(step: int, T: int, lam0: float, schedule: str = "constant") -> float:
    """lam at step t (from 1) of T: constant, or linear / cosine / exp decay from lam0 toward 0.

    >>> [round(lambda_at(t, 10, 0.9, "linear"), 2) for t in (0, 5, 10)]
    [0.9, 0.45, 0.0]
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"unknown lambda schedule {schedule!r}; choose one of {LAMBDA_SCHEDULES}")
    frac = min(max(step / T, 0.0), 1.0)
    return {"constant": lam0, "linear": lam0 * (1 - frac),
            "cosine": lam0 * 0.5 * (1 + math.cos(math.pi * frac)),
            "exp": lam0 * math.exp(-EXP_DECAY_RATE * frac)}[schedule]


# --- The reference model of the excess-loss grouping (and Rho-1) ----------------------------------

REFERENCE_SETTINGS = ("ref_steps", "batch_size", "micro_batch_size", "learning_rate", "weight_decay",
                      "lr_scheduler", "max_grad_norm", "seed", "dtype")   # what shapes its training


def reference_folder(args, model_path: str, enc: Encoded) -> Path:
    """Cache folder of the default reference: named after everything that determines its weights, the
    training tokens themselves included (any change of data file, split, task size or length cap shows)."""
    tokens = hashlib.sha256(json.dumps([enc.prompts, enc.responses]).encode()).hexdigest()
    key = {**{k: getattr(args, k) for k in REFERENCE_SETTINGS}, "model": model_path, "train_tokens": tokens}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(args.cache_dir) / f"sft_go-ref-{digest}"


def build_reference(args, model, tokenizer, enc: Encoded) -> Path:
    """The default reference: the base model after --ref_steps of plain SFT on the training rows (cached).

    Each step is uft's SFT step (`uft.sft_update`: token-mean NLL of the responses, micro-batched)."""
    from tqdm.auto import tqdm

    folder = reference_folder(args, model.name_or_path, enc)
    if (folder / "config.json").exists():
        return folder
    ref = copy.deepcopy(model).train()
    optimizer, scheduler = make_optimizer(ref, args.learning_rate, args.weight_decay, 0.0, args.ref_steps,
                                          args.lr_scheduler)
    for step in tqdm(range(1, args.ref_steps + 1), desc=f"reference: plain SFT (once; cached in {folder})"):
        index = rows_for_step(len(enc.responses), args.batch_size, step, args.seed + 1)
        sft_update(ref, batch_of(enc, index, tokenizer.pad_token_id, ref.device), len(tokenizer), optimizer,
                   micro_batch_size=args.micro_batch_size, max_grad_norm=args.max_grad_norm, step=step)
        scheduler.step()
    common.save_model(ref, tokenizer, folder)
    return folder


def load_reference(args, model, tokenizer, enc: Encoded):
    """--ref_model, or the cached default; its tokenizer must split text exactly as the model's does."""
    path = args.ref_model or str(build_reference(args, model, tokenizer, enc))
    ref, ref_tok = load_model(path, dtype=args.dtype, device=str(model.device.type),
                              trust_remote_code=args.trust_remote_code)
    probe = "The answer is 42 (x + y) </answer>"
    if len({tuple(t(probe, add_special_tokens=False)["input_ids"]) for t in (ref_tok, tokenizer)}) > 1:
        raise UserError(f"--ref_model {path}: its tokenizer splits text differently from the model's, so its "
                        "per-token losses cannot be aligned; use a reference of the same model family")
    return ref.eval().requires_grad_(False)


# --- Training run ---------------------------------------------------------------------------------

@dataclasses.dataclass
class GoRun:
    """Everything a step reads or changes (sft_go's own; uft functions get plain arguments)."""
    args: argparse.Namespace
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rows: dict                  # split -> list of row dicts
    enc: dict                   # split -> Encoded
    scores: dict | None         # split -> static per-token scores; None for the excess-loss grouping
    ref: torch.nn.Module | None
    out: Path
    q: torch.Tensor = dataclasses.field(default_factory=lambda: torch.full((2,), 0.5))  # Group-DRO weights
    ref_cache: dict = dataclasses.field(default_factory=dict)   # (split, row) -> reference token losses
    step: int = 0
    last_worst: int = -1
    switches: int = 0


def batch_of(enc: Encoded, index: list[int], pad_id: int, device=None) -> Batch:
    """Left-padded prompts ++ right-padded responses (uft.make_batch); only response tokens are targets."""
    return make_batch([enc.prompts[i] for i in index], [enc.responses[i] for i in index], [0] * len(index),
                      pad_id, device=device)


@torch.no_grad()
def reference_losses(run: GoRun, split: str, index: list[int], batch: Batch) -> torch.Tensor:
    """(B, L) reference token losses, computed once per row and cached."""
    missing = [j for j, i in enumerate(index) if (split, i) not in run.ref_cache]
    if missing:
        part = batch.rows(torch.tensor(missing, device=batch.ids.device))
        losses = token_nll(run.ref, part, len(run.tokenizer)).cpu()
        for j, row_losses, n in zip(missing, losses, part.target_mask.sum(-1).tolist()):
            run.ref_cache[(split, index[j])] = row_losses[:n]
    return pad_scores([run.ref_cache[(split, i)].tolist() for i in index], batch.target_mask.shape[1],
                      batch.ids.device)


def grouping_of(args) -> tuple[str, str]:
    """(grouping, per): Rho-1 always ranks excess loss over the whole batch."""
    return ("excess", "batch") if args.loss == "rho1" else (args.grouping, "sample")


def scored_groups(run: GoRun, split: str, index: list[int], batch: Batch) -> tuple[torch.Tensor, ...]:
    """(token losses, importance scores, groups), each (B, L), of rows `index` of `split` (one forward)."""
    grouping, per = grouping_of(run.args)
    losses = token_nll(run.model, batch, len(run.tokenizer))
    if grouping == "excess":
        scores = excess_loss_scores(losses, reference_losses(run, split, index, batch))
    else:
        scores = pad_scores([run.scores[split][i] for i in index], batch.target_mask.shape[1],
                            batch.ids.device)
    return losses, scores, top_eta_groups(scores, batch.target_mask, run.args.eta, per)


def objective(run: GoRun, token_losses, groups, mask, lam: float) -> tuple[torch.Tensor, dict]:
    """The run's loss on one micro-batch: ce (lam = 0), go (max or Group-DRO q), rho1 (important only)."""
    a = run.args
    if a.loss == "ce":
        return worst_group_loss(token_losses, groups, mask, 0.0, a.go_reduce)
    if a.loss == "rho1":        # Rho-1's selective loss: the mean loss of the selected tokens
        return worst_group_loss(token_losses, groups, mask, 1.0, a.go_reduce, torch.tensor([0.0, 1.0]))
    weights = None
    if a.go_mode == "dro":
        means, present = group_means(token_losses.detach(), groups, mask, a.go_reduce)
        run.q = update_dro_weights(run.q, means.cpu(), present, a.eta_q)
        weights = run.q
    return worst_group_loss(token_losses, groups, mask, lam, a.go_reduce, weights)


def micro_batch_backward(run: GoRun, index: list[int], batch: Batch, lam: float):
    """Backward of the run's loss, micro-batch by micro-batch, each weighted by its share of the batch's
    tokens (go_reduce batch) or rows (per_sample). Returns (loss, and the whole batch's token losses,
    groups and mask (B, L), detached)."""
    a = run.args
    # micro-batches are weighted by their share of every process's tokens (rows): processes act as micro-batches
    total_tokens, loss_sum, kept = common.all_reduce_sum(int(batch.target_mask.sum())), 0.0, []
    total_rows = common.all_reduce_sum(len(index))
    for part_index in micro_batches(len(index), a.micro_batch_size):
        part = batch.rows(part_index.to(batch.ids.device))
        rows = [index[i] for i in part_index.tolist()]
        losses, _, groups = scored_groups(run, "train", rows, part)               # (b, L) each
        loss, _ = objective(run, losses, groups, part.target_mask, lam)
        share = (int(part.target_mask.sum()) / total_tokens if a.go_reduce == "batch"
                 else len(rows) / total_rows)
        backward(loss * share, run.step)                   # refuses a non-finite loss
        loss_sum += float(loss.detach()) * share
        kept.append((losses.detach(), groups, part.target_mask))
    width = batch.target_mask.shape[1]                     # micro-batches are cut to their own longest row
    return (loss_sum, *(torch.cat([widen(x, width, fill) for x in t])
                        for t, fill in zip(zip(*kept), (0.0, UNSUPERVISED, False))))


def train_step(run: GoRun) -> dict:
    """One optimizer step. With micro-batches each micro-batch takes its own max, weighted by its token
    share (exactly the batch max when micro_batch_size >= batch_size, the default); the logged statistics
    always cover the whole batch.

    Not `uft.sft_update`, even for --loss ce: the group losses need every token's loss and group, and
    per_sample weights micro-batches by rows. The optimizer step itself is uft's (`optimizer_step`)."""
    a = run.args
    index = rows_for_step(len(run.rows["train"]), a.batch_size, run.step, a.seed)
    index = common.shard(index, a.batch_size)              # this process's rows (one process: all)
    batch = batch_of(run.enc["train"], index, run.tokenizer.pad_token_id, run.model.device)
    lam = (lambda_at(run.step, a.T, a.lam, a.lam_schedule) if a.loss == "go"
           else float(a.loss == "rho1"))                  # ce: 0 (plain SFT); rho1: 1
    run.model.train()
    loss_sum, losses, groups, mask = micro_batch_backward(run, index, batch, lam)
    loss_sum = common.all_reduce_sum(loss_sum)
    losses, groups, mask = (common.cat_over_ranks(t, fill) for t, fill in
                            ((losses, 0.0), (groups, UNSUPERVISED), (mask, False)))
    _, stats = worst_group_loss(losses, groups, mask, lam, a.go_reduce)
    if stats["worst_group"] >= 0:
        run.switches += int(run.last_worst >= 0 and stats["worst_group"] != run.last_worst)
        run.last_worst = stats["worst_group"]
    stats.update(loss=loss_sum, lam=lam, worst_switches=run.switches,
                 important_fraction=float((groups == IMPORTANT).sum() / mask.sum()),
                 grad_norm=optimizer_step(run.model, run.optimizer, a.max_grad_norm))
    run.scheduler.step()
    if a.loss == "go" and a.go_mode == "dro":
        stats["q_important"] = float(run.q[IMPORTANT])
    return stats


SPLIT_PREFIX = {"test": "eval", "val": "val"}   # held-out metrics are eval_*, validation ones val_*


@torch.no_grad()
def held_out(run: GoRun, progress: bool = False) -> dict:
    """The held-out rows' metrics (eval_*) and, with --num_val, the validation rows' (val_*)."""
    return {k: v for split in SPLIT_PREFIX if split in run.rows
            for k, v in evaluate_split(run, split, progress).items()}


@torch.no_grad()
def evaluate_split(run: GoRun, split: str, progress: bool = False) -> dict:
    """Token-mean loss overall and per group over the whole split; greedy accuracy of a task's rows, whose
    per-problem rewards go to eval_rewards.jsonl (for paired comparisons)."""
    run.model.eval()
    prefix = SPLIT_PREFIX[split]
    sums, counts = torch.zeros(3), torch.zeros(3)          # unimportant, important, all
    rows_ = run.rows[split]
    block = common.rank_block(len(rows_))                  # this process's rows (one process: all)
    for part_index in micro_batches(len(block), run.args.micro_batch_size):
        rows = (part_index + block.start).tolist()
        part = batch_of(run.enc[split], rows, run.tokenizer.pad_token_id, run.model.device)
        losses, _, groups = scored_groups(run, split, rows, part)
        for g, member in enumerate([groups == UNIMPORTANT, groups == IMPORTANT, part.target_mask]):
            sums[g] += float(torch.where(member, losses, 0.0).sum())
            counts[g] += float(member.sum())
    sums, counts = common.all_reduce_sum(sums), common.all_reduce_sum(counts)     # every process's rows
    mean = (sums / counts.clamp(min=1)).tolist()
    metrics = {f"{prefix}_loss_unimportant": mean[0], f"{prefix}_loss_important": mean[1], f"{prefix}_ce": mean[2]}
    if all(tasks.has_reward(r) for r in rows_):            # a task's rows (countdown, K&K): greedy answers
        m, _ = uft.evaluate(run.model, run.tokenizer, rows_, run.args.max_completion_length,
                            run.args.eval_batch_size, progress=progress)
        rewards = m.pop("rewards")
        if common.is_main():
            append_jsonl(run.out / "eval_rewards.jsonl", {"step": run.step, "split": prefix, "rewards": rewards})
        metrics.update({f"{prefix}_{k}": v for k, v in m.items()})
    return metrics


def write_samples_html(run: GoRun, path: Path, num_samples: int = 6) -> Path:
    """A page showing held-out responses with their important tokens highlighted (hover: score, loss)."""
    rows = list(range(min(num_samples, len(run.rows["test"]))))
    batch = batch_of(run.enc["test"], rows, run.tokenizer.pad_token_id, run.model.device)
    run.model.eval()
    with torch.no_grad():
        losses, scores, groups = scored_groups(run, "test", rows, batch)
    shown = [(run.rows["test"][r]["prompt"][-300:],
              [(run.tokenizer.decode([tid]), bool(groups[r, t] == IMPORTANT),
                f"score {float(scores[r, t]):.3f}, loss {float(losses[r, t]):.3f}")
               for t, tid in enumerate(run.enc["test"].responses[r])]) for r in rows]
    title = f"{run.out.name}: {grouping_of(run.args)[0]} groups, eta = {run.args.eta}"
    caption = "<span class=imp>important</span> tokens; hover a token for its score and loss."
    path.write_text(highlighted_html(title, caption, shown))
    return path


def static_scores(args, tokenizer, rows: dict, enc: dict) -> dict | None:
    """Per-token scores of the static groupings for each split's rows (TF-IDF: idf from train). Random scores
    are drawn per split with seed + the split's place in `rows` (train, test, then val)."""
    grouping, _ = grouping_of(args)
    texts = {s: [r["response"] for r in rows[s]] for s in rows}
    if grouping == "excess":
        return None
    if grouping == "random":
        lengths = {s: [len(x) for x in enc[s].responses] for s in enc}
        return {s: random_scores(lengths[s], args.seed + i) for i, s in enumerate(enc)}
    if grouping == "tfidf" and args.tfidf_unit == "token":
        return {s: tfidf_scores(enc[s].responses, enc["train"].responses) for s in enc}
    if grouping == "tfidf":
        return {s: word_tfidf_scores(texts[s], enc[s].offsets, texts["train"]) for s in enc}
    classifier, cls_tok = models.load_token_classifier(args.classifier, args.classifier_label,
                                                       args.trust_remote_code)
    return {s: classifier_scores(classifier, cls_tok, texts[s], enc[s].offsets, args.classifier_label)
            for s in enc}


def setup(args, rows: dict) -> GoRun:
    """Load the model, encode the rows, score tokens, build the reference; a fresh run folder."""
    model, tok = models.load_seeded(args)
    common.broadcast_parameters(model)       # every process starts from process 0's weights
    if args.chat_template:
        rows = {s: models.chat_rows(rows[s], tok, args.model, ("prompt", "question")) for s in rows}
    grouping, _ = grouping_of(args)
    words = grouping == "classifier" or (grouping == "tfidf" and args.tfidf_unit == "word")
    if words:
        check_offsets(tok, f"--model {args.model}")
    enc = {s: encode_rows(tok, rows[s], args.max_prompt_length, args.max_response_length, words)
           for s in rows}
    scores = static_scores(args, tok, rows, enc)
    with common.main_rank_first():           # the cached reference: built once
        ref = load_reference(args, model, tok, enc["train"]) if grouping == "excess" else None
    out = Path(args.output_dir)              # claimed by run_all (or a fresh one for a direct call)
    if common.is_main():                     # process 0 alone writes the run folder
        if getattr(args, "run_id", None) is None:
            args.run_id = common.claim_run_folder(out, getattr(args, "overwrite", False), guards.inputs(args),
                                                  resumable=False)
        runs.write_config(out, args)
        guards.write_json(out / "base.json", models.base_record(args, model))
    optimizer, scheduler = make_optimizer(model, args.learning_rate, args.weight_decay, args.warmup_ratio,
                                          args.T, args.lr_scheduler)
    return GoRun(args, model, tok, optimizer, scheduler, rows, enc, scores, ref, out)


def train(args, rows: dict | None = None) -> dict:
    """Train one configuration for args.T steps; write the run folder; return the last held-out metrics."""
    from tqdm.auto import tqdm

    if rows is None:
        rows = split_rows(*load_rows(args))
    run = setup(args, rows)
    first = {"step": 0, **held_out(run, progress=True)}
    if common.is_main():                     # every process holds the same metrics; process 0 writes
        append_jsonl(run.out / "metrics.jsonl", first)
    bar = tqdm(range(1, args.T + 1), desc=run.out.name, disable=not common.is_main())
    for step in bar:
        run.step = step
        start = time.perf_counter()
        try:
            metrics = train_step(run)
        except FloatingPointError as err:
            raise common.RunFailed(f"{err}: stopped (try a lower --learning_rate)") from None
        metrics.update(step=step, lr=run.scheduler.get_last_lr()[0],
                       step_seconds=time.perf_counter() - start)
        runs.go_end_step(run, metrics, bar, held_out)   # evaluation, metrics.jsonl, progress, checkpoint
    if common.is_main():
        plot_losses(run.out)
        write_samples_html(run, run.out / "samples.html", args.num_html_samples)
    return {"output_dir": str(run.out), "base": first, "worst_switches": run.switches,
            **{k: v for k, v in metrics.items() if k.startswith("eval_")}}


# --- Command line ---------------------------------------------------------------------------------

# Every flag, by topic: (flag, default, help[, argparse options]) for common.add_flags, as in uft.py
FLAGS = {
    "SFT-GO": [
        ("loss", "ce,go", "comma-separated runs, in turn, same seed and budget: ce (plain SFT), go (SFT-GO), "
                          "rho1 (Rho-1: mean loss of the batch's top-eta excess-loss tokens)"),
        ("grouping", "tfidf", "token importance for go (and ce's logged group losses); rho1 uses excess",
         {"choices": GROUPINGS}),
        ("eta", 0.7, "fraction of each response's tokens that is important (rho1: of the batch's tokens); "
                     "chosen on validation problems (experiments/results/go-select.md)", {"range": "(0, 1)"}),
        ("lam", 0.3, "lambda: weight of the worst-group loss (0 = plain CE; the paper: 0.9); chosen on "
                     "validation problems", {"range": "[0, 1]"}),
        ("lam_schedule", "constant", "lambda decay over T", {"choices": LAMBDA_SCHEDULES}),
        ("go_mode", "max", "hard max over groups, or online Group-DRO weights (ablation)",
         {"choices": ["max", "dro"]}),
        ("eta_q", 0.01, "Group-DRO step size of the group weights q", {"range": "(0, inf)"}),
        ("go_reduce", "batch", "group loss: token mean over the batch, or per sample then averaged",
         {"choices": ["batch", "per_sample"]}),
        ("tfidf_unit", "token", "TF-IDF terms", {"choices": ["token", "word"]}),
        ("ref_model", None, "excess-loss reference (folder or hub id); default: the base model after "
                            "--ref_steps of plain SFT (cached)", {"type": str}),
        ("ref_steps", 50, "plain-SFT steps of the default reference", {"range": "[1, inf)"}),
        ("classifier", None, "token-classification model for --grouping classifier (e.g. LLMLingua-2's)",
         {"type": str}),
        ("classifier_label", 1, "the classifier's 'keep' label id", {"range": "[0, inf)"}),
    ],
    "optimisation": [
        ("T", None, "training steps (default 100, the budget settings were chosen at; --data kk: 150)",
         {"type": int, "range": "[1, inf)"}),
        ("batch_size", 64, "responses per step", {"range": "[1, inf)"}),
        ("micro_batch_size", 64, "rows per forward pass (fewer than batch_size: accumulated)",
         {"range": "[1, inf)"}),
        ("learning_rate", 1e-3, "AdamW learning rate", {"range": "(0, inf)"}),
        uft.flag("weight_decay"),
        ("lr_scheduler", "cosine", "after warm-up", {"choices": ["constant", "cosine"]}),
        ("warmup_ratio", 0.05, "fraction of T spent warming up", {"range": "[0, 1]"}),
        uft.flag("max_grad_norm"),
    ],
    "data": [
        ("data", "countdown", "'countdown', 'kk' or a .jsonl/.json/.parquet file: prompt/response, "
                              "question/answer, Alpaca instruction/input/output, or LIMA conversations "
                              "columns"),
        ("test_data", None, "held-out file (default: the first num_test rows of --data)", {"type": str}),
        ("num_train", 20000, "training rows", {"range": "[1, inf)"}),
        ("num_test", 200, "held-out rows", {"range": "[1, inf)"}),
        uft.flag("num_val"),
        ("min_nums", 3, "built-in countdown: fewest numbers per problem", {"range": "[3, 4]"}),
        ("max_nums", 3, "built-in countdown: most numbers per problem", {"range": "[3, 4]"}),
        uft.flag("min_people"),
        uft.flag("max_people"),
        ("max_prompt_length", 512, "prompt tokens kept (the last ones)", {"range": "[1, inf)"}),
        ("max_response_length", 512, "response tokens kept (the first ones)", {"range": "[1, inf)"}),
    ],
    "run": [
        ("output_dir", None, "run folder (default runs/sft_go-<date>-<time>-<pid>)", {"type": str}),
        ("overwrite", False, "replace the run(s) that --output_dir holds (otherwise refused)",
         {"action": "store_true"}),
        ("eval_steps", 100, "held-out evaluation every this many steps", {"range": "[1, inf)"}),
        uft.flag("eval_batch_size"),
        ("max_completion_length", None, "new tokens per greedy answer (default 96; --data kk: 128)",
         {"type": int, "range": "[1, inf)"}),
        ("save_steps", 1000, "checkpoint every this many steps (and at the end)", {"range": "[1, inf)"}),
        ("num_html_samples", 6, "held-out responses shown in samples.html", {"range": "[0, inf)"}),
        ("cache_dir", str(DEFAULT_CACHE), "where the default reference model is cached"),
        ("seed", 0, "data order, initialisation, random groups", {"range": "[0, inf)"}),
    ],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sft_go.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="SFT-GO and its baselines. With no flags: plain SFT, then SFT-GO at the setting chosen on "
                    "validation problems, on the built-in model and countdown (CPU, a few minutes), a comparison "
                    "table and the paired change of held-out accuracy with its 95% interval.")
    for topic, flags in FLAGS.items():
        if topic == "run":
            uft.add_model_flags(p)                         # --model, --dtype, --device, ...: load_model's
        add_flags(p, topic, flags)
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Bad values fail at start, argparse-style (usage line + one message, exit 2)."""
    uft.data_defaults(args, {**uft.DATA_DEFAULTS, "max_completion_length": (96, 128), "T": (100, 150)})
    common.check_ranges(p, args, [uft.MODEL_FLAGS, *FLAGS.values()])
    args.losses = [s.strip() for s in args.loss.split(",") if s.strip()]
    bad = [s for s in args.losses if s not in LOSSES]
    if bad or not args.losses:
        p.error(f"--loss {args.loss!r}: choose a comma-separated list of {', '.join(LOSSES)}")
    if args.grouping == "classifier" and not args.classifier and set(args.losses) != {"rho1"}:
        p.error("--grouping classifier needs --classifier <token-classification model>")
    if args.num_val and args.data != "countdown":
        p.error("--num_val is for the built-in countdown only")
    uft.check_data_flags(p, args)
    if args.output_dir is None:
        args.output_dir = guards.default_output_dir("sft_go")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    guards.refuse_empty_values(p, args)           # --output_dir '' or UFT_CACHE='' would mean "here"
    check_args(p, args)
    return args


def check_world(args) -> None:
    """Under torchrun every rank takes an equal share of each step's rows; Group-DRO's weights q would
    follow each rank's own micro-batches, so it stays a one-process option."""
    world = common.DP.world_size
    if world > 1 and args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} must be divisible by the {world} processes")
    if world > 1 and args.go_mode == "dro" and "go" in args.losses:
        raise UserError("--go_mode dro runs in one process only (each rank would update its own q)")


def main(argv=None) -> int:
    """The command line: exit status 0 done, 2 bad input, 1 a failure mid-run, 130/143 SIGINT/SIGTERM."""
    with guards.owned_folders():             # the run folders' locks are given up however the runs end
        args = parse_args(argv)
        return common.run_cli(lambda: run_all(args), lambda: where_to_restart(args))


def run_all(args) -> int:
    common.init_distributed(args.device)     # under torchrun: join the job (otherwise nothing happens)
    check_world(args)
    rows = split_rows(*load_rows(args))                           # bad rows are found before any model loads
    folders = run_folders(args)
    ids = runs.claim_go_folders(args, folders)                    # checked before any model loads
    results = {}
    for loss, (name, folder) in zip(args.losses, folders.items()):
        run_args = argparse.Namespace(**{**vars(args), "loss": loss, "output_dir": folder,
                                         "run_id": ids[name]})
        start = time.time()
        results[name] = {**train(run_args, rows), "minutes": (time.time() - start) / 60}
    if not common.is_main():
        return 0
    table = summary_table({"base model": {**next(iter(results.values()))["base"], "minutes": 0.0},
                           **results})
    Path(args.output_dir, "summary.txt").write_text(table + "\n")
    groups = f"{args.grouping}{f' ({args.tfidf_unit}s)' if args.grouping == 'tfidf' else ''}"
    print(f"\nheld-out after {args.T} steps (eta {args.eta}, lam {args.lam}, seed {args.seed}); "
          f"groups: {groups}\n{table}\n"
          f"run folders under {args.output_dir} (losses.png, samples.html, metrics.jsonl)")
    for line in against_ce({name: r["output_dir"] for name, r in results.items()}):
        print(line)
    return 0


def final_rewards(folder: str, split: str = "eval") -> list[float] | None:
    """Per-problem rewards of a run folder's last evaluation of `split` (eval or val); None if never scored."""
    path = Path(folder, "eval_rewards.jsonl")
    lines = [r for r in uft.read_jsonl(path) if r["split"] == split] if path.exists() else []
    return lines[-1]["rewards"] if lines else None


def against_ce(folders: dict[str, str]) -> list[str]:
    """Each run against plain CE on the same problems (same seed, same rows): the paired change in accuracy
    with its 95% interval, on the held-out problems (and the validation ones when there are any)."""
    if "ce" not in folders:
        return []
    lines = []
    for split, problems in (("eval", "held-out problems"), ("val", "validation problems")):
        ce = final_rewards(folders["ce"], split)
        for name, folder in folders.items():
            ours = final_rewards(folder, split)
            if name != "ce" and ce and ours:
                c = runs.paired_comparison(ce, ours)
                accuracy = [sum(r == tasks.REWARD_CORRECT for r in x) / len(x) for x in (ce, ours)]
                lines.append(f"\n{name} vs ce, same seed and {problems}: accuracy {accuracy[0]:.3f} -> "
                             f"{accuracy[1]:.3f}\n{runs.change_sentence(c, problems)}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
