"""The web demo (Gradio) over real HTTP: the page's events called through ``gradio_client``.

The app runs in this process on a free localhost port (``samtok.serve.app.launch``, as ``samtok
serve`` starts it); every call goes over HTTP exactly as the page's own calls do (files uploaded,
outputs downloaded), so what is checked here is what the page receives: values equal to the
tokenizer's own encode/decode, repair notes, the chat answer and a second round with a painted
region, each bad input's message, a model without mask words, an internal error, ten concurrent
requests. The page itself in a browser: tests/test_serve_browser.py.
"""

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samtok.core.masks import mask_iou
from samtok.serve.service import DemoConfig, DemoService, fitted_size
from samtok.tokenizer.codec import MaskCodec

from serve_helpers import ANSWER_CODES, ANSWER_LABEL, artefacts, free_port, random_image, tok  # noqa: F401

gradio_client = pytest.importorskip("gradio_client", reason="the serve extra is not installed (make install)")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

CODEC = MaskCodec()
H, W = 60, 90
IMAGE = random_image(H, W, 0)  # one of the images the tiny model memorised its answer on
MAX_SIDE = 400


def rect(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


class Uploads:
    """Files as a person would upload them, written once under a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self.image = self.png("scene.png", IMAGE)
        self.count = 0

    def png(self, name: str, array: np.ndarray) -> Path:
        path = self.root / name
        Image.fromarray(array).save(path)
        return path

    def layer(self, mask: np.ndarray) -> Path:
        """A painted layer as the image editor sends it: RGBA, painted pixels opaque, the rest transparent."""
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[mask] = (255, 30, 90, 255)
        self.count += 1
        return self.png(f"layer_{self.count}.png", rgba)

    def editor(self, mask=None, image=None) -> dict:
        """The image editor's value: the image and, optionally, one painted layer."""
        layers = [] if mask is None else [handle_file(self.layer(mask))]
        return {"background": handle_file(image or self.image), "layers": layers, "composite": None, "id": None}


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    return Uploads(tmp_path_factory.mktemp("uploads"))


def serve(service: DemoService):
    """The app over ``service`` on a free localhost port: ``(url, app)``."""
    from samtok.serve.app import launch

    port = free_port()
    return f"http://127.0.0.1:{port}/", launch(service, port=port)


@pytest.fixture(scope="module")
def demo(artefacts):
    service = DemoService(DemoConfig(tokenizer_dir=str(artefacts["tok"]), model_dir=str(artefacts["model"]),
                                     max_image_side=MAX_SIDE, max_upload_mb=2)).start(wait_for_model=True)
    url, app = serve(service)
    yield url
    app.close()


def client(url: str, tmp_path: Path) -> Client:
    """A new visitor of the page (its own session, so its own conversation); outputs downloaded under ``tmp_path``."""
    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def annotations(output: dict) -> list[tuple[str, np.ndarray]]:
    """``(label, bool mask)`` of a ``gr.AnnotatedImage`` output (each mask's alpha is 255 inside, 0 outside)."""
    value = output.get("value", output)
    return [(a["label"], np.asarray(Image.open(a["image"]).convert("RGBA"))[..., 3] > 0) for a in value["annotations"]]


def upload_status(url: str, path: Path) -> tuple[int, str]:
    """POST ``path`` to Gradio's upload route as the page does: ``(HTTP status, body)``."""
    import urllib.error

    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + path.name.encode()
            + b"\"\r\nContent-Type: image/png\r\n\r\n" + path.read_bytes() + b"\r\n--b--\r\n")
    req = urllib.request.Request(url + "gradio_api/upload", data=body,
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def error_of(call) -> str:
    with pytest.raises(AppError) as info:
        call()
    return str(info.value)


# ------------------------------------------------------------------------------------------ values
def test_page_has_three_tabs_the_api_and_no_analytics(demo):
    with urllib.request.urlopen(demo) as r:
        assert r.status == 200
    with urllib.request.urlopen(demo + "config") as r:
        config = json.loads(r.read())
    assert config["analytics_enabled"] is False
    tabs = [c["props"]["label"] for c in config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Tokenize", "Detokenize", "Chat"]
    status = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "status")
    assert "2 x 256" in status and "ready" in status


def test_tokenize_gives_the_tokenizers_codes_span_and_reconstruction_iou(demo, uploads, tok, tmp_path):
    mask = rect(10, 45, 20, 70)
    span, codes_text, iou, yours, decoded_view, notes = client(demo, tmp_path).predict(
        uploads.editor(mask), None, api_name="/tokenize")
    codes = tok.encode(IMAGE, [mask])
    decoded = tok.decode(IMAGE, codes)[0].numpy()
    assert span == tok.spans(codes)[0] and codes_text == f"{codes[0, 0]} {codes[0, 1]}"
    assert 0 < decoded.sum() < H * W and iou == pytest.approx(mask_iou(decoded, mask), abs=1e-4)
    [(label, shown)] = annotations(yours)
    assert label == "your mask" and np.array_equal(shown, mask)
    [(label, shown)] = annotations(decoded_view)
    assert label == "decoded from the two words" and np.array_equal(shown, decoded)
    assert f"your mask **{int(mask.sum())}** px" in notes and "⚠" not in notes


def test_mask_file_is_binarised_with_the_cli_rules_and_resized_to_the_image(demo, uploads, tok, tmp_path):
    c = client(demo, tmp_path)
    mask = rect(5, 30, 10, 50)
    zero_one = uploads.png("zero_one.png", mask.astype(np.uint8))  # a 0/1 mask, as some tools write them
    span, *_, yours, _, notes = c.predict(uploads.editor(rect(40, 50, 0, 10)), handle_file(zero_one),
                                          api_name="/tokenize")
    assert np.array_equal(annotations(yours)[0][1], mask) and span == tok.spans(tok.encode(IMAGE, [mask]))[0]
    assert "the painting was ignored" in notes
    half = uploads.png("half.png", mask[::2, ::2].astype(np.uint8) * 255)  # same shape, half the size
    *_, yours, _, notes = c.predict(uploads.editor(), handle_file(half), api_name="/tokenize")
    assert annotations(yours)[0][1].shape == (H, W) and "(45x30) was resized to the image's 90x60" in notes


def test_detokenize_decodes_spans_and_repairs_malformed_ones(demo, uploads, tok, tmp_path):
    text = ("a " + CODEC.format(17, 45) + " b <|mt_start|><|mt_0003|><|mt_0600|><|mt_end|>"  # c1 out of range
            + " <|mt_start|><|mt_0300|><|mt_0301|><|mt_end|>"  # c0 out of range: skipped
            + " <|mt_start|><|mt_0009|><|mt_0260|>")  # missing end: repaired
    overlay, table, notes = client(demo, tmp_path).predict(handle_file(uploads.image), text, api_name="/detokenize")
    expected = tok.decode(IMAGE, torch.tensor([[17, 45], [3, -1], [9, 4]])).numpy()
    assert [row[1] for row in table["data"]] == ["17 45", "3 -1", "9 4"]
    assert [row[2] for row in table["data"]] == [int(m.sum()) for m in expected]
    shown = annotations(overlay)
    assert [label for label, _ in shown] == ["mask 0", "mask 1", "mask 2"]
    assert all(np.array_equal(s, e) for (_, s), e in zip(shown, expected))
    assert "first code alone" in notes and "skipped" in notes and "repaired" in notes


def test_chat_answer_spans_are_drawn_and_a_painted_region_goes_into_the_next_turn(demo, uploads, artefacts, tok, tmp_path):
    c = client(demo, tmp_path)
    dialogue, overlay, raw, table, notes = c.predict(uploads.editor(), artefacts["prompt"], 64, api_name="/chat")
    assert raw == artefacts["answer"]
    assert table["data"] == [[0, ANSWER_LABEL, f"{ANSWER_CODES[0]} {ANSWER_CODES[1]}",
                              int(tok.decode(IMAGE, [ANSWER_CODES])[0].sum()),
                              round(100 * int(tok.decode(IMAGE, [ANSWER_CODES])[0].sum()) / (H * W), 2)]]
    [(label, shown)] = annotations(overlay)
    assert label == f"[mask 0] {ANSWER_LABEL}" and np.array_equal(shown, tok.decode(IMAGE, [ANSWER_CODES])[0].numpy())
    assert [m["role"] for m in dialogue] == ["user", "assistant"] and "turn 1" in notes
    # second round, same visitor: a region painted on the image goes into the prompt at <mask>
    region = rect(20, 50, 30, 80)
    dialogue, overlay, raw, table, notes = c.predict(uploads.editor(region), "What is <mask>?", 8, api_name="/chat")
    span = tok.spans(tok.encode(IMAGE, [region]))[0]
    assert len(dialogue) == 4 and span in dialogue[2]["content"][0]["text"] and "turn 2" in notes
    assert ("your region", True) in [(label, np.array_equal(m, region)) for label, m in annotations(overlay)]
    # the same region still painted and no <mask>: it is not sent again
    dialogue, overlay, *_, notes = c.predict(uploads.editor(region), "And now?", 4, api_name="/chat")
    assert dialogue[4]["content"][0]["text"] == "And now?" and "not added again" in notes and "turn 3" in notes
    assert "your region" not in [label for label, _ in annotations(overlay)]
    # a new visitor starts from scratch
    *_, notes = client(demo, tmp_path).predict(uploads.editor(), artefacts["prompt"], 8, api_name="/chat")
    assert "turn 1" in notes


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(demo, uploads, tmp_path):
    c = client(demo, tmp_path)
    image = handle_file(uploads.image)
    text_file = uploads.root / "notes.png"  # named like an image, holds text
    text_file.write_text("hello, I am not an image\n")
    noisy = uploads.png("noisy.png", np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8))
    cases = [
        (lambda: c.predict(uploads.editor(), handle_file(text_file), api_name="/tokenize"),
         "The mask file notes.png is not an image (a text file)"),
        (lambda: c.predict(image, "<|mt_start|><|mt_0001|><|mt_0300|><|mt_end|>", api_name="/detokenize"),
         None),  # a valid call between the bad ones
        (lambda: c.predict(handle_file(text_file), CODEC.format(1, 2), api_name="/detokenize"),
         "The image notes.png is not an image (a text file)"),
        (lambda: c.predict(uploads.editor(np.zeros((H, W), bool)), None, api_name="/tokenize"), "The mask is empty"),
        (lambda: c.predict(uploads.editor(), None, api_name="/tokenize"), "No mask: paint the region"),
        (lambda: c.predict(uploads.editor(rect(0, 30, 0, 30, 30, 30)), None, api_name="/tokenize"),
         "is 30x30 pixels but the image is 90x60"),
        (lambda: c.predict(uploads.editor(), handle_file(noisy), api_name="/tokenize"), "not a binary mask"),
        (lambda: c.predict(image, "no span here", api_name="/detokenize"), "No mask span found"),
        (lambda: c.predict(image, "<|mt_start|><|mt_0999|><|mt_end|>", api_name="/detokenize"), "valid first code"),
        (lambda: c.predict(uploads.editor(), "What is <mask>?", 8, api_name="/chat"), "no region is painted"),
        (lambda: c.predict(uploads.editor(), "   ", 8, api_name="/chat"), "The prompt is empty"),
    ]
    for call, fragment in cases:
        if fragment is None:
            call()
        else:
            message = error_of(call)
            assert fragment in message, (fragment, message)
    # Gradio's own checks, messages included: the slider's range and the upload limit (2 MB here), which the
    # client checks before sending and the server checks again
    assert "greater than maximum value 2048" in error_of(lambda: c.predict(uploads.editor(), "hi", 10**6,
                                                                           api_name="/chat"))
    big = uploads.root / "big.png"
    big.write_bytes(b"\0" * 3_000_000)
    with pytest.raises(ValueError, match="exceeds the maximum file size of 2097152 bytes"):
        c.predict(handle_file(big), "x", api_name="/detokenize")
    assert upload_status(demo, big) == (413, "File size exceeded maximum allowed size of 2097152 bytes.")
    # still serving
    span, *_ = c.predict(uploads.editor(rect(10, 45, 20, 70)), None, api_name="/tokenize")
    assert CODEC.parse(span).spans[0].valid


def test_full_mask_is_encoded_with_a_warning_and_huge_images_are_resized_with_a_note(demo, uploads, tmp_path):
    c = client(demo, tmp_path)
    *_, notes = c.predict(uploads.editor(np.ones((H, W), bool)), None, api_name="/tokenize")
    assert "covers the whole image" in notes
    big = np.zeros((1500, 2000, 3), np.uint8)
    big[:, :1000] = (200, 40, 40)
    mask = np.zeros((1500, 2000), bool)
    mask[300:1200, 200:900] = True
    *_, yours, _, notes = c.predict(uploads.editor(mask, image=uploads.png("huge.png", big)), None, api_name="/tokenize")
    [(_, shown)] = annotations(yours)
    assert shown.shape[::-1] == fitted_size(2000, 1500, MAX_SIDE) == (400, 300)
    assert "2000x1500" in notes and "resized to 400x300" in notes
    assert shown.sum() == pytest.approx(mask.sum() / 25, rel=0.02)  # the painting followed the image


def test_ten_concurrent_requests_are_all_answered(demo, uploads, artefacts, tok, tmp_path):
    c = client(demo, tmp_path)
    masks = [rect(5 + k, 40 + k, 10 + 3 * k, 60 + 3 * k) for k in range(4)]
    start = time.time()
    jobs = [c.submit(uploads.editor(m), None, api_name="/tokenize") for m in masks]
    jobs += [c.submit(handle_file(uploads.image), CODEC.format(k, k + 1), api_name="/detokenize") for k in range(3)]
    jobs += [client(demo, tmp_path / str(k)).submit(uploads.editor(), artefacts["prompt"], 64, api_name="/chat")
             for k in range(3)]
    results = [job.result(timeout=120) for job in jobs]
    elapsed = time.time() - start
    assert [r[0] for r in results[:4]] == [tok.spans(tok.encode(IMAGE, [m]))[0] for m in masks]
    assert [r[1]["data"][0][1] for r in results[4:7]] == [f"{k} {k + 1}" for k in range(3)]
    assert [r[2] for r in results[7:]] == [artefacts["answer"]] * 3
    assert elapsed < 60


# ------------------------------------------------------------------------------------------ what is loaded
def test_a_model_without_mask_words_and_an_internal_error_are_explained_and_the_server_goes_on(
        artefacts, tok, uploads, tmp_path):
    import shutil

    # a model directory whose tokenizer has no mask words (e.g. a plain Qwen-VL checkpoint)
    plain = tmp_path / "plain"
    shutil.copytree(artefacts["model"], plain)
    tj = json.loads((plain / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if not t["content"].startswith("<|mt_")]
    (plain / "tokenizer.json").write_text(json.dumps(tj))

    class Broken:  # a tokenizer whose image encoder fails: a bug, not bad input
        codec = tok.codec

        def image_features(self, images):
            raise RuntimeError("boom")

    service = DemoService(DemoConfig(tokenizer_dir=str(artefacts["tok"]), model_dir=str(plain)), tokenizer=Broken())
    service.start(wait_for_model=True)
    info = service.info()
    assert info["model_status"] == "error" and "no mask words" in info["model_error"]
    url, app = serve(service)
    try:
        c = client(url, tmp_path)
        assert "no mask words" in error_of(lambda: c.predict(uploads.editor(), "hi", 8, api_name="/chat"))
        message = error_of(lambda: c.predict(uploads.editor(rect(1, 20, 1, 20)), None, api_name="/tokenize"))
        assert "RuntimeError: boom" in message and "still running" in message
        assert "No mask span found" in error_of(lambda: c.predict(handle_file(uploads.image), "no span",
                                                                  api_name="/detokenize"))
    finally:
        app.close()
    none = DemoService(DemoConfig(tokenizer_dir=str(tmp_path / "nope"), model_dir=None)).start()
    assert "make train-tokenizer" in none.info()["tokenizer_error"] and none.info()["model_status"] == "none"
    with pytest.raises(Exception, match="make train-tokenizer"):
        none.tokenize(IMAGE, rect(1, 5, 1, 5))
    with pytest.raises(Exception, match="No model was given"):
        none.chat(IMAGE, "hi")
    release = tmp_path / "mask_tokenizer_256x2.pth"
    release.write_bytes(b"")
    assert "--from-official" in DemoService(DemoConfig(tokenizer_dir=str(release))).start().info()["tokenizer_error"]


def test_serve_defaults_pick_the_newest_embedded_model_and_its_tokenizer(tmp_path):
    from samtok.serve.cli import resolve_paths

    model, tok, notes = resolve_paths(None, None, False, root=tmp_path)
    assert model is None and tok == str(tmp_path / "runs/tokenizer/final") and "Chat is off" in notes[0]
    (tmp_path / "runs/sft/final").mkdir(parents=True)
    (tmp_path / "runs/sft/final/config.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/config.json").write_text("{}")
    (tmp_path / "runs/sft/final/samtok.json").write_text(json.dumps({"mask_tokenizer": str(tmp_path / "elsewhere")}))
    model, tok, notes = resolve_paths(None, None, False, root=tmp_path)
    assert model == str(tmp_path / "runs/sft/final") and tok == str(tmp_path / "elsewhere") and not notes
    (tmp_path / "runs/rl/final").mkdir(parents=True)
    (tmp_path / "runs/rl/final/config.json").write_text("{}")
    model, tok, notes = resolve_paths(None, "mine", False, root=tmp_path)
    assert model == str(tmp_path / "runs/rl/final") and tok == "mine"
    assert resolve_paths(None, None, True, root=tmp_path)[0] is None
