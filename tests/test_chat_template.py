"""--chat_template (instruct models) and --prompt_style short: prompts in a chat template, rewards unchanged."""
import json

import pytest

import common
import models
import sft_go
import tasks
import uft
from conftest import save_tiny_model, uft_flags

# A ChatML template like SmolLM2's (its system turn left out): user turn, then the assistant's header.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def released_rows():
    return [tasks.generate_countdown(1, seed=1, min_nums=3, max_nums=3)[0], tasks.generate_kk(1, seed=1)[0]]


def test_every_generated_task_scores_an_answer_in_a_chat_template():
    rows = released_rows() + tasks.tree_split(1, 0, seed=0, B=2, H=3, which="validation")[0]
    assert [tasks.task_of(r) for r in rows] == ["countdown", "kk", "tree"]
    for row in rows:
        question = tasks.chat_question(row["question"], chatml)
        assert tasks.reward(row, question + row["answer"]) == 1.0, tasks.task_of(row)
        assert tasks.reward(row, question + " no") == 0.0, tasks.task_of(row)


@pytest.mark.parametrize("row", released_rows(), ids=["countdown", "kk"])
def test_a_released_prompt_splits_into_the_user_words_and_the_assistant_opening(row):
    user, opening = tasks.split_prompt(row["question"])
    assert opening == tasks.ASSISTANT_START.removeprefix("Assistant: ")
    assert "Assistant:" not in user and not user.startswith("User:") and "conversation between" not in user
    assert user in row["question"] and user.endswith("</answer>.")


@pytest.mark.parametrize("row", released_rows(), ids=["countdown", "kk"])
def test_in_a_chat_template_the_reward_still_finds_the_answer(row):
    question = tasks.chat_question(row["question"], chatml)
    assert question.startswith("<|im_start|>user\n")
    assert question.endswith("<|im_start|>assistant\n" + tasks.split_prompt(row["question"])[1])
    assert tasks.reward(row, question + row["answer"]) == 1.0
    assert tasks.reward(row, question + "no answer here") == 0.0


def test_a_prompt_without_an_assistant_opening_is_all_user_words():
    assert tasks.split_prompt("Path 7 (2 steps, choices a b):") == ("Path 7 (2 steps, choices a b):", "")


def test_the_short_prompt_keeps_the_answer_hints_and_reward():
    rows = tasks.generate_countdown(5, seed=2, min_nums=3, max_nums=4)
    short = tasks.restyle(rows, "short")
    for row, new in zip(rows, short):
        assert new["question"] != row["question"] and len(new["question"]) < len(row["question"]) / 2
        assert new["question"].endswith(tasks.ASSISTANT_START)
        assert all(str(n) in new["question"] for n in row["nums"]) and str(row["target"]) in new["question"]
        assert new["answer"] == row["answer"] and new["hint"][:-1] == row["hint"]    # one fragment more:
        assert "".join(new["hint"]) == row["answer"] and new["hint"][-1].startswith(" </think>\n<answer> ")
        assert tasks.reward(new, new["question"] + new["answer"]) == 1.0
        assert tasks.reward(new, new["question"] + "".join(new["hint"][:-1])) == 0.0   # the tags are needed
    assert tasks.restyle(rows, "released") == rows


def test_the_short_prompt_refuses_other_tasks_by_row():
    rows = tasks.generate_countdown(2, seed=0) + tasks.generate_kk(1, seed=0)
    with pytest.raises(ValueError, match=r"--prompt_style short: countdown rows only \(row 2 is kk\)"):
        tasks.restyle(rows, "short")


def test_a_tokenizer_without_a_template_is_a_one_line_error(tokenizer):
    with pytest.raises(common.UserError, match="--chat_template: the tokenizer of --model m has no chat "):
        models.chat_rows(released_rows(), tokenizer, "m")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama whose tokenizer has a ChatML template."""
    folder = tmp_path_factory.mktemp("chat-model")
    save_tiny_model(folder, tasks.generate_countdown(200, seed=5, min_nums=3, max_nums=3), vocab_size=400)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHATML}))
    return folder


def recorded_prompts(monkeypatch):
    """Patch uft.generate to record the decoded prompts it is given."""
    seen, real = [], uft.generate

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(tokenizer.decode(p) for p in prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)
    monkeypatch.setattr(uft, "generate", spy)
    return seen


def test_uft_samples_and_evaluates_prompts_in_the_template(chat_model, tmp_path, monkeypatch, capsys):
    seen = recorded_prompts(monkeypatch)
    out = tmp_path / "run"
    assert uft.main(uft_flags(chat_model, out, "--chat_template", "--prompt_style", "short")) == 0
    assert json.loads((out / "config.json").read_text())["chat_template"] is True
    assert seen and all("user" in p and "assistant" in p and "Using the numbers" in p for p in seen)
    assert not any("A conversation between" in p for p in seen)
    capsys.readouterr()
    plain = tmp_path / "plain"
    seen.clear()
    assert uft.main(uft_flags(chat_model, plain)) == 0
    assert seen and all("A conversation between" in p and "<|im_start|>" not in p for p in seen)


def test_uft_refuses_the_flag_for_a_model_without_a_template(tiny_dir, tmp_path, capsys):
    assert uft.main(uft_flags(tiny_dir, tmp_path / "run", "--chat_template")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no chat template" in err[0]


def test_sft_go_trains_on_prompts_in_the_template(chat_model, tmp_path, monkeypatch):
    encoded = []
    real = sft_go.encode_rows

    def spy(tokenizer, rows, *args, **kwargs):
        encoded.extend(r["prompt"] for r in rows)
        return real(tokenizer, rows, *args, **kwargs)
    monkeypatch.setattr(sft_go, "encode_rows", spy)
    seen = recorded_prompts(monkeypatch)
    flags = ["--model", str(chat_model), "--chat_template", "--loss", "ce", "--num_train", "8", "--num_test", "4",
             "--T", "2", "--batch_size", "4", "--micro_batch_size", "4", "--eval_steps", "2", "--device", "cpu",
             "--max_completion_length", "4", "--output_dir", str(tmp_path / "go"), "--num_html_samples", "1"]
    assert sft_go.main(flags) == 0
    assert encoded and all(p.startswith("<|im_start|>user\n") for p in encoded)
    assert seen and all("<|im_start|>" in p or "im_start" in p for p in seen)   # the held-out answers too
