"""The web demo in a real browser (headless Debian Chromium driven by Playwright), as a person uses it.

`samtok serve` runs as its own process (the real command); the Gradio page is driven through its
upload inputs, the mouse (painting with the brush) and its buttons, and the values are read back
from the page — texts, tables, and the masks of the annotated images as the browser fetches them.
Screenshots of every step are saved under the test's temporary folder. Skipped, with the reason,
only where Chromium or Playwright is missing (`make install` installs both).
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtok.core.masks import mask_iou
from samtok.serve import browser

from serve_helpers import ANSWER_CODES, ANSWER_LABEL, artefacts, free_port, random_image, server_process, tok  # noqa: F401

REASON = browser.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser tests skipped: {REASON}")

H, W = 60, 90
IMAGE = random_image(H, W, 0)  # one of the images the tiny model memorised its answer on
MAX_SIDE = 400
BRUSH = 6  # brush radius in image pixels (`samtok serve --brush-size`)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    Image.fromarray(IMAGE).save(d / "scene.png")
    mask = np.zeros((H, W), np.uint8)
    mask[10:45, 20:70] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(d / "empty_mask.png")
    (d / "notes.txt").write_text("this is not an image\n")
    (d / "notes.png").write_text("this is not an image either, whatever its name says\n")
    big = np.full((1500, 2000, 3), 90, np.uint8)
    big[200:1300, 300:1500] = (30, 160, 220)
    Image.fromarray(big).save(d / "huge.png")
    return {"image": d / "scene.png", "mask": d / "mask.png", "mask_array": mask > 0, "empty_mask": d / "empty_mask.png",
            "text": d / "notes.txt", "fake_png": d / "notes.png", "huge": d / "huge.png"}


@pytest.fixture(scope="module")
def demo(artefacts, tmp_path_factory):
    """`samtok serve --model …` as its own process; yields the address it printed."""
    port = free_port()
    folder = tmp_path_factory.mktemp("samtok_serve")
    log = folder / "serve.log"
    cmd = [str(Path(sys.executable).with_name("samtok")), "serve", "--model", str(artefacts["model"]), "--port",
           str(port), "--max-image-side", str(MAX_SIDE), "--threads", "1", "--brush-size", str(BRUSH)]
    url = f"http://127.0.0.1:{port}/"
    with server_process(cmd, url, log, timeout_s=90, env={"GRADIO_TEMP_DIR": str(folder / "gradio")}):
        line = f"samtok serve: open {url} in a browser"
        deadline = time.time() + 10  # printed right after the server starts answering
        while line not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert line in log.read_text()
        yield url


@pytest.fixture()
def page():
    external = []
    with browser.chromium_page(external=external) as p:
        yield p
    assert external == [], f"the page reached beyond the local server: {external}"


def test_tokenize_detokenize_and_chat_in_the_browser(demo, page, files, artefacts, tok, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    status = browser.open_demo(page, demo)
    assert "2 x 256" in status and str(artefacts["model"]) in status and "ready" in status

    # Tokenize: upload an image and a mask file, read the span back
    result = browser.tokenize_flow(page, files["image"], mask_file=files["mask"])
    page.screenshot(path=str(shots / "1_tokenize.png"), full_page=True)
    assert result["state"] == "done", result
    codes = tok.encode(IMAGE, [files["mask_array"]])
    assert result["span"] == tok.spans(codes)[0] and result["codes"] == codes[0].tolist()
    decoded = tok.decode(IMAGE, codes)[0].numpy()
    assert result["iou"] == pytest.approx(mask_iou(decoded, files["mask_array"]), abs=5e-4)
    [(label, shown)] = browser.annotations(page, "tok-decoded")
    assert label == "decoded from the two words" and np.array_equal(shown, decoded)

    # Detokenize that span: the button carries the span and the image over
    page.click("#tok-send")
    page.wait_for_function("() => document.querySelector('#det-image img')")
    assert page.input_value("#det-text textarea") == result["span"]
    det = browser.detokenize_flow(page, result["span"])
    page.screenshot(path=str(shots / "2_detokenize.png"), full_page=True)
    assert det["state"] == "done", det
    assert det["rows"] == [["0", f"{codes[0, 0]} {codes[0, 1]}", str(int(decoded.sum())),
                            f"{round(100 * decoded.sum() / decoded.size, 2):g}"]]
    [(label, shown)] = det["masks"]
    assert label == "mask 0" and np.array_equal(shown, decoded)

    # Chat: one turn, the answer's span drawn and listed with its label
    chat = browser.chat_flow(page, artefacts["prompt"], image=files["image"])
    page.screenshot(path=str(shots / "3_chat.png"), full_page=True)
    assert chat["state"] == "done", chat
    assert chat["raw"] == artefacts["answer"] and "[mask 0]" in chat["answer"]
    answer_mask = tok.decode(IMAGE, [ANSWER_CODES])[0].numpy()
    assert chat["rows"] == [["0", ANSWER_LABEL, f"{ANSWER_CODES[0]} {ANSWER_CODES[1]}", str(int(answer_mask.sum())),
                             f"{round(100 * answer_mask.sum() / answer_mask.size, 2):g}"]]
    [(label, shown)] = chat["masks"]
    assert label == f"[mask 0] {ANSWER_LABEL}" and np.array_equal(shown, answer_mask)

    # Second round: a region painted with the mouse goes into the prompt as its span
    box = (0.2, 0.15, 0.7, 0.8)
    second = browser.chat_flow(page, "What is <mask>?", image_size=(H, W), region=box, max_new_tokens=8)
    page.screenshot(path=str(shots / "4_chat_region.png"), full_page=True)
    assert second["state"] == "done", second
    region = dict(second["masks"])["your region"]  # the region as the server received it
    inside = np.zeros((H, W), bool)
    inside[int(box[1] * H) + 1:int(box[3] * H) - 1, int(box[0] * W) + 1:int(box[2] * W) - 1] = True
    assert region[inside].all() and mask_iou(region, inside) > 0.4  # the box, grown by the brush's radius
    assert second["user_turn"] == f"What is {tok.spans(tok.encode(IMAGE, [region]))[0]}?"
    assert len(second["messages"]) == 4 and "turn 2" in second["notes"]


def test_bad_input_shows_clear_messages_in_the_page(demo, page, files, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser.open_demo(page, demo)

    empty = browser.tokenize_flow(page, files["image"])  # nothing painted
    assert empty["state"] == "error" and "The mask is empty" in empty["error"]
    page.screenshot(path=str(shots / "empty_mask.png"), full_page=True)
    assert "Only image allowed" in browser.upload_error(page, "tok-mask-file", files["text"])
    browser.dismiss_errors(page)
    fake = browser.tokenize_flow(page, None, mask_file=files["fake_png"])  # the browser lets it through by its name
    assert fake["state"] == "error" and "notes.png is not an image (a text file)" in fake["error"]
    blank = browser.tokenize_flow(page, None, mask_file=files["empty_mask"])
    assert blank["state"] == "error" and "The mask file is empty" in blank["error"]
    browser.dismiss_errors(page)

    bad = browser.detokenize_flow(page, "hello <|mt_start|> world", image=files["huge"])
    assert bad["state"] == "error" and "No mask span found" in bad["error"]
    out_of_range = browser.detokenize_flow(page, "<|mt_start|><|mt_0400|><|mt_0300|><|mt_end|>")
    assert out_of_range["state"] == "error" and "valid first code" in out_of_range["error"]
    browser.dismiss_errors(page)
    repaired = browser.detokenize_flow(page, "<|mt_start|><|mt_0005|><|mt_0900|>")
    page.screenshot(path=str(shots / "huge_image_repaired_span.png"), full_page=True)
    assert repaired["state"] == "done", repaired
    assert "2000x1500" in repaired["notes"] and "resized to 400x300" in repaired["notes"]
    assert "repaired" in repaired["notes"] and "first code alone" in repaired["notes"]
    assert repaired["masks"][0][1].shape == (300, 400)

    no_region = browser.chat_flow(page, "What is <mask>?", image=files["image"])
    page.screenshot(path=str(shots / "no_region.png"), full_page=True)
    assert no_region["state"] == "error" and "no region is painted" in no_region["error"]
    assert "2 x 256" in browser.open_demo(page, demo)  # the server is still there
