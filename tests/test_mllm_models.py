"""Tiny Qwen2.5-VL / Qwen3-VL: forward/backward/generate, loss parity, save/reload, generation helper."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samtok.mllm.generation import SamplingConfig, completion_logprobs, generate, repeat_examples
from samtok.mllm.loss import TokenAccuracy, causal_lm_loss, mask_token_accuracy, token_accuracy
from samtok.mllm.models import TinyModelConfig, build_tiny, load_model_and_processor, save_model_and_processor
from samtok.mllm.processor import load_processor
from samtok.mllm.sequences import (
    IGNORE_INDEX,
    build_prompt_example,
    build_training_example,
    generation_collator,
    model_inputs,
    training_collator,
)
from samtok.mllm.vocab import mask_token_ids
from samtok.tokenizer.codec import MaskCodec

CODEC = MaskCodec()
SPAN = CODEC.format(1, 44)
ANSWER = f'[{{"mask_2d": "{SPAN}", "label": "chair"}}]'


def img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def conversations():
    return [
        ([{"role": "user", "content": "<image>Please segment the chair."}, {"role": "assistant", "content": ANSWER}],
         [img(64, 80)]),
        ([{"role": "user", "content": "Describe <image> and <image>."}, {"role": "assistant", "content": "Two pictures."},
          {"role": "user", "content": f"And region {CODEC.format(5, 6)}?"}, {"role": "assistant", "content": SPAN}],
         [img(60, 60, 1), img(40, 90, 2)]),
    ]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny(request):
    torch.set_num_threads(1)
    corpus = [m["content"] for conv, _ in conversations() for m in conv]
    return build_tiny(TinyModelConfig(family=request.param), corpus=corpus)


def train_batch(proc):
    return training_collator(proc)([build_training_example(proc, c, i) for c, i in conversations()])


def test_tiny_model_shapes_and_vocabulary(tiny):
    model, proc = tiny
    tok = proc.tokenizer
    ids = mask_token_ids(tok)
    assert ids[0] == len(tok) - 514 and model.get_input_embeddings().weight.shape[0] >= len(tok)
    cfg = model.config
    text = cfg.get_text_config()
    assert sum(text.rope_parameters["mrope_section"]) == getattr(text, "head_dim", text.hidden_size // text.num_attention_heads) // 2
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == proc.image_token_id
    patch = 14 if cfg.model_type == "qwen2_5_vl" else 16
    assert cfg.vision_config.patch_size == proc.image_processor.patch_size == patch
    assert cfg.vision_config.spatial_merge_size == proc.image_processor.merge_size == 2
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_forward_backward_and_our_loss_equals_transformers_loss(tiny):
    model, proc = tiny
    batch = train_batch(proc)
    model.train()
    try:
        out = model(**model_inputs(batch))
        ours = causal_lm_loss(out.logits, batch["labels"])
        torch.testing.assert_close(ours, out.loss, atol=1e-6, rtol=1e-6)
        n_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) + 7
        theirs = model(**model_inputs(batch), num_items_in_batch=n_items).loss
        torch.testing.assert_close(causal_lm_loss(out.logits, batch["labels"], n_items), theirs, atol=1e-6, rtol=1e-6)
        # brute force: mean over labelled next tokens
        logits, labels = out.logits.detach().float(), batch["labels"]
        terms = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b in range(labels.shape[0])
                 for t in range(1, labels.shape[1]) if labels[b, t] != IGNORE_INDEX]
        torch.testing.assert_close(ours.detach(), torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
        ours.backward()
        visual = [p for n, p in model.named_parameters() if "visual" in n]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in visual)
        assert model.get_input_embeddings().weight.grad[mask_token_ids(proc.tokenizer)].abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_mask_token_accuracy_counts_only_mask_targets():
    vocab, ids = 10, [7, 8, 9]
    labels = torch.tensor([[IGNORE_INDEX, 7, 3, 8, 9, IGNORE_INDEX]])
    logits = torch.zeros(1, 6, vocab)
    for t, target in enumerate([7, 0, 8, 1, 5]):  # logits[t] predicts labels[t+1]
        logits[0, t, target] = 5.0
    acc = mask_token_accuracy(logits, labels, ids)
    assert (acc.correct, acc.total) == (2, 3) and acc.value == pytest.approx(2 / 3)
    assert token_accuracy(logits, labels).total == 4
    assert (acc + TokenAccuracy(1, 1)).value == pytest.approx(3 / 4)
    assert np.isnan(mask_token_accuracy(logits, torch.full_like(labels, IGNORE_INDEX), ids).value)


def test_save_reload_gives_identical_logits_with_plain_transformers(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model, proc = tiny
    save_model_and_processor(model, proc, tmp_path)
    batch = train_batch(proc)
    with torch.no_grad():
        ref = model(**model_inputs(batch, with_labels=False)).logits
        plain = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
        assert type(plain) is type(model)
        torch.testing.assert_close(plain(**model_inputs(batch, with_labels=False)).logits, ref, atol=0, rtol=0)
        loaded, proc2 = load_model_and_processor(tmp_path)
        batch2 = training_collator(proc2)([build_training_example(proc2, c, i) for c, i in conversations()])
        for key in ("input_ids", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
            assert torch.equal(batch2[key], batch[key]), key
        torch.testing.assert_close(loaded(**model_inputs(batch2, with_labels=False)).logits, ref, atol=0, rtol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.get_vocab() == proc.tokenizer.get_vocab() and mask_token_ids(tok) == mask_token_ids(proc.tokenizer)
    assert tok.chat_template == proc.chat_template


def test_load_processor_reads_a_hub_style_preprocessor_config(tiny, tmp_path):
    model, proc = tiny
    proc.tokenizer.save_pretrained(tmp_path)
    ip = proc.image_processor
    hub = {  # the keys a Qwen2.5-VL snapshot's preprocessor_config.json has
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": ip.patch_size, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub))
    loaded = load_processor(tmp_path, max_pixels=64 * (ip.patch_size * 2) ** 2)
    assert loaded.image_processor.size.shortest_edge == 3136
    assert loaded.image_processor.size.longest_edge == 64 * (ip.patch_size * 2) ** 2
    out = loaded(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img(500, 700)], return_tensors="pt")
    assert int(out["image_grid_thw"][0].prod()) // 4 <= 64


def test_generation_helper_returns_mask_tokens_intact_and_consistent_logprobs(tiny):
    model, proc = tiny
    conv, images = conversations()[0]
    example = build_training_example(proc, conv, images)
    batch = training_collator(proc)([example])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        for _ in range(150):  # overfit the single answer
            loss = model(**model_inputs(batch)).loss
            if loss.item() < 0.02:
                break
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        prompts = [build_prompt_example(proc, conv[:1], images),
                   build_prompt_example(proc, [{"role": "user", "content": "hi"}])]
        pbatch = generation_collator(proc)(prompts)
        result = generate(model, proc, pbatch, SamplingConfig(max_new_tokens=40), return_logprobs=True)
        assert result.texts[0] == ANSWER and result.finished[0]
        assert CODEC.parse_codes(result.texts[0]) == [(1, 44)]
        n = int(result.completion_mask[0].sum())
        assert result.completion_ids[0, n - 1] == proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert result.completion_ids.shape == result.completion_mask.shape == result.logprobs.shape
        assert (result.logprobs[result.completion_mask == 0] == 0).all()
        again = completion_logprobs(model, pbatch, result.completion_ids, result.completion_mask)
        torch.testing.assert_close(again, result.logprobs, atol=1e-4, rtol=1e-4)
        # sampled groups: repeated prompts, temperature-scaled log-probs
        group = generation_collator(proc)(repeat_examples(prompts[:1], 3))
        torch.manual_seed(0)
        cfg = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95)
        sampled = generate(model, proc, group, cfg, return_logprobs=True)
        assert len(sampled.texts) == 3 and sampled.completion_ids.shape[0] == 3
        again = completion_logprobs(model, group, sampled.completion_ids, sampled.completion_mask, temperature=1.5)
        torch.testing.assert_close(again, sampled.logprobs, atol=1e-4, rtol=1e-4)
    finally:
        model.load_state_dict(state)
        model.eval()


def test_batched_greedy_generation_equals_one_by_one(tiny):
    model, proc = tiny
    prompts = [build_prompt_example(proc, c[:1], i[: c[0]["content"].count("<image>")]) for c, i in conversations()]
    cfg = SamplingConfig(max_new_tokens=6)
    together = generate(model, proc, generation_collator(proc)(prompts), cfg)
    for k, p in enumerate(prompts):
        alone = generate(model, proc, generation_collator(proc)([p]), cfg)
        assert alone.texts[0] == together.texts[k]
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, proc, training_collator(proc)(prompts), cfg)


def test_configs_load_through_the_project_config_system():
    from samtok import mllm
    from samtok.core.config import ConfigError, load_config

    cfg = load_config(TinyModelConfig, None, ["family=qwen3_vl", "mrope_section=[2,3,3]", "max_pixels=4096"])
    assert cfg.family == "qwen3_vl" and cfg.resolved_mrope_section() == [2, 3, 3] and cfg.resolved_patch_size() == 16
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TinyModelConfig, None, ["hidden=3"])
    sampling = load_config(SamplingConfig, None, ["do_sample=true", "temperature=0.7", "stop_token_ids=[5]"])
    assert sampling.do_sample and sampling.stop_token_ids == [5]
    with pytest.raises(Exception, match="mrope_section"):
        TinyModelConfig(mrope_section=[1, 1, 1]).validate()
    assert mllm.build_tiny is build_tiny and "generate" in dir(mllm)


def test_decoding_keeps_mask_and_object_ref_tokens_and_cuts_at_the_stop_token(tiny):
    from samtok.mllm.generation import _trim, decode_completions, stop_ids_for

    model, proc = tiny
    tok = proc.tokenizer
    gcg = f"A <|object_ref_start|>red chair<|object_ref_end|>{SPAN} here."
    ids = tok(gcg, add_special_tokens=False)["input_ids"]
    stops = stop_ids_for(tok, model)
    assert tok.eos_token_id in stops and tok.pad_token_id in stops
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = torch.tensor([ids + [eos, 5, 6], ids[:5] + [9] * (len(ids) - 2)])  # finished / cut by max_new_tokens
    cut, mask, finished = _trim(rows, stops, pad)
    assert finished.tolist() == [True, False] and mask[0].sum() == len(ids) + 1 and mask[1].all()
    assert (cut[0, len(ids) + 1:] == pad).all()
    texts = decode_completions(tok, cut, mask, finished)
    assert texts[0] == gcg, "special <|object_ref_*|> and non-special mask tokens both kept, eos dropped"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_linear_patch_embedding_is_the_same_function(family):
    import copy

    from samtok.mllm.models import PatchLinearConv3d, TinyModelConfig, build_tiny, use_linear_patch_embedding

    model, _ = build_tiny(TinyModelConfig(family=family), corpus=["a b c"])
    embed = next(m for m in model.modules() if type(getattr(m, "proj", None)) is torch.nn.Conv3d)
    ref = copy.deepcopy(embed)
    assert use_linear_patch_embedding(model) >= 1
    assert isinstance(embed.proj, PatchLinearConv3d)
    assert set(dict(embed.named_parameters())) == set(dict(ref.named_parameters()))
    c, t, p = ref.proj.in_channels, ref.proj.kernel_size[0], ref.proj.kernel_size[1]
    x = torch.randn(37, c * t * p * p, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = embed(x), ref(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embed.proj.weight.grad, ref.proj.weight.grad, rtol=1e-4, atol=1e-4)


def test_fan_in_init_and_sincos_position_table():
    from samtok.core.errors import SamtokError

    cfg = TinyModelConfig(family="qwen3_vl", hidden_size=128, intermediate_size=256, vision_hidden_size=64,
                          vision_intermediate_size=128, weight_init="fan_in", vision_pos_init="sincos")
    model, _ = build_tiny(cfg, corpus=["a red star", "in the upper left"])
    lin = model.model.language_model.layers[0].mlp.down_proj  # fan-in 256: std 1/16, 4x transformers' 0.02
    assert lin.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    emb = model.get_input_embeddings().weight
    assert emb[:100].std().item() == pytest.approx(0.02, rel=0.15)  # embedding rows keep their init
    visual = model.model.visual
    table, g = visual.pos_embed.weight.detach(), int(visual.num_grid_per_side)
    assert table.abs().max().item() <= 1.0 + 1e-6
    d = table.shape[1]
    # first quarter: sin(row * omega_0) with omega_0 = pi / g; cell (r, c) sits at index r * g + c
    r, c = 3, 5
    assert table[r * g + c, 0].item() == pytest.approx(np.sin(r * np.pi / g), abs=1e-5)
    assert table[r * g + c, d // 2].item() == pytest.approx(np.sin(c * np.pi / g), abs=1e-5)
    assert len({tuple(row.tolist()) for row in table[: g * g].round(decimals=4)}) == g * g  # every cell distinct
    with pytest.raises(SamtokError, match="weight_init"):
        TinyModelConfig(weight_init="xavier").validate()
    with pytest.raises(SamtokError, match="qwen3_vl"):
        TinyModelConfig(family="qwen2_5_vl", vision_pos_init="sincos").validate()


def test_mask_span_grammar_masks_exactly_the_malformed_continuations(tiny):
    from samtok.mllm.generation import MaskSpanGrammar
    from samtok.mllm.vocab import mask_token_ids

    _, proc = tiny
    ids = mask_token_ids(proc.tokenizer)
    start, c0, c1, end = ids[0], ids[1:257], ids[257:513], ids[513]
    text = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    grammar = MaskSpanGrammar(proc.tokenizer)
    vocab = max(ids) + 1
    last = torch.tensor([[text], [start], [c0[5]], [c1[7]]])
    out = grammar(last, torch.zeros(4, vocab))
    allowed = torch.isfinite(out)
    assert allowed[0].sum() == vocab - 513 and allowed[0, start] and allowed[0, text] and not allowed[0, c0].any()
    assert not allowed[0, end]  # outside a span: no codes, no end, everything else
    assert allowed[1].nonzero().flatten().tolist() == c0
    assert allowed[2].nonzero().flatten().tolist() == c1
    assert allowed[3].nonzero().flatten().tolist() == [end]


def test_greedy_generation_with_the_span_grammar_writes_only_well_formed_spans(tiny):
    from samtok.mllm.vocab import mask_token_ids

    model, proc = tiny
    ids = mask_token_ids(proc.tokenizer)
    conv, images = conversations()[0]
    batch = dict(generation_collator(proc)([build_prompt_example(proc, conv[:1], images)]))
    # the answer so far is "<|mt_start|>": a random model goes on with anything; the grammar must give
    # one depth-0 code, one depth-1 code, <|mt_end|>, then no code word and no <|mt_end|> any more
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            value = ids[0] if key == "input_ids" else (1 if key == "attention_mask" else 0)
            batch[key] = torch.cat([batch[key], torch.full_like(batch[key][:, :1], value)], dim=1)
    plain = generate(model, proc, batch, SamplingConfig(max_new_tokens=10))
    constrained = generate(model, proc, batch, SamplingConfig(max_new_tokens=10, span_grammar=True))
    out = constrained.completion_ids[0][constrained.completion_mask[0].bool()].tolist()
    assert ids[1] <= out[0] < ids[257] and ids[257] <= out[1] < ids[513] and out[2] == ids[513], out
    assert not set(out[3:]) & set(ids[1:]), "no code word or <|mt_end|> outside a span"
    spans = CODEC.parse("<|mt_start|>" + constrained.texts[0]).spans
    assert len(spans) >= 1 and spans[0].valid
    assert plain.texts[0] != constrained.texts[0]
    with pytest.raises(ValueError, match="span_grammar"):
        generate(model, proc, batch, SamplingConfig(max_new_tokens=4, span_grammar=True), return_logprobs=True)
