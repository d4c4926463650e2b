"""Conversations → Qwen-VL inputs: label masking, image-pad expansion, prompts, padding."""

import numpy as np
import pytest
import torch
from PIL import Image

from samtok.mllm.models import TinyModelConfig, build_tiny
from samtok.mllm.sequences import (
    IGNORE_INDEX,
    ConversationError,
    SequenceTooLongError,
    VLCollator,
    build_prompt_example,
    build_training_example,
    generation_collator,
    model_inputs,
    render_conversation,
    training_collator,
)
from samtok.tokenizer.codec import MaskCodec

SPAN_A = MaskCodec().format(1, 44)
SPAN_B = MaskCodec().format(200, 7)
CONV = [
    {"role": "system", "content": "You segment things."},
    {"role": "user", "content": "<image>\nPlease segment the chair."},
    {"role": "assistant", "content": f'```json\n[{{"mask_2d": "{SPAN_A}", "label": "chair"}}]\n```'},
    {"role": "user", "content": f"Is the region {SPAN_B} in <image> too?"},
    {"role": "assistant", "content": "No target."},
]


def images(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny(request):
    torch.set_num_threads(1)
    return build_tiny(TinyModelConfig(family=request.param), corpus=[m["content"] for m in CONV])


def reference_labels(input_ids, tok):
    """Independent token-level rule: after <|im_start|> 'assistant' '\\n', learn up to and incl. <|im_end|>."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    ids = input_ids.tolist()
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    while k < len(ids):
        if ids[k] == start and ids[k + 1: k + 1 + len(header)] == header:
            j = k + 1 + len(header)
            while ids[j] != end:
                labels[j] = ids[j]
                j += 1
            labels[j] = ids[j]
            k = j
        k += 1
    return torch.tensor(labels)


def test_labels_cover_only_assistant_content_and_im_end(tiny):
    model, proc = tiny
    tok = proc.tokenizer
    ex = build_training_example(proc, CONV, images((90, 120), (60, 60)))
    assert torch.equal(ex["labels"], reference_labels(ex["input_ids"], tok))
    learned = ex["input_ids"][ex["labels"] != IGNORE_INDEX]
    assert tok.decode(learned) == CONV[2]["content"] + "<|im_end|>" + "No target.<|im_end|>"
    # the user turn's mask span and the images are never learned
    span_b_ids = tok(SPAN_B, add_special_tokens=False)["input_ids"]
    ids = ex["input_ids"].tolist()
    at = next(i for i in range(len(ids)) if ids[i: i + 4] == span_b_ids)
    assert (ex["labels"][at: at + 4] == IGNORE_INDEX).all()
    assert (ex["labels"][ex["input_ids"] == proc.image_token_id] == IGNORE_INDEX).all()
    assert ex["attention_mask"].tolist() == [1] * len(ids)


def test_image_pad_count_is_grid_product_over_merge_squared_as_the_processor_inserts(tiny):
    model, proc = tiny
    imgs = images((90, 120), (60, 60), (33, 200))
    conv = [{"role": "user", "content": "<image> a <image> b <image> c"}, {"role": "assistant", "content": "ok"}]
    ex = build_training_example(proc, conv, imgs)
    merge = proc.image_processor.merge_size
    expected = [int(g.prod()) // merge**2 for g in ex["image_grid_thw"]]
    ids = ex["input_ids"]
    start, end = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>"), proc.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    starts = (ids == start).nonzero().flatten().tolist()
    ends = (ids == end).nonzero().flatten().tolist()
    runs = [int((ids[s + 1: e] == proc.image_token_id).sum()) for s, e in zip(starts, ends)]
    assert runs == expected == [e - s - 1 for s, e in zip(starts, ends)]
    assert int(ex["pixel_values"].shape[0]) == int(ex["image_grid_thw"].prod(dim=1).sum())
    assert ex["mm_token_type_ids"].sum() == sum(expected)
    # the processor called directly on the rendered text gives the very same tokens
    direct = proc(text=[render_conversation(proc, conv)], images=[Image.fromarray(i) for i in imgs], return_tensors="pt")
    assert torch.equal(direct["input_ids"][0], ids) and torch.equal(direct["pixel_values"], ex["pixel_values"])
    # independent arithmetic for the first image: smart-resize to multiples of patch·merge
    cell = proc.image_processor.patch_size * merge
    h, w = round(90 / cell) * cell, round(120 / cell) * cell
    assert expected[0] == (h // cell) * (w // cell)


def test_prompt_is_the_prefix_of_the_training_sequence(tiny):
    model, proc = tiny
    imgs = images((90, 120), (60, 60))
    full = build_training_example(proc, CONV, imgs)
    prompt = build_prompt_example(proc, CONV[:-1], imgs)
    n = prompt["input_ids"].shape[0]
    assert torch.equal(full["input_ids"][:n], prompt["input_ids"])
    assert full["labels"][n - 1] == IGNORE_INDEX and full["labels"][n] != IGNORE_INDEX
    assert proc.tokenizer.decode(prompt["input_ids"][-3:]).endswith("<|im_start|>assistant\n")
    assert "labels" not in prompt


def test_errors_are_clear(tiny):
    model, proc = tiny
    with pytest.raises(ConversationError, match="1 <image> placeholders but 0 images"):
        build_training_example(proc, CONV[:3], [])
    with pytest.raises(ConversationError, match="2 <image> placeholders but 1 images"):
        build_training_example(proc, CONV, images((60, 60)))
    with pytest.raises(ConversationError, match="assistant turn"):
        build_training_example(proc, CONV[:2], images((60, 60)))
    with pytest.raises(ConversationError, match="must not end with an assistant"):
        build_prompt_example(proc, CONV[:3], images((60, 60)))
    with pytest.raises(ConversationError, match="role"):
        build_prompt_example(proc, [{"role": "robot", "content": "hi"}])
    with pytest.raises(ConversationError, match="not in answers"):
        build_training_example(proc, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}],
                               images((60, 60)))
    with pytest.raises(SequenceTooLongError):
        build_training_example(proc, CONV[:3], images((60, 60)), max_length=10)


def test_collator_pads_right_for_training_and_left_for_generation(tiny):
    model, proc = tiny
    a = build_training_example(proc, CONV[:3], images((60, 60)))
    b = build_training_example(proc, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    pad = proc.tokenizer.pad_token_id
    batch = training_collator(proc, pad_to_multiple_of=8)([b, a])
    la, lb = a["input_ids"].shape[0], b["input_ids"].shape[0]
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= la
    assert torch.equal(batch["input_ids"][0, :lb], b["input_ids"]) and (batch["input_ids"][0, lb:] == pad).all()
    assert (batch["labels"][0, lb:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, lb:] == 0).all()
    assert torch.equal(batch["pixel_values"], a["pixel_values"]) and batch["image_grid_thw"].shape == (1, 3)
    left = generation_collator(proc)([build_prompt_example(proc, CONV[:2], images((60, 60))),
                                      build_prompt_example(proc, [{"role": "user", "content": "hi"}])])
    assert (left["attention_mask"][:, -1] == 1).all() and left["attention_mask"][1, 0] == 0
    assert (left["input_ids"][1][left["attention_mask"][1] == 0] == pad).all()
    meta = VLCollator(pad)([dict(b, meta="x"), dict(b, meta="y")])
    assert meta["meta"] == ["x", "y"] and "pixel_values" not in meta


def test_padding_does_not_change_the_logits_of_real_tokens(tiny):
    """Right padding (training) and left padding (generation) keep M-RoPE positions of every row."""
    model, proc = tiny
    long = build_training_example(proc, CONV, images((90, 120), (60, 60)))
    short = build_training_example(proc, CONV[1:3], images((64, 64)))
    with torch.no_grad():
        alone = model(**model_inputs(training_collator(proc)([short]), with_labels=False)).logits[0]
        right = model(**model_inputs(training_collator(proc)([long, short]), with_labels=False)).logits[1]
        n = short["input_ids"].shape[0]
        torch.testing.assert_close(right[:n], alone, atol=1e-5, rtol=1e-4)
        p_long = build_prompt_example(proc, CONV[:4], images((90, 120), (60, 60)))
        p_short = build_prompt_example(proc, CONV[1:2], images((64, 64)))
        alone = model(**model_inputs(generation_collator(proc)([p_short]), with_labels=False)).logits[0]
        left = model(**model_inputs(generation_collator(proc)([p_long, p_short]), with_labels=False)).logits[1]
        m = p_short["input_ids"].shape[0]
        torch.testing.assert_close(left[-m:], alone, atol=1e-5, rtol=1e-4)


def test_templates_that_are_not_prefix_stable_fall_back_to_scanning_turns(tiny):
    from samtok.mllm.processor import QwenVLImageTextProcessor

    model, proc = tiny
    odd = proc.chat_template + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    odd_proc = QwenVLImageTextProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer, chat_template=odd)
    ex = build_training_example(odd_proc, CONV, images((90, 120), (60, 60)))
    assert ex["input_ids"][-1] == proc.tokenizer.pad_token_id  # the odd template was used
    assert torch.equal(ex["labels"], reference_labels(ex["input_ids"], proc.tokenizer))


def test_images_without_placeholders_go_to_the_start_of_the_first_user_turn(tiny):
    model, proc = tiny
    plain = [{"role": "user", "content": "Please segment the chair."}, {"role": "assistant", "content": SPAN_A}]
    marked = [{"role": "user", "content": "<image>Please segment the chair."}, {"role": "assistant", "content": SPAN_A}]
    a = build_training_example(proc, plain, images((60, 60)))
    b = build_training_example(proc, marked, images((60, 60)))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert plain[0]["content"] == "Please segment the chair.", "the caller's conversation is not modified"
    p = build_prompt_example(proc, plain[:1], images((60, 60)))
    assert torch.equal(p["input_ids"], a["input_ids"][: p["input_ids"].shape[0]])
