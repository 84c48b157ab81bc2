"""Run folders. For `uft.py`: what `uft.train`'s loop reaches through four calls — `start`, `steps`, `end_step`
and `finish` — and nothing of the method.

    run = runs.start(args)                  # rows, model, state; a fresh folder (base model evaluated) or a resume
    for step in runs.steps(run, total):     # a progress bar, from the step after the checkpoint
        ...                                 # the method (uft.train)
        runs.end_step(run, metrics, samples)   # budget, evaluation, metrics.jsonl, checkpoint
    result = runs.finish(run)               # plot.png and the base -> final comparison

A run folder holds config.json, metrics.jsonl (a line a step), eval_rewards.jsonl (per-problem rewards of every
evaluation), samples.jsonl, plot.png and checkpoint/ (docs/run-folder.md). Under torchrun every process calls
these; process 0 alone writes. At the end, the run folders of `sft_go.py` (losses.png, summary.txt).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import torch

import common
import guards
import models
import tasks
from common import DTYPES, UserError, append_jsonl, read_jsonl

BUDGET = ("optimizer_steps", "problems_seen", "tokens_generated", "train_seconds")  # one unit for every algo


@dataclasses.dataclass
class Run:
    """A run's fixed parts beside the method's state: flags, tokenizer, rows, folder, running totals."""
    args: object                           # the resolved flags (an argparse.Namespace)
    tokenizer: object
    state: "uft.State"                     # what a step changes (model, reference, optimizer, rngs, step)
    train_rows: list[dict]
    test_rows: list[dict]
    out: Path
    val_rows: list[dict] = dataclasses.field(default_factory=list)   # for choosing settings; never reported
    token_cache: dict = dataclasses.field(default_factory=dict)
    budget: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(BUDGET, 0))  # running totals
    bar: object = None                     # the progress bar of `steps`
    reached: bool = False                  # --stop_at: the last evaluation reached the target accuracy

    def encode(self, text: str) -> list[int]:
        """Token ids of a text (no special tokens), cached: questions and hint fragments recur every epoch."""
        if text not in self.token_cache:
            self.token_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.token_cache[text]


# ----------------------------------------------------------------------------------------------------------
# Start: rows (checked before any model loads), model and state, a fresh or a resumed run folder
# ----------------------------------------------------------------------------------------------------------

def start(args) -> Run:
    """The run of `args`: a fresh run folder (with the base model's evaluation as step 0) or a resumed one."""
    out = Path(args.output_dir)
    resuming = bool(args.resume) and (out / "checkpoint" / "trainer_state.pt").exists()
    if not resuming and common.is_main():
        args.run_id = common.claim_run_folder(out, args.overwrite, guards.inputs(args))
    train_rows, val_rows, test_rows = uft.load_rows(args)
    model, tok = models.load_seeded(args)
    if args.chat_template:
        train_rows, val_rows, test_rows = (models.chat_rows(rows, tok, args.model)
                                           for rows in (train_rows, val_rows, test_rows))
    ref = reference(args, model, out / "checkpoint" if resuming else None)
    if resuming:
        model = uft.load_model(str(out / "checkpoint"), dtype=args.dtype, device=args.device)[0]
    if common.is_main():
        write_config(out, args)
        if not resuming:
            guards.write_json(out / "base.json", models.base_record(args, model))
        print(memory_report(args, model, tok, train_rows))
    common.broadcast_parameters(model)       # every process starts from process 0's weights
    run = Run(args=args, tokenizer=tok, state=new_state(args, model, ref), train_rows=train_rows,
              test_rows=test_rows, val_rows=val_rows, out=out)
    for split in ("train_rows", "val_rows", "test_rows"):
        setattr(run, split, within_prompt_limit(getattr(run, split), run.encode, args.max_prompt_length,
                                                split.split("_")[0], run.token_cache))
    if resuming:
        restore_checkpoint(run)
    else:
        first = {"step": 0, **evaluate_run(run, progress=True)}
        if common.is_main():
            append_jsonl(out / "metrics.jsonl", first)
            print(f"step 0 | base model: accuracy {first['eval_accuracy']:.3f}  "
                  f"reward {first['eval_reward']:.3f}  format {first['eval_format_rate']:.3f}  "
                  f"({len(run.test_rows)} held-out problems)")
    return run


def write_config(out: Path, args) -> None:
    """config.json: every flag of the run (what --resume reads back), replaced at once."""
    guards.write_config(out, vars(args))


def reference(args, base, checkpoint: Path | None):
    """The frozen reference of the KL term: the base model (sft-rft makes its own when its RL phase starts,
    saved in the checkpoint); None when beta is 0 or the algorithm starts with SFT."""
    if checkpoint is not None and args.algo == "sft-rft" and (checkpoint / "ref").exists():
        return uft.load_model(str(checkpoint / "ref"), dtype=args.dtype, device=args.device)[0]
    if args.beta > 0 and args.algo not in ("sft", "sft-rft"):
        return common.frozen_copy(base)
    return None


def new_state(args, model, ref) -> "uft.State":
    """The state at step 0: the model, its reference, the first phase's optimizer, the hint and sampling
    streams."""
    if args.gradient_checkpointing:          # recompute each layer in the backward: activations / layers
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer, scheduler = uft.optimizer_for(args, model, uft.phase_of(args.algo, 1, args.sft_steps))
    device = model.device if model.device.type != "cpu" else "cpu"
    generator = torch.Generator(device=device).manual_seed(common.rank_seed(args.seed))
    return uft.State(model=model, ref=ref, optimizer=optimizer, scheduler=scheduler,
                     rng=random.Random(args.seed), generator=generator)


def within_prompt_limit(rows: list[dict], encode, limit: int, split: str, cache: dict) -> list[dict]:
    """The rows whose question fits `limit` tokens; the others are skipped and counted on stderr (a 20 MB
    question would otherwise fill memory in the sampler). No row left is a UserError."""
    kept = []
    for row in rows:
        if len(row["question"]) <= limit or len(encode(row["question"])) <= limit:  # chars >= tokens
            kept.append(row)
        else:
            cache.pop(row["question"], None)
    if len(kept) < len(rows):
        print(f"{split}: {len(rows) - len(kept)} of {len(rows)} rows skipped: question longer than "
              f"--max_prompt_length {limit} tokens", file=sys.stderr)
    if rows and not kept:
        raise UserError(f"no {split} rows left: every question is longer than --max_prompt_length {limit}")
    return kept


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


# ----------------------------------------------------------------------------------------------------------
# Each step: the progress bar, then budget, evaluation, metrics line, checkpoint
# ----------------------------------------------------------------------------------------------------------

def steps(run: Run, total: int):
    """The step numbers still to run (after a resumed checkpoint's step), shown as a progress bar."""
    from tqdm.auto import tqdm

    run.bar = tqdm(range(run.state.step + 1, total + 1), desc=run.args.algo, initial=run.state.step,
                   total=total, disable=not common.is_main())
    try:
        for step in run.bar:
            yield step
            if run.reached:                  # --stop_at: the run ends at the target (steps to solve)
                return
    finally:
        run.bar.close()


def end_step(run: Run, metrics: dict, samples: list[dict]) -> None:
    """After a step: budget totals, evaluation every eval_steps (and at the end), the metrics line, progress,
    the first group's rollouts in samples.jsonl (at evaluation steps and step 1), a checkpoint."""
    from tqdm.auto import tqdm

    a, step = run.args, run.state.step
    last = step == uft.total_steps(a)
    if samples and (step % a.eval_steps == 0 or step == 1) and common.is_main():
        for s in samples:
            append_jsonl(run.out / "samples.jsonl", {"kind": "train", "step": step, **s})
    run.budget = add_to_budget(run.budget, metrics, a.batch_size)
    metrics.update(run.budget)
    if step % a.eval_steps == 0 or last:
        metrics.update(evaluate_run(run))
        if common.is_main():
            tqdm.write(f"step {step} | accuracy {metrics['eval_accuracy']:.3f}  "
                       f"reward {metrics['eval_reward']:.3f}  format {metrics['eval_format_rate']:.3f}")
    common.fault_point("step")
    if common.is_main():                     # every process holds the same metrics; process 0 logs
        append_jsonl(run.out / "metrics.jsonl", metrics)
    shown = {"reward": "reward_mean", "acc": "train_accuracy", "hint": "hint_fraction", "loss": "loss"}
    run.bar.set_postfix({name: f"{metrics[k]:.3f}" for name, k in shown.items() if k in metrics})
    run.reached = a.stop_at is not None and metrics.get("eval_accuracy", -1.0) >= a.stop_at
    if step % a.save_steps == 0 or last or run.reached:
        save_checkpoint(run)


def add_to_budget(budget: dict, metrics: dict, batch_size: int) -> dict:
    """The running totals after one step (SFT generates no tokens; RL counts every sampled token)."""
    return {"optimizer_steps": budget["optimizer_steps"] + metrics["updates"],
            "problems_seen": budget["problems_seen"] + batch_size,
            "tokens_generated": budget["tokens_generated"] + metrics.get("rollout_tokens", 0),
            "train_seconds": budget["train_seconds"] + metrics["step_seconds"]}


def evaluate_run(run, progress: bool = False) -> dict:
    """Greedy evaluation on the held-out rows (eval_*) and, when there are any, the validation rows (val_*);
    per-problem rewards go to eval_rewards.jsonl."""
    a, out, step = run.args, {}, run.state.step
    for split, rows in (("eval", run.test_rows), ("val", run.val_rows)):
        if not rows:
            continue
        metrics, samples = uft.evaluate(run.state.model, run.tokenizer, rows, a.max_completion_length,
                                        a.eval_batch_size, progress=progress)
        rewards = metrics.pop("rewards")
        out.update({f"{split}_{k}": v for k, v in metrics.items()})
        if not common.is_main():             # every process has the gathered results; process 0 writes
            continue
        sources = [tasks.row_source(r) for r in rows]
        per_row = {"sources": sources} if len(set(sources)) > 1 else {}     # a mixed file: each row's source
        append_jsonl(run.out / "eval_rewards.jsonl", {"step": step, "split": split, "rewards": rewards,
                                                      **per_row})
        if split == "eval":
            for s in samples:
                append_jsonl(run.out / "samples.jsonl", {"kind": "eval", "step": step, **s})
    return out


def finish(run: Run) -> dict:
    """plot.png, and the base and final held-out results with their paired comparison (process 0)."""
    if not common.is_main():
        return {}
    plot_run(run.out)
    return run_summary(run.out)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, resumed exactly
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(run: Run) -> None:
    """model + tokenizer + optimizer/scheduler/RNG state (+ the reference when it is not the base model).

    The trainer state holds tensors and plain types only, so it loads with weights_only=True. Every process
    calls it: their sampling streams are gathered, and process 0 writes."""
    s = run.state
    streams = common.gather_in_order([(s.generator.get_state(), torch.get_rng_state())])
    if not common.is_main():
        return

    def more(tmp: Path):
        guards.write_record(tmp, vars(run.args))      # the config it was trained with (checked on resume)
        if s.ref is not None and run.args.algo == "sft-rft":
            s.ref.save_pretrained(tmp / "ref")
        torch.save({"step": s.step, "run_id": getattr(run.args, "run_id", None), "budget": run.budget,
                    "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                    "rng": s.rng.getstate(), "generator": s.generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "rank_streams": streams}, tmp / "trainer_state.pt")
    common.save_model(s.model, run.tokenizer, run.out / "checkpoint", more=more)


def restore_checkpoint(run: Run) -> None:
    """Continue from the checkpoint: states back, and the run's logs cut back to its step (each file
    replaced at once, so a kill mid-resume loses nothing)."""
    state = common.load_state(run.out / "checkpoint" / "trainer_state.pt")
    if state.get("run_id") != getattr(run.args, "run_id", None):
        raise UserError(f"{run.out / 'checkpoint'}: belongs to run {state.get('run_id')}, not to the run "
                        f"{getattr(run.args, 'run_id', None)} of {run.out / 'config.json'}; not resuming")
    s, a = run.state, run.args
    s.step, run.budget = state["step"], state["budget"]
    s.optimizer, s.scheduler = uft.optimizer_for(a, s.model, uft.phase_of(a.algo, s.step, a.sft_steps))
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.rng.setstate(state["rng"])
    restore_streams(s.generator, state.get("rank_streams") or [(state["generator"], state["torch_rng"])])
    if not common.is_main():
        return
    print(f"resumed {run.out} at step {s.step}")
    for name in ("metrics.jsonl", "eval_rewards.jsonl", "samples.jsonl"):    # drop the steps after it
        if (run.out / name).exists():
            kept = [m for m in common.read_log(run.out / name) if m.get("step", 0) <= s.step]
            common.rewrite_jsonl(run.out / name, kept)


def restore_streams(generator: torch.Generator, streams: list) -> None:
    """Each process continues its own sampling stream; with another number of processes they start afresh."""
    if len(streams) == common.DP.world_size:
        generator_state, torch_state = streams[common.DP.rank]
        generator.set_state(generator_state)
        torch.set_rng_state(torch_state)
    elif common.is_main():
        print(f"resume: the checkpoint has {len(streams)} rank(s)' sampling streams, this job "
              f"{common.DP.world_size}: rollouts restart from their seeds (updates are unaffected)")


def where_to_resume(args) -> str:
    """What a run that stops early prints last: its last checkpoint and the command that continues it."""
    out = Path(args.output_dir)
    state = out / "checkpoint" / "trainer_state.pt"
    if args.eval_only or not state.exists():
        return f"no checkpoint in {out}; run the same command with --overwrite to start again"
    step = common.load_state(state)["step"]
    return f"the last checkpoint is {state.parent} (step {step}); resume with: python uft.py --resume {out}"


# ----------------------------------------------------------------------------------------------------------
# Results of a finished run folder; --eval_only
# ----------------------------------------------------------------------------------------------------------

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
    correct = tasks.REWARD_CORRECT
    d = [float(b == correct) - float(a == correct) for a, b in zip(before, after)]
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
            "comparison": paired_comparison(rewards[0], rewards[-1]), "output_dir": str(out),
            "steps": evals[-1]["step"]}


def plot_run(out: Path) -> Path:
    """plot.png: held-out accuracy, training reward and hint fraction over steps."""
    metrics = read_jsonl(out / "metrics.jsonl")
    shown = [("eval_accuracy", "held-out accuracy (greedy, no hint)", {"marker": "o"}),
             ("reward_mean", "training reward (mean)", {}), ("hint_fraction", "hint fraction p(t)", {})]
    panels = [(title, [(key, [(m["step"], m[key]) for m in metrics if key in m], style)])
              for key, title, style in shown]
    return common.plot_panels(out / "plot.png", panels)


def evaluate_only(args) -> dict:
    """--eval_only: greedy evaluation of --model (a run folder: its checkpoint) on the held-out rows
    (--test_data files, else those of --data), written like a training run's step 0: config.json,
    metrics.jsonl, eval_rewards.jsonl, samples.jsonl."""
    import types

    out = Path(args.output_dir)
    if common.is_main():
        args.run_id = common.claim_run_folder(out, args.overwrite, guards.inputs(args))
    if args.test_data or args.data not in tasks.GENERATED:
        test_rows = uft.read_rows(args, args.test_data or args.data,
                                  args.test_split if args.test_data else args.data_split)[: args.num_test]
    else:                                  # the built-in split's held-out side (it ignores num_train)
        test_rows = uft.load_rows(common.argparse_copy(args, num_train=1))[2]
    if not test_rows:
        raise UserError(f"--eval_only: no held-out rows with a reward in {args.test_data or args.data}")
    if common.is_main():
        write_config(out, args)
    checkpoint = Path(args.model) / "checkpoint"
    name = str(checkpoint) if (checkpoint / "config.json").exists() else args.model
    with common.main_rank_first():
        model, tok = uft.load_model(name, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file,
                                    trust_remote_code=args.trust_remote_code)
    if args.chat_template:
        test_rows = models.chat_rows(test_rows, tok, args.model)
    view = types.SimpleNamespace(args=args, tokenizer=tok, val_rows=[], out=out,
                                 state=types.SimpleNamespace(model=model, step=0))   # what evaluate_run reads
    cache = {}
    encode = lambda text: cache.setdefault(text, tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    view.test_rows = within_prompt_limit(test_rows, encode, args.max_prompt_length, "test", cache)
    metrics = {"step": 0, **evaluate_run(view, progress=True)}
    if common.is_main():
        append_jsonl(out / "metrics.jsonl", metrics)
    return {**metrics, "model": name, "n": len(test_rows)}


# ----------------------------------------------------------------------------------------------------------
# sft_go.py's run folders: one per loss (a parent holds summary.txt), no resume
# ----------------------------------------------------------------------------------------------------------

def go_end_step(run, metrics: dict, bar, held_out) -> None:
    """After an sft_go step: held-out metrics every eval_steps (and at the end), the metrics line, progress,
    the model every save_steps."""
    from tqdm.auto import tqdm

    a, step = run.args, run.step
    if step % a.eval_steps == 0 or step == a.T:
        metrics.update(held_out(run))
        if common.is_main():
            tqdm.write(f"step {step} | " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()
                                                      if k.startswith("eval_") and k != "eval_length"))
    common.fault_point("step")
    if common.is_main():
        append_jsonl(run.out / "metrics.jsonl", metrics)
    bar.set_postfix(ce=f"{metrics['ce']:.3f}", worst=metrics["worst_group"], lam=f"{metrics['lam']:.2f}")
    if (step % a.save_steps == 0 or step == a.T) and common.is_main():
        common.save_model(run.model, run.tokenizer, run.out / "checkpoint")


def plot_losses(out: Path) -> Path:
    """losses.png: training and held-out loss of each group over steps, and held-out accuracy if measured."""
    metrics = read_jsonl(out / "metrics.jsonl")

    def per_group(prefix: str) -> list:
        return [(key, [(m["step"], m[prefix + key]) for m in metrics if m.get(prefix + key) is not None],
                 {"color": color, "lw": 1}) for key, color in
                [("ce", "k"), ("loss_important", "tab:orange"), ("loss_unimportant", "tab:blue")]]
    panels = [("training loss per group", per_group("")), ("held-out loss per group", per_group("eval_"))]
    accuracy = [(m["step"], m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m]
    if accuracy:
        panels.append(("held-out accuracy", [("accuracy", accuracy, {"marker": "s", "color": "tab:green"})]))
    return common.plot_panels(out / "losses.png", panels)


def summary_table(results: dict) -> str:
    """One line per run: held-out accuracy (countdown), token-mean loss overall and per group, how often
    the worst training group flipped, minutes."""
    lines = [f"{'run':<12}{'accuracy':>10}{'CE':>8}{'L_important':>13}{'L_unimportant':>15}{'flips':>7}"
             f"{'minutes':>9}"]
    for name, r in results.items():
        acc = f"{r['eval_accuracy']:.3f}" if "eval_accuracy" in r else "-"
        lines.append(f"{name:<12}{acc:>10}{r['eval_ce']:>8.3f}{r['eval_loss_important']:>13.3f}"
                     f"{r['eval_loss_unimportant']:>15.3f}{r.get('worst_switches', '-'):>7}"
                     f"{r['minutes']:>9.1f}")
    return "\n".join(lines)


def run_folders(args) -> dict[str, str]:
    """Run name -> its folder: --output_dir itself for one loss, a sub-folder per loss for several."""
    names = [loss if loss in ("ce", "rho1") else f"go-{args.grouping}" for loss in args.losses]
    return {name: args.output_dir if len(names) == 1 else str(Path(args.output_dir) / name) for name in names}


def claim_go_folders(args, folders: dict[str, str]) -> dict:
    """Run name -> the run id of its claimed folder (`common.claim_run_folder`); with several runs the parent
    is claimed too (it holds summary.txt). Process 0 claims; the others get None."""
    if not common.is_main():
        return dict.fromkeys(folders)
    reads = guards.inputs(args)                    # --overwrite never deletes these
    if len(folders) > 1:
        common.claim_run_folder(args.output_dir, args.overwrite, reads, resumable=False)
    return {name: common.claim_run_folder(folder, args.overwrite, reads, resumable=False)
            for name, folder in folders.items()}


def where_to_restart(args) -> str:
    """What a run that stops early prints last (sft_go.py does not resume: a run starts again)."""
    saved = [str(Path(f) / "checkpoint") for f in run_folders(args).values()
             if (Path(f) / "checkpoint").exists()]
    kept = f"the last saved model is in {saved[-1]}; " if saved else ""
    return f"{kept}sft_go.py does not resume a run: run the same command with --overwrite to start again"


import uft  # noqa: E402  (last: uft imports this module, and finds every name above already defined)


def print_evaluation(result: dict) -> None:
    """The --eval_only summary: overall figures, then one line per data_source of a mixed file."""
    print(f"\n{result['model']} on {result['n']} held-out rows: accuracy {result['eval_accuracy']:.3f}  "
          f"reward {result['eval_reward']:.3f}  format {result['eval_format_rate']:.3f}")
    for source, accuracy in result.get("eval_accuracy_by_source", {}).items():
        print(f"  {source}: accuracy {accuracy:.3f}")
    if "eval_accuracy_source_mean" in result:
        print(f"  mean over sources: {result['eval_accuracy_source_mean']:.3f}")


def change_sentence(c: dict, problems: str = "held-out problems") -> str:
    """A paired_comparison in words: the change, its 95% interval and what the interval allows one to say."""
    verdict = ("an improvement" if c["low"] > 0 else "a drop" if c["high"] < 0 else
               "not distinguishable from no change on this many problems")
    return (f"change {c['gain']:+.3f}, 95% interval {c['low']:+.3f} to {c['high']:+.3f} over {c['n']} {problems} "
            f"({c['wins']} gained, {c['losses']} lost): {verdict}")


def print_result(algo: str, result: dict, minutes: float) -> None:
    """A training run's last lines: base -> final held-out accuracy and the paired change with its interval."""
    print(f"\n{algo}: held-out accuracy {result['base_accuracy']:.3f} (base) -> "
          f"{result['final_accuracy']:.3f} after {result['steps']} steps, {minutes:.1f} min. "
          f"Run folder: {result['output_dir']}\n{change_sentence(result['comparison'])}")
