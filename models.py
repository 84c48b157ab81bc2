"""The models `uft.py` and `sft_go.py` train: the built-in base models (a tiny Llama taught countdown's or K&K's
answer format by a short SFT warm-up, built once and cached) and any other model by name (`load_model`).

    from models import load_model
    model, tokenizer = load_model()                  # the built-in base: built on first use (minutes), then cached
    model, tokenizer = load_model("Qwen/Qwen2.5-0.5B", device="cuda", dtype="bfloat16")
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch

import common
import tasks
from common import UserError, build_tokenizer, make_optimizer, rows_for_step, save_model, tiny_llama_config
from tasks import generate_countdown

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

    if task == "tree":        # prompts and single choices only: no token may span two choices
        rows = tasks.tree_warmup_rows(2000, seed=10_000 + seed)
        corpus = [piece for r in rows for piece in [r["question"], *tasks.answer_pieces(r)]]
    else:
        rows = (generate_countdown(2000, seed=10_000 + seed) if task == "countdown"
                else tasks.generate_kk(2000, seed=10_000 + seed, min_people=2, max_people=4))
        corpus = [r["question"] + r["answer"] for r in rows]
    tok = build_tokenizer(corpus, vocab_size=1024)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), tok.pad_token_id, tok.eos_token_id))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model(model, tok, folder)
    return folder


# What the built-in base model saw. Randomly initialised weights cannot learn the
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


# Two more bases for the experiments (docs/results.md): a weak one that knows the answer format but
# rarely solves a problem (the paper's small-model regime), and one warmed up on 3-5 numbers (long horizons).
BASE_RECIPES = {r["name"]: r for r in (
    BASE_RECIPE,
    {**BASE_RECIPE, "name": "builtin-weak", "version": 3, "steps": 250},   # v2: 150 steps, solved 0.1%
    {**BASE_RECIPE, "name": "builtin-mix", "min_nums": 3, "max_nums": 5},
    # K&K (--data kk's default model): SFT on deduction traces of 2-3 inhabitants, a quarter of the countdown
    # warm-up's tokens-worth of steps because a trace is ~2.5x as long as a countdown answer
    {**BASE_RECIPE, "name": "builtin-kk", "version": 1, "task": "kk", "min_people": 2, "max_people": 3,
     "num_problems": 10_000, "steps": 300, "batch_size": 32},
    # the search tree (--data tree): the format on random paths of warm-up ids (B 2-3, H 1-10), so an unseen
    # tree's first choice is uniform over its B letters
    {**BASE_RECIPE, "name": "builtin-tree", "version": 1, "task": "tree", "num_problems": 20_000,
     "steps": 300})}


def warmup_rows(recipe: dict) -> list[dict]:
    """A base recipe's SFT rows: its task's problems, never from the held-out part of problem space."""
    if recipe.get("task") == "tree":
        return tasks.tree_warmup_rows(recipe["num_problems"], seed=recipe["seed"])
    if recipe.get("task", "countdown") == "kk":
        return tasks.generate_kk(recipe["num_problems"], seed=recipe["seed"], min_people=recipe["min_people"],
                                 max_people=recipe["max_people"], heldout=False)
    return generate_countdown(recipe["num_problems"], seed=recipe["seed"], min_nums=recipe["min_nums"],
                              max_nums=recipe["max_nums"], heldout=False)


def base_folder(cache_dir: Path, recipe: dict) -> Path:
    """Where a built-in base of this recipe is cached (a new version is a new folder)."""
    return Path(cache_dir) / f"{recipe['name']}-v{recipe['version']}" / "base"


def builtin_base(cache_dir: Path = DEFAULT_CACHE, recipe: dict = BASE_RECIPE, progress: bool = True) -> Path:
    """Folder of a built-in base model; built once (minutes on a laptop CPU), then loaded from the cache."""
    from functools import lru_cache
    from tqdm.auto import tqdm

    from uft import sft_batch, sft_update       # the warm-up is uft's SFT step

    folder = base_folder(cache_dir, recipe)
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

    def write_recipe(tmp: Path):            # the thread count changes the weights (reductions round differently)
        built = {**recipe, "built_with_threads": torch.get_num_threads()}
        (tmp / "recipe.json").write_text(json.dumps(built, indent=2))
    save_model(model, tok, folder, more=write_recipe)
    return folder


def load_model(model: str = BUILTIN, *, cache_dir: Path = DEFAULT_CACHE, **options):
    """(model, tokenizer): a built-in name (see BASE_RECIPES; built once, then cached) or anything that
    `common.load_pretrained` takes (hub id, local folder, GGUF file); options: dtype, device, gguf_file,
    trust_remote_code. Every problem the user can fix raises UserError with a one-line message."""
    if model in BASE_RECIPES:
        model = str(builtin_base(cache_dir, BASE_RECIPES[model]))
    return common.load_pretrained(model, **options)


def load_seeded(args):
    """(model, tokenizer) of a run: Python's and torch's generators seeded from --seed, then --model loaded
    (process 0 first, so a built-in base is built and cached once)."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    with common.main_rank_first():
        return load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file,
                          trust_remote_code=args.trust_remote_code)


def load_token_classifier(name: str, label: int, trust_remote_code: bool = False):
    """(classifier, its tokenizer) of sft_go's --grouping classifier; `label` must be one of its labels."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        classifier = AutoModelForTokenClassification.from_pretrained(name)
    except OSError as err:
        raise common.UserError(f"--classifier {name!r}: could not load a token-classification model "
                               f"[{str(err).splitlines()[0][:160]}]") from None
    common.check_offsets(tokenizer, f"--classifier {name}")
    if not 0 <= label < classifier.config.num_labels:
        raise common.UserError(f"--classifier_label {label}: the classifier has "
                               f"{classifier.config.num_labels} labels ({classifier.config.id2label})")
    return classifier, tokenizer


def chat_rows(rows: list[dict], tokenizer, model: str, keys: tuple = ("question",)) -> list[dict]:
    """--chat_template: each row's prompts (its fields among `keys`) wrapped in the tokenizer's chat template
    as the user turn, the released assistant opening after the generation prompt (tasks.chat_question)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--chat_template: the tokenizer of --model {model} has no chat template (instruct "
                        "models have one; drop the flag for a base model)")

    def wrap(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return [{**row, **{k: tasks.chat_question(row[k], wrap) for k in keys if isinstance(row.get(k), str)}}
            for row in rows]


def weights_digest(model) -> str:
    """sha256 over the parameters' names and bytes, in order: two builds of one recipe on two machines (or
    thread counts) differ here even when their recipes match."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_record(args, model, cache_dir: Path = DEFAULT_CACHE) -> dict:
    """base.json of a run folder: the model a run started from (--model, --gguf_file), a built-in base's
    recipe with the thread count it was built with, and a hash of the weights as loaded."""
    record = {"model": args.model, "gguf_file": args.gguf_file, "weights_sha256": weights_digest(model)}
    if args.model in BASE_RECIPES:
        recipe = BASE_RECIPES[args.model]
        saved = base_folder(cache_dir, recipe) / "recipe.json"
        built = json.loads(saved.read_text()) if saved.exists() else recipe
        record["recipe"] = {"built_with_threads": None, **built}     # None: built before the count was kept
    return record
