"""common.py: devices and model sources, data order, micro-batch plumbing, the optimizer, files on disk."""
import doctest
import math
from types import SimpleNamespace

import pytest
import torch

import common


def test_docstring_examples_run():
    """The README's test command runs the doctests of uft.py only; these are common.py's and runs.py's."""
    import runs
    for module in (common, runs):
        result = doctest.testmod(module)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


# --- devices and model sources ------------------------------------------------------------------------------

def test_resolve_device():
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(common.UserError, match="--device"):
        common.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="CUDA"):
            common.resolve_device("cuda")


def test_model_source_splits_a_full_gguf_path(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert common.model_source("ignored", str(tmp_path / "m.gguf")) == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert common.model_source(str(tmp_path), "m.gguf") == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert common.model_source("some-org/model", None) == ("some-org/model", {})   # a hub id stays a hub id


# --- data order and micro-batches ---------------------------------------------------------------------------

def test_rows_for_step_covers_each_epoch_once():
    seen = [i for step in range(1, 6) for i in common.rows_for_step(10, 4, step, seed=0)]
    assert sorted(seen[:8] + seen[8:10]) == list(range(10))       # first epoch: every row once
    assert common.rows_for_step(10, 4, 3, seed=0) == common.rows_for_step(10, 4, 3, seed=0)
    assert common.rows_for_step(10, 4, 1, seed=0) != common.rows_for_step(10, 4, 1, seed=1)


def test_widen_pads_on_the_right_and_keeps_the_dtype():
    x = torch.tensor([[1, 2], [3, 4]])
    assert common.widen(x, 4, fill=-1).tolist() == [[1, 2, -1, -1], [3, 4, -1, -1]]
    assert common.widen(x, 2).tolist() == x.tolist()
    mask = common.widen(torch.tensor([[True], [False]]), 3)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, False, False], [False, False, False]]


def test_micro_batches_are_consecutive_chunks():
    assert [c.tolist() for c in common.micro_batches(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [c.tolist() for c in common.micro_batches(2, 5)] == [[0, 1]]
    assert list(common.micro_batches(0, 3)) == []


def test_backward_refuses_a_non_finite_loss_before_the_weights_see_it():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(FloatingPointError, match="step 7"):
        common.backward((w * float("nan")).sum(), 7)
    assert w.grad is None
    common.backward((2 * w).sum(), 8)
    assert w.grad.tolist() == [2.0, 2.0, 2.0]


def test_stop_token_ids_joins_the_generation_config_and_the_tokenizer():
    tok = SimpleNamespace(eos_token_id=1)
    model = lambda eos: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))  # noqa: E731
    assert common.stop_token_ids(model([7, 1]), tok) == [1, 7]
    assert common.stop_token_ids(model(3), tok) == [1, 3]
    assert common.stop_token_ids(model(None), tok) == [1]


def test_mask_padded_vocab_hides_only_the_padded_rows():
    logits = torch.arange(12.0).view(2, 6)
    masked = common.mask_padded_vocab(logits, 4)
    assert torch.isinf(masked[:, 4:]).all() and (masked[:, 4:] < 0).all()
    assert torch.equal(masked[:, :4], logits[:, :4])
    assert torch.isfinite(logits).all()                            # the input is not changed in place
    assert common.mask_padded_vocab(logits, None) is logits and common.mask_padded_vocab(logits, 6) is logits


# --- the optimizer ------------------------------------------------------------------------------------------

def test_make_optimizer_warms_up_linearly_then_follows_the_cosine_to_zero():
    model = torch.nn.Linear(2, 1)
    steps, peak = 8, 0.5
    optimizer, scheduler = common.make_optimizer(model, peak, 0.0, 0.25, steps)   # warm-up: 2 of 8 steps
    lrs = []
    for _ in range(steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # i steps taken: warm-up (i + 1) / 2 for i < 2, then 0.5 (1 + cos(pi (i - 2) / 6))
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 6)), 0.75, 0.5, 0.25,
                0.5 * (1 + math.cos(5 * math.pi / 6)), 0.0]
    assert lrs == pytest.approx([peak * f for f in expected], abs=1e-12)
    optimizer, scheduler = common.make_optimizer(model, peak, 0.0, 0.0, steps, schedule="constant")
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == peak


def test_optimizer_step_returns_the_pre_clip_norm_and_clears_gradients():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    (model(torch.tensor([[3.0, 4.0]])).sum()).backward()          # gradient (3, 4): norm 5
    norm = common.optimizer_step(model, optimizer, max_grad_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert model.weight.grad is None
    torch.testing.assert_close(model.weight.data, torch.tensor([[1 - 0.6, 1 - 0.8]]))   # clipped to norm 1


def test_frozen_copy_is_a_detached_eval_copy():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    ref = common.frozen_copy(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())    # the original is untouched
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(model[0].weight, ref[0].weight)                     # separate storage


# --- files ----------------------------------------------------------------------------------------------------

def test_save_atomically_replaces_a_folder_and_a_failed_save_keeps_the_old_one(tmp_path):
    folder = tmp_path / "checkpoint"

    def write(text):
        def save(path):
            path.mkdir()
            (path / "weights").write_text(text)
        return save
    common.save_atomically(write("one"), folder)
    common.save_atomically(write("two"), folder)
    assert (folder / "weights").read_text() == "two"

    def crash(path):
        path.mkdir()
        (path / "weights").write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        common.save_atomically(crash, folder)
    assert (folder / "weights").read_text() == "two"
    common.save_atomically(write("three"), folder)                # a stale temporary folder is cleared first
    assert (folder / "weights").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_jsonl_round_trip_and_a_missing_file_reads_as_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert common.read_jsonl(path) == []
    common.append_jsonl(path, {"step": 1, "loss": 0.5})
    common.append_jsonl(path, {"step": 2, "text": "a\nb"})
    assert common.read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "text": "a\nb"}]
    assert len(path.read_text().splitlines()) == 2                   # one record a line
