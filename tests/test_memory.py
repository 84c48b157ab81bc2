"""The one-GPU recipe: the memory estimate's formula, gradient checkpointing, bf16 autocast (here on CPU)."""
import pytest
import torch

import common
import uft
from conftest import make_llama


def test_parameter_formula_counts_real_models(tokenizer, llama):
    """llama_params, from the config's numbers alone, equals the parameters transformers builds (tied
    Llama; Qwen2 with its q/k/v biases and grouped-query attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = llama.config
    counted = common.llama_params(c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                                  c.num_attention_heads, c.num_key_value_heads, c.vocab_size)
    assert counted == sum(p.numel() for p in llama.parameters())
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))
    assert common.llama_params(3, 64, 96, 4, 2, 300, tied=True, qkv_bias=True) == \
        sum(p.numel() for p in qwen.parameters())
    assert common.model_shape(qwen).params == sum(p.numel() for p in qwen.parameters())
    assert common.model_shape(qwen).kv_heads == 2 and common.model_shape(qwen).head_dim == 16


def test_qwen_constants_give_the_published_sizes():
    """The model cards: 0.49B, 1.54B and 3.09B parameters."""
    sizes = [round(s.params / 1e9, 2) for s in common.QWEN25.values()]
    assert sizes == [0.49, 1.54, 3.09]


def test_memory_estimate_terms():
    shape = common.ModelShape(params=1000, layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=50)
    options = dict(weight_bytes=4, activation_bytes=4, rows_per_pass=3, tokens_per_row=10, scored_per_row=4,
                   rollout_rows=6, rollout_tokens=12, reference=True, logit_copies=5)
    full = common.memory_estimate(shape, gradient_checkpointing=False, **options)
    model_terms = (full["weights"], full["gradients"], full["optimizer"], full["reference"])
    assert model_terms == (4000, 4000, 8000, 4000)
    logits = 3 * 4 * 50 * (4 + 4 * 5)
    assert full["activations"] == 30 * 2 * (10 * 8 + 4 * 16) * 4 + logits
    assert full["kv_cache"] == 6 * 12 * 2 * 2 * 1 * 4 * 4          # rows, tokens, k+v, layers, kv, dim
    assert full["peak"] == 20000 + max(full["activations"], full["kv_cache"])
    checkpointed = common.memory_estimate(shape, gradient_checkpointing=True, **options)
    assert checkpointed["activations"] == (30 * 2 * 8 + 30 * (10 * 8 + 4 * 16)) * 4 + logits
    assert checkpointed["activations"] < full["activations"]
    no_ref = common.memory_estimate(shape, gradient_checkpointing=False, **{**options, "reference": False})
    assert no_ref["reference"] == 0 and no_ref["peak"] == full["peak"] - 4000


def test_grouped_scoring_falls_back_to_one_pass_under_gradient_checkpointing(tokenizer):
    """Checkpointed layers drop the KV cache in train mode, so the grouped forward's second pass would see no
    prompt; `score` must then run the plain forward, and give the numbers of a model without checkpointing."""
    model = make_llama(tokenizer, seed=1)
    ids = [tokenizer("12 + 7 =", add_special_tokens=False)["input_ids"]] * 2 + \
          [tokenizer("3 + 4 + 5 =", add_special_tokens=False)["input_ids"]] * 2
    targets = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" 19", " 1", " 12", " 7 7")]
    batch = uft.make_batch(ids, targets, [0] * 4, tokenizer.pad_token_id)
    model.train()
    expected = uft.score(model, batch, 1.0, len(tokenizer), group_size=2)[1]
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    got = uft.score(model, batch, 1.0, len(tokenizer), group_size=2)[1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    H, L = batch.hint_mask.shape[1], batch.target_mask.shape[1]
    broken = uft.grouped_forward_logits(model, batch, 2)[:, H:]                 # what the guard avoids
    plain = uft.forward_logits(model, batch.ids, batch.attention, H + L)[:, H:]
    assert not torch.allclose(broken[:, 1:], plain[:, 1:], atol=1e-3)


def run_flags(model_dir, out, *extra):
    return ["--model", str(model_dir), "--output_dir", str(out), "--device", "cpu", "--T", "2",
            "--T_hint", "1", "--num_train", "16", "--num_test", "4", "--batch_size", "2", "--mini_batch_size",
            "2", "--num_generations", "3", "--max_completion_length", "6", "--eval_steps", "2",
            "--save_steps", "2", "--micro_batch_size", "3", *extra]


def test_checkpointing_gives_the_same_step_and_the_estimate_is_printed(tiny_dir, tmp_path, capsys):
    """Step 1's loss terms come from the same weights with and without checkpointing. (Later weights differ
    by more than rounding: AdamW divides by the gradient's size, so near-zero gradients that differ in their
    last bits move a weight by up to +-lr.)"""
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    # a random model's rollouts all get reward 0 (no policy gradient) and the KL is 0 at step 1: long hints and
    # a full-weight NLL on them make sure step 1 has a gradient to compare
    signal = ["--p_low", "0.9", "--p_high", "0.9", "--sft_loss_coef", "1"]
    assert uft.main(run_flags(tiny_dir, plain, *signal)) == 0
    assert "memory estimate per device" in capsys.readouterr().out
    assert uft.main(run_flags(tiny_dir, checkpointed, *signal, "--gradient_checkpointing")) == 0
    a, b = (common.read_jsonl(out / "metrics.jsonl")[1] for out in (plain, checkpointed))
    for key in ("loss", "pg_loss", "kl", "entropy", "hint_nll", "grad_norm", "reward_mean"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert a["grad_norm"] > 0


def test_bf16_autocast_runs_matmuls_in_bfloat16_and_keeps_float32_weights(tiny_dir, tmp_path, monkeypatch):
    seen = []
    real = uft.forward_logits

    def spy(model, ids, mask, keep):
        logits = real(model, ids, mask, keep)
        seen.append(logits.dtype)
        return logits
    monkeypatch.setattr(uft, "forward_logits", spy)
    out = tmp_path / "bf16"
    assert uft.main(run_flags(tiny_dir, out, "--bf16", "--algo", "sft")) == 0
    assert seen and set(seen) == {torch.bfloat16}
    model, _ = uft.load_model(str(out / "checkpoint"), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
