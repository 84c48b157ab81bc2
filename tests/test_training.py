"""The training loop end to end on a tiny model: every algo, the run folder, resume, bad input."""
import json
import math

import pytest
import torch

import common
import tasks
import uft
from conftest import make_llama, metrics_of, uft_flags as flags




@pytest.mark.parametrize("algo", list(uft.ALGOS))
def test_every_algo_trains_and_writes_a_complete_run_folder(tiny_dir, tmp_path, algo):
    out = tmp_path / algo
    assert uft.main(flags(tiny_dir, out, "--algo", algo, "--sft_steps", "2")) == 0
    for name in ("config.json", "metrics.jsonl", "plot.png", "checkpoint/config.json",
                 "checkpoint/trainer_state.pt", "checkpoint/tokenizer.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["algo"] == algo
    before, _ = uft.load_model(str(tiny_dir), device="cpu")
    after, _ = uft.load_model(str(out / "checkpoint"), device="cpu")
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert sum(changed) > len(changed) // 2
    metrics = common.read_jsonl(out / "metrics.jsonl")
    steps = 6 if algo == "sft-rft" else 4          # sft-rft: 2 SFT steps, then as many RL steps as rft (T = 4)
    assert [m["step"] for m in metrics] == list(range(steps + 1))
    assert "eval_accuracy" in metrics[0] and "eval_accuracy" in metrics[-1]
    phases = [m["phase"] for m in metrics[1:]]
    assert phases == {"sft": ["sft"] * 4, "sft-rft": ["sft", "sft"] + ["rl"] * 4}.get(algo, ["rl"] * 4)
    assert [m["optimizer_steps"] for m in metrics[1:]] == sorted(m["optimizer_steps"] for m in metrics[1:])
    assert metrics[-1]["problems_seen"] == 2 * steps
    assert (metrics[-1]["tokens_generated"] > 0) == (algo != "sft")
    if algo != "sft":
        rl = [m for m in metrics[1:] if m["phase"] == "rl"]
        for key in ("reward_mean", "reward_std", "zero_std_groups", "hint_fraction", "response_length",
                    "truncated", "kl", "entropy", "grad_norm", "rollout_tokens_per_s"):
            assert all(key in m for m in rl), key
        assert ("hint_nll" in rl[0]) == (algo == "uft")
        drawn = [m["hint_fraction_drawn"] for m in rl]
        assert (max(drawn) == 0) == (algo in ("rft", "sft-rft"))


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert uft.main(flags(tiny_dir, whole, "--algo", "uft")) == 0
    real_rows = uft.rows_for_step

    def crash_at_3(num_rows, batch_size, step, seed):       # the first thing a step does: draw its problems
        if step == 3:
            raise KeyboardInterrupt
        return real_rows(num_rows, batch_size, step, seed)
    monkeypatch.setattr(uft, "rows_for_step", crash_at_3)
    assert uft.main(flags(tiny_dir, split, "--algo", "uft")) == 130          # Ctrl-C: 128 + SIGINT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stopped by SIGINT") and f"--resume {split}" in err and "(step 2)" in err
    monkeypatch.setattr(uft, "rows_for_step", real_rows)
    assert (split / "checkpoint" / "trainer_state.pt").exists()
    assert uft.main(["--resume", str(split)]) == 0
    assert metrics_of(split) == metrics_of(whole)
    a, _ = uft.load_model(str(whole / "checkpoint"), device="cpu")
    b, _ = uft.load_model(str(split / "checkpoint"), device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    real = uft.policy_gradient_loss

    def nan_at_3(logp, old, adv, eps=0.2):
        loss = real(logp, old, adv, eps)
        return loss * float("nan") if nan_at_3.run_step() == 3 else loss
    real_rows = uft.rows_for_step
    current = {}

    def track(num_rows, batch_size, step, seed):
        current["step"] = step
        return real_rows(num_rows, batch_size, step, seed)
    nan_at_3.run_step = lambda: current.get("step")
    monkeypatch.setattr(uft, "policy_gradient_loss", nan_at_3)
    monkeypatch.setattr(uft, "rows_for_step", track)
    assert uft.main(flags(tiny_dir, out, "--algo", "rft")) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 3" in err and "checkpoint" in err
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert not list(out.glob("checkpoint.tmp-*"))


@pytest.mark.parametrize("bad, message", [
    (["--p_low", "0.9", "--p_high", "0.1"], "p_low"),
    (["--T", "10", "--T_hint", "20"], "T_hint"),
    (["--num_generations", "1"], "num_generations"),
    (["--batch_size", "6", "--mini_batch_size", "4"], "divisible"),
    (["--max_completion_length", "0"], "max_completion_length"),
    (["--T", "-3"], "--T"),
    (["--data", "no/such/file.parquet"], "no such file"),
    (["--resume", "/no/such/run"], "no checkpoint"),
])
def test_bad_flags_fail_at_start_with_a_clear_message(bad, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        uft.parse_args(bad)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_one_line_not_a_traceback(tmp_path, capsys):
    assert uft.main(["--model", str(tmp_path / "missing" / "model"), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no such folder" in err and len(err.splitlines()) == 1


def test_sft_targets_are_answer_plus_eos_and_hints_are_their_prefix(tiny_dir):
    model, tok = uft.load_model(str(tiny_dir), device="cpu")
    row = tasks.generate_countdown(1, seed=3)[0]
    batch = uft.sft_batch(tok, [row])
    target = batch.ids[0, -batch.target_mask.shape[1]:][batch.target_mask[0]].tolist()
    assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]) == row["answer"]
    cache = {}
    encode = lambda text: cache.setdefault(text, tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts, hint_lengths = uft.hinted_prompts([row], [("", 2, 0.4)], encode)   # how a rollout encodes a hint
    hint_ids = prompts[0][len(prompts[0]) - hint_lengths[0]:]
    assert hint_ids and target[: len(hint_ids)] == hint_ids
    assert uft.sft_batch(tok, [row], encode=encode).ids.tolist() == batch.ids.tolist()   # a run's cache


def test_sft_update_is_the_token_mean_nll_whatever_the_micro_batch_size(tokenizer):
    """One optimizer step on the mean NLL of all answer tokens: micro-batches of 1 row and one pass agree."""
    rows = [{"question": f"{a} + {b} =", "answer": f" {a + b}" + "\nthe answer is <answer> 7 </answer>" * (a % 3)}
            for a, b in [(3, 4), (12, 9), (25, 1), (7, 7)]]
    batch, V = uft.sft_batch(tokenizer, rows), len(tokenizer)
    assert len(set(batch.target_mask.sum(-1).tolist())) > 1                 # answers of different lengths
    results = []
    for size in (1, len(rows)):
        model = make_llama(tokenizer, seed=0)
        with torch.no_grad():
            _, logp, _ = uft.score(model, batch, 1.0, V)
        nll = float(-logp[batch.target_mask].sum() / batch.target_mask.sum())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        metrics = uft.sft_update(model, batch, V, optimizer, micro_batch_size=size, max_grad_norm=1e9, step=1)
        assert metrics["loss"] == pytest.approx(nll, rel=1e-5) and metrics["updates"] == 1
        assert all(p.grad is None for p in model.parameters())                 # the step cleared them
        results.append((metrics["grad_norm"], [p.detach().clone() for p in model.parameters()]))
    (norm_1, weights_1), (norm_all, weights_all) = results
    assert norm_1 == pytest.approx(norm_all, rel=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(weights_1, make_llama(tokenizer, seed=0).parameters()))
    for a, b in zip(weights_1, weights_all):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_data_file_of_the_released_schema_trains_and_a_bad_row_is_named(tiny_dir, tmp_path, capsys):
    rows = tasks.generate_countdown(30, seed=9, min_nums=3, max_nums=3)
    good = tmp_path / "rows.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "from-file"
    assert uft.main(flags(tiny_dir, out, "--algo", "uft", "--data", str(good), "--T", "1", "--T_hint", "1")) == 0
    assert len(common.read_jsonl(out / "metrics.jsonl")) == 2
    bad = tmp_path / "bad.jsonl"
    broken = [dict(r) for r in rows]
    del broken[4]["target"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in broken))
    assert uft.main(flags(tiny_dir, tmp_path / "o2", "--data", str(bad))) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 4" in err and "target" in err


def test_learning_rate_schedule_counts_training_steps_not_optimizer_updates(tiny_dir, tmp_path):
    """batch 2 / mini-batch 1 = two optimizer updates a step; the cosine still spans exactly T steps."""
    out = tmp_path / "cosine"
    assert uft.main(flags(tiny_dir, out, "--algo", "rft", "--lr_scheduler", "cosine", "--warmup_ratio", "0.25")) == 0
    lrs = [m["lr"] for m in common.read_jsonl(out / "metrics.jsonl") if "lr" in m]
    T, peak, warmup = 4, 1e-3, 1
    # after step t the scheduler has taken t steps: warm-up for the first, then cosine over the remaining T - 1
    expected = [peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (T - warmup))) for t in range(1, T + 1)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[0] == pytest.approx(peak)


@pytest.mark.parametrize("format_reward", [0.1, 0.0])
def test_format_reward_sets_what_the_advantages_see_and_leaves_the_logged_rewards(tiny_dir, tmp_path, monkeypatch,
                                                                                   format_reward):
    calls = iter(range(10_000))
    monkeypatch.setattr(tasks, "reward", lambda row, text: [0.0, tasks.REWARD_WRONG][next(calls) % 2])
    seen, real = [], uft.group_advantages
    monkeypatch.setattr(uft, "group_advantages", lambda r: seen.append(r.clone()) or real(r))
    out = tmp_path / "run"
    assert uft.main(flags(tiny_dir, out, "--algo", "rft", "--format_reward", str(format_reward))) == 0
    values = {round(float(v), 6) for r in seen for v in r.flatten()}
    assert values == {0.0, format_reward}
    logged = [m["reward_mean"] for m in metrics_of(out) if "reward_mean" in m]
    assert logged and all(abs(r - tasks.REWARD_WRONG / 2) < 1e-6 for r in logged)   # the released 0.1 logged
