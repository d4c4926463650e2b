"""The exported model behind transformers' own OpenAI-compatible server; spans come back as text and decode to masks.

No server patch and no remote code: ``samtok serve-openai`` registers the project's image-only
processor with ``AutoProcessor`` (torchvision cannot load beside the CPU build of torch, and
transformers' Qwen-VL processors need it for their video processor) and runs transformers' own
``serve`` command in-process; the mask words are ordinary tokens, which the server's
``skip_special_tokens=True`` decoding keeps.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samtok.core.errors import SamtokError
from samtok.mllm.generation import SamplingConfig
from samtok.mllm.openai_client import ServerPredictor, base_url, openai_messages, predict_via_server, request_body
from samtok.tokenizer.api import SAMTokenizer
from samtok.tokenizer.codec import MaskCodec

from cli_helpers import run_cli
from serve_helpers import ANSWER_CODES, ANSWER_LABEL, artefacts, free_port, random_image, server_process  # noqa: F401

H, W = 60, 90
IMAGE = random_image(H, W, 0)


# ------------------------------------------------------------------------------------------ pure parts
def test_server_urls_messages_and_request_bodies():
    assert base_url("http://localhost:8000/") == "http://localhost:8000"
    assert base_url("http://h:1/v1") == base_url("http://h:1/v1/chat/completions") == "http://h:1"
    with pytest.raises(SamtokError, match="http://"):
        base_url("localhost:8000")
    img = np.zeros((4, 6, 3), np.uint8)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe <|mt_start|>."},
            {"role": "assistant", "content": "A box."}, {"role": "user", "content": "And now?"}]
    msgs = openai_messages(conv, [img])
    assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[2]["content"] == "A box."
    first = msgs[1]["content"]
    assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first[1] == {"type": "text", "text": "Describe <|mt_start|>."} and msgs[3]["content"] == "And now?"
    placed = openai_messages([{"role": "user", "content": "A <image> then <image>."}], [img, img])
    assert [p["type"] for p in placed[0]["content"]] == ["text", "image_url", "text", "image_url", "text"]
    greedy = request_body(msgs, SamplingConfig(max_new_tokens=7), model="m")
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 7 and greedy["model"] == "m"
    sampled = request_body(msgs, SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9))
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and "model" not in sampled


def test_unreachable_server_is_a_clear_error(artefacts):
    tok = SAMTokenizer.from_pretrained(artefacts["tok"])
    port = free_port()  # nothing listens there
    with pytest.raises(SamtokError, match="cannot reach the server"):
        predict_via_server(f"http://127.0.0.1:{port}", IMAGE, "hi", tok, model="x", timeout=5)


def test_the_server_builds_the_image_only_processor_with_our_model_inputs(artefacts):
    """What `transformers serve`'s ModelManager builds after the launcher's registration equals our processor."""
    from transformers.cli.serving.model_manager import ModelManager

    from samtok.mllm.processor import QwenVLImageTextProcessor, load_processor
    from samtok.mllm.sequences import build_prompt_example
    from samtok.mllm.serving import register_image_only_processor

    exported = artefacts["exported"]
    # the export ships no code and names no processor class: nothing for trust_remote_code to load
    assert not list(exported.glob("*.py")) and not (exported / "processor_config.json").exists()
    assert "Qwen2_5_VLConfig" in register_image_only_processor()
    manager = ModelManager(device="cpu")  # trust_remote_code=False, as the launcher runs it
    served = manager._load_processor(ModelManager.process_model_name(str(exported)))
    assert isinstance(served, QwenVLImageTextProcessor)
    # what the server does with an OpenAI request (image first, then the text)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(IMAGE)},
                                             {"type": "text", "text": artefacts["prompt"]}]}]
    inputs = served.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    ours = build_prompt_example(load_processor(exported), [{"role": "user", "content": artefacts["prompt"]}], [IMAGE])
    assert torch.equal(inputs["input_ids"][0], ours["input_ids"])
    assert torch.equal(inputs["pixel_values"], ours["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], ours["image_grid_thw"])
    # the mask words are ordinary tokens: decoding with skip_special_tokens keeps them
    text = MaskCodec().format(*ANSWER_CODES)
    ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and served.decode(ids, skip_special_tokens=True) == text


def test_the_launcher_refuses_what_it_cannot_serve_without_remote_code(artefacts, tmp_path):
    import shutil

    from samtok.mllm.serving import check_servable, serve_command

    assert check_servable(artefacts["exported"]) == "qwen2_5_vl"
    assert serve_command("m", "127.0.0.1", 8000, "cpu", ["--log-level", "info"]) == [
        "serve", "m", "--host", "127.0.0.1", "--port", "8000", "--device", "cpu", "--log-level", "info"]
    named = tmp_path / "named"
    shutil.copytree(artefacts["exported"], named, ignore=shutil.ignore_patterns("*.safetensors", "mask_tokenizer"))
    cfg = json.loads((named / "preprocessor_config.json").read_text())
    (named / "preprocessor_config.json").write_text(json.dumps(dict(cfg, processor_class="Qwen2_5_VLProcessor")))
    with pytest.raises(SamtokError, match="names processor_class 'Qwen2_5_VLProcessor'"):
        check_servable(named)
    rc, _, err = run_cli(["serve-openai", str(named)])
    assert rc == 2 and "samtok export" in err
    rc, _, err = run_cli(["serve-openai", str(artefacts["exported"]), "--serve-args=--trust-remote-code"])
    assert rc == 2 and "not used here" in err
    rc, _, err = run_cli(["serve-openai", str(tmp_path / "nothing")])
    assert rc == 2 and "no config.json" in err


# ------------------------------------------------------------------------------------------ the real server
@pytest.fixture(scope="module")
def transformers_server(artefacts, tmp_path_factory):
    """`samtok serve-openai EXPORTED` (transformers' own server, image-only processor registered) as its own process."""
    port = free_port()
    log = tmp_path_factory.mktemp("transformers_serve") / "server.log"
    cmd = [str(Path(sys.executable).with_name("samtok")), "serve-openai", str(artefacts["exported"]), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port)]
    with server_process(cmd, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}"


def test_transformers_serve_returns_spans_that_decode_to_masks_of_the_image_size(transformers_server, artefacts):
    tok = SAMTokenizer.from_pretrained(artefacts["exported"] / "mask_tokenizer")
    pred = predict_via_server(transformers_server, IMAGE, artefacts["prompt"], tok, timeout=120)
    assert pred.text == artefacts["answer"]  # the mask words came back verbatim as text
    assert pred.codes == [ANSWER_CODES] and pred.labels == [ANSWER_LABEL] and pred.finished
    assert pred.masks.shape == (1, H, W) and pred.masks.dtype == torch.bool
    assert torch.equal(pred.masks, tok.decode(IMAGE, [ANSWER_CODES]))
    # another image size, through a prompt mask and the predictor's batch path (two requests in flight)
    other = random_image(96, 64, 1)
    region = np.zeros((96, 64), bool)
    region[10:60, 5:40] = True
    predictor = ServerPredictor(transformers_server, tok, timeout=120, parallel=2)
    preds = predictor.predict([other, IMAGE], [artefacts["prompt"], "What is <mask>?"],
                              SamplingConfig(max_new_tokens=6), prompt_masks=[None, [(3, 7)]])
    assert preds[0].image_size == (96, 64) and preds[0].masks.shape[1:] == (96, 64)
    assert preds[1].num_tokens <= 6


def test_samtok_chat_with_server_prints_the_decoded_masks(transformers_server, artefacts, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(IMAGE).save(image)
    overlay = tmp_path / "overlay.png"
    rc, out, err = run_cli(["chat", artefacts["prompt"], "--server", transformers_server,
                            "--tokenizer", str(artefacts["exported"] / "mask_tokenizer"), "--image", str(image),
                            "--out", str(overlay), "--save-masks", str(tmp_path / "masks")])
    assert rc == 0, err
    assert f"[mask 0] '{ANSWER_LABEL}'" in out and f"codes {ANSWER_CODES[0]} {ANSWER_CODES[1]}" in out
    assert Image.open(overlay).size == (W, H) and Image.open(tmp_path / "masks" / "mask_0.png").size == (W, H)
    rc, _, err = run_cli(["chat", "hi", "--tokenizer", str(artefacts["tok"]), "--image", str(image)])
    assert rc == 2 and "--server URL" in err
