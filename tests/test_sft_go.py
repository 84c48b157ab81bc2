"""SFT-GO: the loss and its gradient, the groupings, the guards, and short training runs of every variant."""
import json
import math
import re

import pytest
import torch

import runs
import sft_go
import tasks
import uft
from conftest import CORPUS, make_llama


def random_case(seed=0, B=3, L=7):
    """Token losses, a mask with ragged lengths (one row of length 1), and top-0.3 groups."""
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(B, L, generator=g) * 4
    lengths = torch.tensor([L, 4, 1][:B])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    groups = sft_go.top_eta_groups(torch.rand(B, L, generator=g), mask, 0.3)
    return losses, groups, mask


# ---------------------------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("reduce", ["batch", "per_sample"])
def test_lambda_zero_is_exactly_ce(reduce):
    losses, groups, mask = random_case()
    loss, stats = sft_go.worst_group_loss(losses, groups, mask, 0.0, reduce)
    if reduce == "batch":
        ce = losses[mask].mean()
    else:
        ce = torch.stack([losses[i][mask[i]].mean() for i in range(len(mask))]).mean()
    assert torch.equal(loss, sft_go.masked_mean(losses, mask, reduce)[0])   # bit for bit: no lam * L residue
    assert float(loss) == pytest.approx(float(ce), rel=1e-6) and stats["ce"] == pytest.approx(float(ce))


@pytest.mark.parametrize("lam", [0.3, 0.9, 1.0])
@pytest.mark.parametrize("only", [0, 1])
def test_an_empty_group_gives_ce_for_any_lambda(lam, only):
    losses, _, mask = random_case()
    groups = torch.where(mask, only, -1)                   # every supervised token in one group
    ce = losses[mask].mean()
    loss, stats = sft_go.worst_group_loss(losses, groups, mask, lam)
    assert float(loss) == pytest.approx(float(ce), rel=1e-6)
    assert stats["worst_group"] == -1                      # no worst group when only one exists
    dro, _ = sft_go.worst_group_loss(losses, groups, mask, lam, weights=torch.tensor([0.99, 0.01]))
    assert float(dro) == pytest.approx(float(ce), rel=1e-6)


def test_go_loss_is_the_mix_of_ce_and_the_worse_group():
    losses, groups, mask = random_case(seed=1)
    L0, L1 = losses[mask & (groups == 0)].mean(), losses[mask & (groups == 1)].mean()
    loss, stats = sft_go.worst_group_loss(losses, groups, mask, 0.9)
    assert float(loss) == pytest.approx(float(0.1 * losses[mask].mean() + 0.9 * max(L0, L1)), rel=1e-6)
    assert stats["worst_group"] == int(L1 > L0)
    assert (stats["loss_unimportant"], stats["loss_important"]) == pytest.approx((float(L0), float(L1)))


def test_per_sample_reduction_averages_sample_means_over_samples_that_have_the_group():
    losses = torch.tensor([[1.0, 2.0, 6.0], [4.0, 8.0, 0.0]])
    groups = torch.tensor([[1, 0, 0], [0, 0, -1]])
    mask = groups >= 0
    means, present = sft_go.group_means(losses, groups, mask, "per_sample")
    assert means.tolist() == [((2 + 6) / 2 + (4 + 8) / 2) / 2, 1.0]   # group 1 exists in sample 0 only
    assert present.tolist() == [True, True]
    batch_means, _ = sft_go.group_means(losses, groups, mask, "batch")
    assert batch_means.tolist() == [(2 + 6 + 4 + 8) / 4, 1.0]


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
def test_gradient_weight_of_each_token(lam):
    losses, groups, mask = random_case(seed=2)
    losses.requires_grad_(True)
    loss, stats = sft_go.worst_group_loss(losses, groups, mask, lam)
    loss.backward()
    w = stats["worst_group"]
    N, N_w = int(mask.sum()), int((mask & (groups == w)).sum())
    expected = torch.where(mask, (1 - lam) / N, 0.0) + torch.where(mask & (groups == w), lam / N_w, 0.0)
    assert torch.allclose(losses.grad, expected, atol=1e-7)
    assert (losses.grad[~mask] == 0).all()                  # padding never trained


def test_an_all_masked_batch_raises():
    losses = torch.rand(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="no supervised token"):
        sft_go.worst_group_loss(losses, torch.full((2, 3), -1), mask, 0.9)


def test_dro_weights_move_toward_the_worse_group():
    q = torch.tensor([0.5, 0.5])
    present = torch.tensor([True, True])
    for _ in range(3):
        q = sft_go.update_dro_weights(q, torch.tensor([1.0, 2.5]), present, eta_q=0.01)
    assert q[1] > 0.5 > q[0] and float(q.sum()) == pytest.approx(1.0)
    assert float(q[1] / q[0]) == pytest.approx(math.exp(3 * 0.01 * 1.5), rel=1e-5)
    stuck = sft_go.update_dro_weights(q, torch.tensor([0.0, 9.0]), torch.tensor([True, False]))
    assert torch.allclose(stuck, q)                        # an absent group (and a zero loss) moves nothing


def test_lambda_schedules():
    T, lam0 = 100, 0.9
    for schedule in sft_go.LAMBDA_SCHEDULES:
        values = [sft_go.lambda_at(t, T, lam0, schedule) for t in range(0, T + 1)]
        assert values[0] == pytest.approx(lam0)
        assert all(a >= b for a, b in zip(values, values[1:]))
    assert sft_go.lambda_at(T, T, lam0, "constant") == lam0
    assert sft_go.lambda_at(T, T, lam0, "linear") == pytest.approx(0.0)
    assert sft_go.lambda_at(T, T, lam0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert sft_go.lambda_at(T // 2, T, lam0, "cosine") == pytest.approx(lam0 / 2)
    assert sft_go.lambda_at(T, T, lam0, "exp") == pytest.approx(lam0 * math.exp(-sft_go.EXP_DECAY_RATE))


# ---------------------------------------------------------------------------------------------- grouping

def test_top_eta_groups_sizes_ties_and_padding():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],    # all tied
                           [0.0, 5.0, 1.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [3.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
    lengths = torch.tensor([10, 4, 2])
    mask = torch.arange(10)[None, :] < lengths[:, None]
    groups = sft_go.top_eta_groups(scores, mask, 0.3)
    assert groups[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]     # ties: the earliest 3 of 10
    assert groups[1].tolist() == [0, 1, 0, 0] + [-1] * 6           # round(1.2) = 1: the first of the two 5s
    assert groups[2].tolist() == [0, 1] + [-1] * 8                 # 2 tokens: one in each group
    assert ((groups == -1) == ~mask).all()
    for n in range(2, 30):                                         # every eta keeps both groups non-empty
        for eta in (0.01, 0.3, 0.99):
            g = sft_go.top_eta_groups(torch.rand(1, n), torch.ones(1, n, dtype=torch.bool), eta)
            assert 1 <= int(g.sum()) <= n - 1


def test_batch_level_selection_ranks_the_whole_batch():
    scores = torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 3.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert sft_go.top_eta_groups(scores, mask, 0.5, per="batch").tolist() == [[1, 1, 1], [0, 0, 0]]
    assert sft_go.top_eta_groups(scores, mask, 0.5).tolist() == [[1, 1, 0], [0, 1, 1]]


def test_tfidf_on_a_hand_built_corpus():
    docs = [[5, 6, 5, 7], [6, 8], [5, 9, 9, 9]]
    n = 3
    df = {5: 2, 6: 2, 7: 1, 8: 1, 9: 1}
    tf = [{5: 2, 6: 1, 7: 1}, {6: 1, 8: 1}, {5: 1, 9: 3}]
    expected = [[tf[d][t] * (math.log((1 + n) / (1 + df[t])) + 1) for t in doc] for d, doc in enumerate(docs)]
    got = sft_go.tfidf_scores(docs)
    assert [len(d) for d in got] == [4, 2, 4]
    assert sum(got, []) == pytest.approx(sum(expected, []))
    # held-out documents use the training idf; an unseen term has df = 0
    assert sft_go.tfidf_scores([[5, 42]], docs)[0] == pytest.approx([math.log(4 / 3) + 1, math.log(4) + 1])


def overlap_max(spans, span_scores, offsets):
    """The test's own span -> token rule, by character sets: max score of the words sharing a character."""
    out = []
    for a, b in offsets:
        hits = [s for (ws, we), s in zip(spans, span_scores) if set(range(a, b)) & set(range(ws, we))]
        out.append(max(hits, default=0.0))
    return out


def test_words_map_onto_the_tokens_that_overlap_them(tokenizer):
    text = "the answer is 84"
    spans = sft_go.word_spans(text)
    assert [text[a:b] for a, b in spans] == ["the", "answer", "is", "84"]
    # hand-written offsets: 'theĠ', 'answerĠis' (two words: the max), a bare space (no word), '8', '4'
    offsets = [(0, 4), (4, 13), (13, 14), (14, 15), (15, 16)]
    assert sft_go.spans_to_tokens(spans, [1.0, 2.0, 3.0, 4.0], offsets) == [1.0, 3.0, 0.0, 4.0, 4.0]
    assert sft_go.spans_to_tokens(spans, [1.0, 2.0, 3.0, 4.0], [(16, 16)]) == [0.0]   # EOS: an empty span
    # the same rule through the real tokenizer's offsets, on text with punctuation and newlines
    text = "12 + 7 = 19\nthe answer is <answer> (84) </answer>"
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = sft_go.word_spans(text)
    word_scores = [float(i + 1) for i in range(len(spans))]
    assert sft_go.spans_to_tokens(spans, word_scores, offsets) == overlap_max(spans, word_scores, offsets)


def test_word_tfidf_moves_word_scores_onto_tokens(tokenizer):
    corpus = ["the answer is 84", "the answer is 7", "the cat"]
    offsets = tokenizer(corpus, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = 3      # df: the 3, answer 2, is 2, 84 1; every tf is 1 in the first document
    word_scores = [1.0, math.log(4 / 3) + 1, math.log(4 / 3) + 1, math.log(4 / 2) + 1]
    expected = overlap_max(sft_go.word_spans(corpus[0]), word_scores, offsets[0])
    assert sft_go.word_tfidf_scores(corpus, offsets)[0] == pytest.approx(expected)
    assert max(expected) == pytest.approx(math.log((1 + n) / 2) + 1)    # the rare word "84" scores highest


def build_classifier(folder):
    """A tiny BERT token classifier with a WordPiece tokenizer trained here (stands in for LLMLingua-2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=128, num_labels=2, initializer_range=1.0))
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("classifier"))


def test_classifier_scores_average_subwords_per_word(tokenizer, classifier_dir):
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    cls_tok = AutoTokenizer.from_pretrained(classifier_dir)
    clf = AutoModelForTokenClassification.from_pretrained(classifier_dir).eval()
    text = "the answer is <answer> 1234 </answer>"
    llm = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    got = sft_go.classifier_scores(clf, cls_tok, [text], [llm["offset_mapping"]], label=1)[0]
    # independent path: the classifier tokenizer's own word ids (BERT splits on spaces and punctuation too)
    enc = cls_tok(text, return_tensors="pt")
    assert len(set(w for w in enc.word_ids() if w is not None)) < len(enc.word_ids()) - 2   # some word is split
    with torch.no_grad():
        keep = clf(**enc).logits.softmax(-1)[0, :, 1]
    words = {}
    for i, w in enumerate(enc.word_ids()):
        if w is not None:
            words.setdefault(w, []).append(float(keep[i]))
    word_scores = [sum(v) / len(v) for _, v in sorted(words.items())]
    assert len(word_scores) == len(sft_go.word_spans(text))
    expected = sft_go.spans_to_tokens(sft_go.word_spans(text), word_scores, llm["offset_mapping"])
    assert got == pytest.approx(expected, abs=1e-6)
    assert len(set(round(s, 6) for s in got)) > 3                # the scores are not constant


def test_classifier_scores_a_long_text_in_overlapping_windows(tokenizer, classifier_dir):
    """A response of ~3x the classifier's 128 positions: every word is scored, from windows computed here
    by hand (126 sub-words between CLS and SEP, consecutive windows sharing 32)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    cls_tok = AutoTokenizer.from_pretrained(classifier_dir)
    clf = AutoModelForTokenClassification.from_pretrained(classifier_dir).eval()
    text = " ".join(f"{i * 7 % 100} + {i} = {i * 7 % 100 + i}" for i in range(60))
    llm = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    got = sft_go.classifier_scores(clf, cls_tok, [text], [llm["offset_mapping"]], label=1, overlap=32)[0]
    plain = cls_tok(text, add_special_tokens=False)
    ids, word_of = plain["input_ids"], plain.word_ids()
    assert len(ids) > 3 * 128                                      # longer than the limit, three windows+
    sums, counts = [0.0] * len(ids), [0] * len(ids)
    for start in range(0, len(ids) - 32, 126 - 32):
        window = ids[start: start + 126]
        with torch.no_grad():
            keep = clf(input_ids=torch.tensor([[2, *window, 3]])).logits.softmax(-1)[0, 1:-1, 1]
        for i, k in enumerate(keep.tolist()):
            sums[start + i] += k
            counts[start + i] += 1
    assert min(counts) >= 1 and max(counts) == 2                   # every sub-word scored; overlaps twice
    words = {}
    for i, w in enumerate(word_of):
        words.setdefault(w, []).append(sums[i] / counts[i])
    word_scores = [sum(v) / len(v) for _, v in sorted(words.items())]
    expected = sft_go.spans_to_tokens(sft_go.word_spans(text), word_scores, llm["offset_mapping"])
    assert got == pytest.approx(expected, abs=1e-5)
    tail = got[len(got) // 2:]
    assert len(set(round(s, 6) for s in tail)) > 3               # the part past the limit is really scored


def test_excess_loss_groups_change_when_the_model_changes(tokenizer):
    rows = [{"prompt": c[: c.index("=") + 2], "response": c[c.index("=") + 2:]} for c in CORPUS[::37]]
    enc = sft_go.encode_rows(tokenizer, rows, 64, 64)
    batch = sft_go.batch_of(enc, list(range(len(rows))), tokenizer.pad_token_id)
    vocab = len(tokenizer)
    with torch.no_grad():
        ref = sft_go.token_nll(make_llama(tokenizer, seed=0), batch, vocab)
        groups = [sft_go.top_eta_groups(sft_go.excess_loss_scores(sft_go.token_nll(make_llama(tokenizer, seed=s),
                                                                                  batch, vocab), ref),
                                        batch.target_mask, 0.3) for s in (1, 2)]
    assert ((groups[0] != groups[1]) & batch.target_mask).any()
    assert ((groups[0] == -1) == ~batch.target_mask).all()


def test_prompt_and_padding_get_no_group_and_no_gradient(tokenizer):
    rows = [{"prompt": "3 + 4 = ", "response": "7\nthe answer is <answer> 12 </answer>"},
            {"prompt": "11 + 2 = 13\nthe answer", "response": " is 22"}]
    enc = sft_go.encode_rows(tokenizer, rows, 64, 64)
    batch = sft_go.batch_of(enc, [0, 1], tokenizer.pad_token_id)
    L = batch.target_mask.shape[1]
    assert batch.ids[:, -L:][batch.target_mask].tolist() == enc.responses[0] + enc.responses[1]
    model = make_llama(tokenizer)
    kept = {}

    def keep_logits(module, inputs, out):
        out.retain_grad()
        kept["logits"] = out
    model.lm_head.register_forward_hook(keep_logits)
    losses = sft_go.token_nll(model, batch, len(tokenizer))
    scores = torch.arange(L, dtype=torch.float).expand(2, L)
    groups = sft_go.top_eta_groups(scores, batch.target_mask, 0.3)
    assert ((groups >= 0) == batch.target_mask).all()
    loss, _ = sft_go.worst_group_loss(losses, groups, batch.target_mask, 0.9)
    loss.backward()
    grad = kept["logits"].grad.abs().sum(-1)                # (B, L + 1): the logits that predict each target
    assert ((grad[:, :-1] > 0) == batch.target_mask).all()  # only response tokens (and their EOS) are trained
    assert (grad[:, -1] == 0).all()
    assert grad.shape[1] == L + 1                           # no prompt position was even scored


# ---------------------------------------------------------------------------------------------- data and guards

def test_rows_from_alpaca_and_prompt_response_records():
    alpaca = sft_go.as_sft_row({"instruction": "Add.", "input": "", "output": "5"})
    assert alpaca["prompt"] == "### Instruction:\nAdd.\n\n### Response:\n" and alpaca["response"] == "5"
    assert sft_go.as_sft_row({"question": "q", "answer": "a"})["prompt"] == "q"
    assert sft_go.as_sft_row({"prompt": "q", "text": "a"}) is None


def test_countdown_answers_are_tokenised_like_uft_and_offsets_cover_the_text(tokenizer):
    rows = [sft_go.as_sft_row(r) for r in tasks.generate_countdown(3, seed=0)]
    enc = sft_go.encode_rows(tokenizer, rows, 256, 256)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    for row, ids, offsets in zip(rows, enc.responses, enc.offsets):
        assert ids == tasks.answer_token_ids(row, encode) + [tokenizer.eos_token_id]
        assert "".join(row["response"][a:b] for a, b in offsets) == row["response"]   # contiguous spans
        assert [tokenizer.decode([i]) for i in ids[:-1]] == [row["response"][a:b] for a, b in offsets[:-1]]
        assert offsets[-1] == (len(row["response"]),) * 2                            # EOS: an empty span
    # a response that does not start with its hint fragments is tokenised whole
    row = {"prompt": "q", "response": "12 + 7 = 19", "hint": ["7 + 12"]}
    assert sft_go.encode_rows(tokenizer, [row], 64, 64).responses[0] == encode("12 + 7 = 19") + [
        tokenizer.eos_token_id]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_lima_conversations_train_on_every_assistant_turn(tmp_path, suffix):
    records = [{"conversations": ["What is 2 + 3?", "5."], "source": "a"},
               {"conversations": ["Name a prime.", "7.", "Another?", "11."], "source": "b"}]
    path = tmp_path / f"lima{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        import datasets
        datasets.Dataset.from_list(records).to_parquet(str(path))
    rows = sft_go.load_sft_rows(str(path))
    assert [r["response"] for r in rows] == ["5.", "7.", "11."]
    assert rows[0]["prompt"] == "### User:\nWhat is 2 + 3?\n\n### Assistant:\n"
    # the second turn's prompt holds the whole first exchange, the assistant's answer included
    assert rows[2]["prompt"] == ("### User:\nName a prime.\n\n### Assistant:\n7.\n\n"
                                 "### User:\nAnother?\n\n### Assistant:\n")
    assert rows[2]["source"] == "b"


@pytest.mark.parametrize("turns", [["only a question"], ["q", "a", "q2"], ["q", ""], "q a", ["q", 5]])
def test_a_malformed_conversation_names_its_row(tmp_path, turns):
    path = tmp_path / "lima.jsonl"
    path.write_text(json.dumps({"conversations": ["q", "a"]}) + "\n" + json.dumps({"conversations": turns}))
    # a string, or a number among strings, changes the column's type: `datasets` names that row (from 0)
    named = (r"row 1 \(counting from 0\): field 'conversations" if turns in ("q a", ["q", 5])
             else r"row 2: 'conversations' must be")
    with pytest.raises(uft.UserError, match=rf"lima\.jsonl: {named}"):
        sft_go.load_sft_rows(str(path))


def test_a_file_without_responses_names_the_file_and_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "text": "there"}) + "\n")
    with pytest.raises(uft.UserError, match=r"bad\.jsonl.*columns found: prompt, text"):
        sft_go.load_sft_rows(str(path))


@pytest.mark.parametrize("flags, message", [(["--eta", "0"], "--eta"), (["--eta", "1"], "--eta"),
                                            (["--lam", "1.5"], "--lam"), (["--lam", "-0.1"], "--lam"),
                                            (["--loss", "go,dpo"], "--loss"),
                                            (["--grouping", "classifier", "--loss", "go"], "--classifier"),
                                            (["--data", "kk", "--num_val", "8"], "--num_val")])
def test_bad_flags_fail_at_start_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft_go.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_tokenizer_without_offsets_is_refused():
    class SlowTokenizer:
        def __call__(self, text, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return {"input_ids": [1]}
    with pytest.raises(uft.UserError, match="no offsets mapping"):
        sft_go.check_offsets(SlowTokenizer(), "--classifier x")


# ---------------------------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A saved tiny Llama and a JSONL of prompt/response rows."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_llama(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"prompt": c[: c.index("=") + 2], "response": c[c.index("=") + 2:]} for c in CORPUS[::13]]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_flags(tiny, out, *extra):
    return ["--model", str(tiny / "model"), "--data", str(tiny / "data.jsonl"), "--num_train", "20",
            "--num_test", "4", "--T", "3", "--batch_size", "4", "--micro_batch_size", "2", "--eval_steps", "2",
            "--learning_rate", "1e-2", "--ref_steps", "2", "--cache_dir", str(tiny / "cache"), "--device", "cpu",
            "--output_dir", str(out), "--num_html_samples", "2", *extra]


def changed_parameters(before_dir, after_dir) -> int:
    before = uft.load_model(str(before_dir), device="cpu")[0].state_dict()
    after = uft.load_model(str(after_dir), device="cpu")[0].state_dict()
    return sum(not torch.equal(before[k], after[k]) for k in before)


VARIANTS = {"tfidf": ["--loss", "go"],
            "tfidf-word": ["--loss", "go", "--tfidf_unit", "word", "--go_reduce", "per_sample"],
            "excess": ["--loss", "go", "--grouping", "excess", "--lam_schedule", "cosine"],
            "random": ["--loss", "go", "--grouping", "random", "--go_mode", "dro"],
            "rho1": ["--loss", "rho1"],
            "classifier": ["--loss", "go", "--grouping", "classifier"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_few_steps_of_each_variant_train_and_write_the_run_folder(variant, tiny, classifier_dir, tmp_path):
    extra = VARIANTS[variant] + (["--classifier", str(classifier_dir)] if variant == "classifier" else [])
    out = tmp_path / variant
    assert sft_go.main(run_flags(tiny, out, *extra)) == 0
    assert changed_parameters(tiny / "model", out / "checkpoint") > 0
    metrics = uft.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics[1:]:
        assert math.isfinite(m["loss"]) and 0 < m["important_fraction"] < 1
        assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert {"ce", "loss_important", "loss_unimportant", "worst_group", "worst_switches", "lam"} <= m.keys()
    assert {"eval_ce", "eval_loss_important", "eval_loss_unimportant"} <= metrics[-1].keys()
    if variant == "rho1":
        assert metrics[1]["lam"] == 1.0
    if variant == "random":
        assert metrics[-1]["q_important"] != 0.5
    assert json.loads((out / "config.json").read_text())["loss"] == extra[1]
    assert (out / "losses.png").stat().st_size > 1000
    assert (out / "samples.html").read_text().count("class=imp") >= 2


def test_plain_and_go_runs_share_data_and_print_a_table(tiny, tmp_path, capsys):
    assert sft_go.main(run_flags(tiny, tmp_path, "--loss", "ce,go")) == 0
    table = (tmp_path / "summary.txt").read_text()
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["base", "ce", "go-tfidf"]
    ce, go = (uft.read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("ce", "go-tfidf"))
    assert ce[0]["eval_ce"] == go[0]["eval_ce"]                      # same start, same held-out rows
    assert ce[1]["ce"] == pytest.approx(go[1]["ce"])                 # same first batch, same weights
    assert ce[2]["ce"] != go[2]["ce"]                                # different losses, different updates
    assert "L_important" in capsys.readouterr().out


def test_a_reference_with_another_tokenizer_is_refused(tiny, tmp_path, capsys):
    other = uft.build_tokenizer(["completely different text " * 3] * 20, vocab_size=280)
    model = make_llama(other)
    model.save_pretrained(tmp_path / "ref")
    other.save_pretrained(tmp_path / "ref")
    flags = run_flags(tiny, tmp_path / "run", "--loss", "go", "--grouping", "excess", "--ref_model",
                      str(tmp_path / "ref"))
    assert sft_go.main(flags) == 2
    assert "cannot be aligned" in capsys.readouterr().err


def test_countdown_rows_are_scored_by_greedy_accuracy(tiny, tmp_path):
    flags = run_flags(tiny, tmp_path, "--loss", "go", "--max_completion_length", "4")
    flags[flags.index("--data") + 1] = "countdown"
    assert sft_go.main(flags) == 0
    last = uft.read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert 0 <= last["eval_accuracy"] <= 1 and "eval_format_rate" in last


def test_validation_problems_are_scored_apart_from_the_held_out_ones(tiny, tmp_path):
    flags = run_flags(tiny, tmp_path, "--loss", "go", "--max_completion_length", "4", "--num_val", "3")
    flags[flags.index("--data") + 1] = "countdown"
    args = sft_go.parse_args(flags)
    rows = sft_go.split_rows(*sft_go.load_rows(args))
    assert list(rows) == ["train", "test", "val"] and len(rows["val"]) == 3
    assert not {r["prompt"] for r in rows["val"]} & {r["prompt"] for r in rows["test"] + rows["train"]}
    assert sft_go.main(flags) == 0
    last = uft.read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert {"val_ce", "val_loss_important", "val_loss_unimportant", "val_accuracy"} <= last.keys()
    assert last["val_ce"] != last["eval_ce"]                          # other rows, other losses
    scored = uft.read_jsonl(tmp_path / "eval_rewards.jsonl")
    assert [(r["step"], r["split"], len(r["rewards"])) for r in scored] == [
        (0, "eval", 4), (0, "val", 3), (2, "eval", 4), (2, "val", 3), (3, "eval", 4), (3, "val", 3)]


def test_a_run_against_ce_ends_with_the_paired_change_on_the_same_problems(tiny, tmp_path, capsys):
    flags = run_flags(tiny, tmp_path, "--loss", "ce,go", "--max_completion_length", "4", "--num_val", "3")
    flags[flags.index("--data") + 1] = "countdown"
    assert sft_go.main(flags) == 0
    out = capsys.readouterr().out.strip().splitlines()
    held_out = out.index("go-tfidf vs ce, same seed and held-out problems: accuracy "
                         f"{uft.read_jsonl(tmp_path / 'ce' / 'metrics.jsonl')[-1]['eval_accuracy']:.3f} -> "
                         f"{uft.read_jsonl(tmp_path / 'go-tfidf' / 'metrics.jsonl')[-1]['eval_accuracy']:.3f}")
    assert re.fullmatch(r"change [+-]\d\.\d{3}, 95% interval [+-]\d\.\d{3} to [+-]\d\.\d{3} over 4 held-out "
                        r"problems \(\d gained, \d lost\): (an improvement|a drop|not distinguishable .*)",
                        out[held_out + 1])
    assert out[-2].startswith("go-tfidf vs ce, same seed and validation problems")
    assert " over 3 validation problems " in out[-1]


@pytest.mark.parametrize("before, after, verdict", [([0.0] * 20, [1.0] * 20, "an improvement"),
                                                    ([1.0] * 20, [0.1] * 20, "a drop"),
                                                    ([1.0, 0.0] * 10, [0.0, 1.0] * 10, "not distinguishable")])
def test_the_change_sentence_says_what_the_interval_allows(before, after, verdict):
    c = uft.paired_comparison(before, after)
    assert runs.change_sentence(c).split(": ")[-1].startswith(verdict)
    assert f"over {len(before)} held-out problems" in runs.change_sentence(c)


def test_uft_result_lines_keep_their_wording(capsys):
    """uft.py's last line is built from the same sentence; worked by hand: d = (1, 0, 1, -1), mean 0.25,
    sd = sqrt(2.75 / 3) = 0.957, half-width 1.96 * 0.957 / 2 = 0.938."""
    c = uft.paired_comparison([0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0])
    runs.print_result("uft", {"comparison": c, "base_accuracy": 0.5, "final_accuracy": 0.75, "steps": 3,
                              "output_dir": "out"}, minutes=1.0)
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "uft: held-out accuracy 0.500 (base) -> 0.750 after 3 steps, 1.0 min. Run folder: out",
        "change +0.250, 95% interval -0.688 to +1.188 over 4 held-out problems (2 gained, 1 lost): not "
        "distinguishable from no change on this many problems"]


def test_cosine_learning_rate_decays_over_the_run(tiny, tmp_path):
    """The schedule advances once per step (micro-batches of 2 rows, batch 4) and reaches 0 at step T."""
    out = tmp_path / "lr"
    assert sft_go.main(run_flags(tiny, out, "--loss", "ce", "--lr_scheduler", "cosine", "--warmup_ratio", "0")) == 0
    lrs = [m["lr"] for m in uft.read_jsonl(out / "metrics.jsonl") if "lr" in m]
    T, peak = 3, 1e-2
    assert lrs == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * t / T)) for t in range(1, T + 1)])


def test_plot_losses_leaves_the_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend must survive a run: losses.png is drawn without pyplot."""
    import matplotlib
    before = matplotlib.get_backend()
    matplotlib.use("svg")       # any backend but Agg, which plotting used to force
    try:
        metrics = [{"step": t, "ce": 2.0 / (t + 1), "loss_important": 3.0 / (t + 1), "loss_unimportant": 1.0,
                    "eval_ce": 2.0, "eval_loss_important": 3.0, "eval_loss_unimportant": 1.0,
                    "eval_accuracy": 0.1 * t} for t in range(3)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        assert sft_go.plot_losses(tmp_path).stat().st_size > 1000
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
