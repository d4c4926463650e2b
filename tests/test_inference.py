"""SamtokPredictor: parsing + decoding of forced answers, labels, markers, <mask> prompts, loading, chat CLI."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from samtok.core.errors import SamtokError
from samtok.mllm.generation import SamplingConfig
from samtok.mllm.inference import (
    INVALID_MARKER,
    Completion,
    ImageCache,
    PromptMask,
    SamtokPredictor,
    answer_labels,
    readable,
)
from samtok.mllm.models import TinyModelConfig, build_tiny, save_model_and_processor
from samtok.tokenizer.api import SAMTokenizer
from samtok.tokenizer.checkpoints import save_tokenizer_dir
from samtok.tokenizer.codec import MaskCodec
from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
from samtok.tokenizer.sam2_parts import SAM2Config

from cli_helpers import run_cli

CODEC = MaskCodec()
MICRO = dict(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
             trunk_global_att_blocks=[3])
H, W = 60, 90  # not square, not the tokenizer's input size: masks must come back at this size


def span(c0, c1=-1):
    return CODEC.format(c0, c1)


def json_answer(items):
    return "```json\n[" + ",\n".join(json.dumps({"mask_2d": s, "label": lab}) for s, lab in items) + "]\n```"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer_dir(SAMTokModel(TokenizerModelConfig(sam2=SAM2Config(**MICRO))), out)
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny(TinyModelConfig(), corpus=["Please segment the chair.", "What is this region?", "No target."])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def rect(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


class Forced(SamtokPredictor):
    """The real predictor with generation replaced by given texts (one per prompt, in order)."""

    def __init__(self, *args, texts=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.texts = list(texts)
        self.seen = []

    def generate_texts(self, requests, sampling):
        self.seen.extend(requests)
        out, self.texts = self.texts[: len(requests)], self.texts[len(requests):]
        return [Completion(text=t) for t in out]


@pytest.fixture()
def forced(tiny, tokenizer_dir):
    model, proc = tiny
    return lambda texts, **kw: Forced(model, proc, SAMTokenizer.from_pretrained(tokenizer_dir), texts=texts, **kw)


# ------------------------------------------------------------------------------------------ pure parsing
def test_labels_from_json_gcg_phrases_and_broken_json():
    good = json_answer([(span(1, 2), "front black chair"), (span(3, 4), 'a "quoted" lamp')])
    spans = CODEC.parse(good).spans
    assert answer_labels(good, spans) == ["front black chair", 'a "quoted" lamp']
    gcg = (f"A <|object_ref_start|>man<|object_ref_end|>{span(5, 6)} walks "
           f"<|object_ref_start|>two dogs<|object_ref_end|> {span(7, 8)}{span(9, 10)} and a cat {span(11, 12)}.")
    assert answer_labels(gcg, CODEC.parse(gcg).spans) == ["man", "two dogs", None, None]
    # truncated JSON (cut by max_new_tokens), label before mask_2d, missing label
    broken = ('```json\n[{"mask_2d": "' + span(1, 2) + '", "label": "red car"},\n{"label": "tree", "mask_2d": "'
              + span(3, 4) + '"},\n{"mask_2d": "' + span(5, 6) + '", "lab')
    assert answer_labels(broken, CODEC.parse(broken).spans) == ["red car", "tree", None]


def test_readable_text_numbers_decoded_masks_and_marks_invalid_ones():
    text = f'[{{"mask_2d": "{span(1, 2)}"}}, {{"mask_2d": "<|mt_start|><|mt_0300|><|mt_end|>"}}, {{"mask_2d": "{span(3)}"}}]'
    spans = CODEC.parse(text).spans
    assert [s.valid for s in spans] == [True, False, True]
    out = readable(text, spans, {0: 0, 2: 1})
    assert out == f'[{{"mask_2d": "[mask 0]"}}, {{"mask_2d": "{INVALID_MARKER}"}}, {{"mask_2d": "[mask 1]"}}]'
    gcg = f"A <|object_ref_start|>man<|object_ref_end|>{span(5, 6)} runs."
    assert readable(gcg, CODEC.parse(gcg).spans, {0: 0}) == "A man [mask 0] runs."


# ------------------------------------------------------------------------------------------ predictor
def test_forced_answer_is_parsed_and_decoded_at_the_original_image_size(forced, tokenizer_dir, image_file):
    answer = json_answer([(span(10, 20), "left chair"), ("<|mt_start|><|mt_0400|><|mt_0300|><|mt_end|>", "bad"),
                          (span(30), "right chair")])
    pred, = forced([answer]).predict([str(image_file)], ["Please segment the chair."])
    assert pred.masks.shape == (2, H, W) and pred.masks.dtype == torch.bool
    assert pred.union_mask.shape == (H, W)
    assert pred.codes == [(10, 20), (30, -1)] and pred.span_index == [0, 2]
    assert pred.labels == ["left chair", "right chair"]
    assert pred.readable_text.count("[mask 0]") == 1 and "[mask 1]" in pred.readable_text
    assert INVALID_MARKER in pred.readable_text and "<|mt_" not in pred.readable_text
    assert any("skipped" in n for n in pred.notes) and any("first code alone" in n for n in pred.notes)
    assert len(pred.spans) == 3 and pred.image_size == (H, W) and len(pred.areas()) == 2
    # the decoded masks are exactly what the tokenizer decodes for these codes
    tok = SAMTokenizer.from_pretrained(tokenizer_dir)
    expected = tok.decode(np.asarray(Image.open(image_file)), torch.tensor([[10, 20], [30, -1]]))
    assert torch.equal(pred.masks, expected)


def test_no_target_and_malformed_generations_never_crash(forced, image_file):
    texts = [
        "No target.",
        "",
        "<|mt_start|>",
        "<|mt_end|><|mt_end|><|mt_0001|>",
        "<|mt_9999|><|mt_0001|><|mt_end|>",  # invalid first code, repaired missing start
        f"{span(1, 2)[:-len('<|mt_end|>')]} trailing text",  # missing end
        '```json\n[{"mask_2d": "<|mt_start|><|mt_0005|><|mt_0261|><|mt_0262|><|mt_end|>", "label": ',
        "\x00\ufffd<|object_ref_start|><|object_ref_end|>" * 20,
        "<|mt_start|>" * 50 + "<|mt_0003|>" * 50,
    ]
    preds = forced(texts, batch_size=4).predict([str(image_file)] * len(texts), ["x"] * len(texts))
    assert len(preds) == len(texts)
    for p in preds:
        assert p.masks.shape[1:] == (H, W) and p.masks.shape[0] == len(p.labels) == len(p.codes)
        assert p.union_mask.shape == (H, W)
    assert preds[0].no_target and preds[0].num_masks == 0 and not preds[0].union_mask.any()
    assert preds[4].num_masks == 0 and any("skipped" in n for n in preds[4].notes)
    assert preds[5].codes == [(1, 2)] and any("repaired" in n for n in preds[5].notes)
    assert preds[6].codes == [(5, 5)] and any("first two kept" in n for n in preds[6].notes)
    assert preds[8].codes == [(3, -1)]  # 49 empty spans ignored, one span of 50 codes, second code not depth-1
    assert any(n.startswith("49 stray") for n in preds[8].notes) and all(len(n) < 200 for n in preds[8].notes)


def test_max_masks_keeps_the_first_ones(forced, image_file):
    answer = json_answer([(span(k, k), f"o{k}") for k in range(5)])
    pred, = forced([answer], max_masks=2).predict([str(image_file)], ["x"])
    assert pred.codes == [(0, 0), (1, 1)] and pred.labels == ["o0", "o1"]
    assert any("max_masks" in n for n in pred.notes)


def test_mask_placeholders_become_the_tokenizers_spans(forced, tokenizer_dir, image_file):
    tok_pred = forced(["ok"] * 3)
    rgb = np.asarray(Image.open(image_file))
    m = rect(10, 40, 20, 70)
    crop = np.asarray(Image.fromarray(rgb).crop((0, 0, 45, 30)))
    crop_mask = rect(5, 20, 5, 30, 30, 45)
    prompts = ["What is <mask> next to <mask>?",
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe <mask>."},
                {"role": "assistant", "content": "A box."}, {"role": "user", "content": "And <mask>?"}],
               "Zoom: <mask>"]
    tok_pred.predict([str(image_file), rgb, [str(image_file), crop]], prompts,
                     prompt_masks=[[m, (3, 7)], [span(9, 8), m], [PromptMask(crop_mask, image_index=1)]])
    tok = SAMTokenizer.from_pretrained(tokenizer_dir)
    c = tok.encode(rgb, [m])[0].tolist()
    c_crop = tok.encode(crop, [crop_mask])[0].tolist()
    first, second, third = tok_pred.seen
    assert first.conversation[0]["content"] == f"What is {span(*c)} next to {span(3, 7)}?"
    assert second.conversation[1]["content"] == f"Describe {span(9, 8)}."
    assert second.conversation[3]["content"] == f"And {span(*c)}?"
    assert third.conversation[0]["content"] == f"Zoom: {span(*c_crop)}"
    with pytest.raises(SamtokError, match="placeholder"):
        forced(["x"]).predict([str(image_file)], ["What is <mask>?"], prompt_masks=[[m, m]])
    with pytest.raises(SamtokError, match="placeholder"):
        forced(["x"]).predict([str(image_file)], ["What is <mask>?"])


def test_image_features_are_computed_once_per_distinct_image(forced, image_file):
    pred = forced([span(1, 2), span(3, 4), "No target."])
    calls = []
    original = pred.tokenizer.image_features

    def counting(images):
        calls.append(len(images))
        return original(images)

    pred.tokenizer.image_features = counting
    other = np.zeros((20, 30, 3), np.uint8)
    m = rect(2, 8, 2, 9)
    out = pred.predict([str(image_file), str(image_file), other], ["<mask>?", "<mask>!", "x"],
                       prompt_masks=[[m], [m], None])
    assert sum(calls) == 2  # two distinct images: one encoder pass each, shared by encoding and decoding
    assert [p.image_size for p in out] == [(H, W), (H, W), (20, 30)]
    cache = ImageCache()
    pred.ensure_features([str(image_file)], cache)
    pred.decode_codes(str(image_file), [(1, 2)], cache)
    pred.encode_masks(str(image_file), [m], cache)
    assert sum(calls) == 3


# ------------------------------------------------------------------------------------------ real generate path
class ForcedModel(torch.nn.Module):
    """A stand-in for a Qwen-VL model whose ``generate`` emits given token ids (then the stop token)."""

    def __init__(self, ids, stop_id):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.ids, self.stop_id = list(ids), stop_id
        self.generation_config = SimpleNamespace(eos_token_id=[stop_id])
        self.calls = []

    def generate(self, input_ids, attention_mask=None, generation_config=None, **kwargs):
        self.calls.append({"input_ids": input_ids, "pixel_values": kwargs.get("pixel_values"),
                           "max_new_tokens": generation_config.max_new_tokens})
        new = torch.tensor([self.ids + [self.stop_id]] * input_ids.shape[0])
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1))


def test_forced_token_ids_go_through_tokenizer_decoding_and_parsing(tiny, tokenizer_dir, image_file):
    _, proc = tiny
    answer = json_answer([(span(7, 9), "the chair")])
    ids = proc.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.convert_tokens_to_ids("<|mt_0007|>") in ids  # mask words are single tokens
    model = ForcedModel(ids, proc.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    predictor = SamtokPredictor(model, proc, SAMTokenizer.from_pretrained(tokenizer_dir))
    out = predictor.predict([str(image_file), str(image_file)], ["Please segment the chair.", "Again <mask>."],
                            SamplingConfig(max_new_tokens=64), prompt_masks=[None, [(1, 2)]])
    assert [p.text for p in out] == [answer, answer]
    assert out[0].codes == [(7, 9)] and out[0].labels == ["the chair"] and out[0].masks.shape == (1, H, W)
    call = model.calls[0]
    assert call["max_new_tokens"] == 64 and call["pixel_values"] is not None
    assert call["input_ids"].shape[0] == 2


# ------------------------------------------------------------------------------------------ loading + chat
def hub_like(src: Path, dst: Path) -> Path:
    """Our saved model rewritten the way a hub snapshot (the released layout) stores its processor."""
    import shutil

    shutil.copytree(src, dst)
    template = (dst / "chat_template.jinja").read_text()
    (dst / "chat_template.jinja").unlink()
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    pre.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (dst / "preprocessor_config.json").write_text(json.dumps(pre))
    return dst


def test_from_pretrained_loads_our_layout_and_a_hub_snapshot(tiny, tokenizer_dir, image_file, tmp_path):
    model, proc = tiny
    ours = save_model_and_processor(model, proc, tmp_path / "ours")
    for path in (ours, hub_like(ours, tmp_path / "hub")):
        pred = SamtokPredictor.from_pretrained(path, tokenizer_dir, batch_size=2)
        greedy = pred.predict([str(image_file)] * 3, ["Please segment the chair."] * 3, SamplingConfig(max_new_tokens=5))
        assert len(greedy) == 3 and all(p.image_size == (H, W) for p in greedy)
        assert greedy[0].text == greedy[2].text  # greedy, same prompt, different batches
        torch.manual_seed(0)
        sampled = pred.predict([str(image_file)], ["What is this region?"],
                               SamplingConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9))
        assert sampled[0].num_tokens <= 5
    with pytest.raises(SamtokError, match="export --from-official"):
        fake = tmp_path / "mask_tokenizer_256x2.pth"
        fake.write_bytes(b"")
        SamtokPredictor.from_pretrained(ours, fake)




def test_chat_command_prints_the_answer_and_writes_overlay_and_masks(tiny, tokenizer_dir, image_file, tmp_path):
    from samtok.core.images import save_mask_png

    model, proc = tiny
    model_dir = save_model_and_processor(model, proc, tmp_path / "model")
    mask_file = save_mask_png(rect(10, 40, 20, 70), tmp_path / "m.png")
    overlay = tmp_path / "out" / "overlay.png"
    rc, out, err = run_cli(["chat", "What is <mask>?", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir),
                         "--image", str(image_file), "--mask", str(mask_file), "--out", str(overlay),
                         "--save-masks", str(tmp_path / "masks"), "--max-new-tokens", "4"])
    assert rc == 0, err
    assert "overlay written to" in out and Image.open(overlay).size == (W, H)
    rc, _, err = run_cli(["chat", "What is this?", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir),
                       "--image", str(image_file), "--mask", str(mask_file)])
    assert rc == 2 and "placeholder" in err


def test_chat_description_lists_masks_with_labels_and_areas(forced, image_file):
    from samtok.mllm.chat import describe_prediction, overlay_for

    pred, = forced([json_answer([(span(10, 20), "left chair"), (span(30, 40), "right chair")])]).predict(
        [str(image_file)], ["x"])
    text = describe_prediction(pred)
    lines = text.splitlines()
    assert lines[0] == pred.readable_text.splitlines()[0]
    for k, (label, area) in enumerate(zip(pred.labels, pred.areas())):
        assert any(line.startswith(f"[mask {k}] '{label}'  area {area} px") for line in lines)
    assert overlay_for(np.asarray(Image.open(image_file)), pred).size == (W, H)
