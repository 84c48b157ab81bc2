"""Tiny models built inside the tests: no download, a few hundred milliseconds each."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import tasks  # noqa: E402

CORPUS = [f"{a} + {b} = {a + b}\nthe answer is <answer> {a * b} </answer>" for a in range(30) for b in range(12)]


@pytest.fixture(scope="session")
def tokenizer():
    return common.build_tokenizer(CORPUS, vocab_size=300)


def make_llama(tokenizer, seed=0, vocab_rows=None):
    """A 2-layer Llama whose large init makes logits peaked (greedy ties would make comparisons flaky)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = common.tiny_llama_config(vocab_rows or len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(folder, rows, vocab_size):
    """A tiny Llama with a tokenizer trained on rows' question + answer text, saved like a user's model folder."""
    tok = common.build_tokenizer([r["question"] + r["answer"] for r in rows], vocab_size=vocab_size)
    make_llama(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Runs compared with single-threaded subprocesses use one thread too: matmuls split over threads add
    in another order, and a few training steps carry the difference past any tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_gpt2(tokenizer, seed=0):
    """GPT-2 has absolute position embeddings: a wrong position id under left padding changes its output."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def llama(tokenizer):
    return make_llama(tokenizer)


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    return make_gpt2(tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer trained on countdown text, saved like a user's model folder."""
    rows = tasks.generate_countdown(300, seed=5, min_nums=3, max_nums=3)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-countdown"), rows, vocab_size=400)


def uft_flags(model_dir, out, *extra):
    """uft.py flags for a run of seconds: T = 4 steps of 2 prompts x 3 rollouts, evaluations and checkpoints
    every 2 steps."""
    return ["--model", str(model_dir), "--output_dir", str(out), "--device", "cpu", "--T", "4", "--T_hint", "3",
            "--num_train", "24", "--num_test", "6", "--batch_size", "2", "--mini_batch_size", "1",
            "--num_generations", "3", "--max_completion_length", "6", "--eval_steps", "2", "--save_steps", "2",
            "--micro_batch_size", "4", "--learning_rate", "1e-3", *extra]


TIMING = ("step_seconds", "rollout_tokens_per_s", "train_seconds")   # differ between two identical runs


def metrics_of(out):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in common.read_jsonl(Path(out) / "metrics.jsonl")]
