"""The README's screenshots of the demo: one per tab, taken in headless Chromium from a live server.

    python -m samtok.serve.screenshots --tokenizer runs/tokenizer/final --model runs/sft/final \\
        --synth runs/synth --out docs/images

Takes an image of the synthetic test split with its largest ground-truth mask (Tokenize, with the
mask file; then Detokenize of the span read back) and asks the model to describe a region painted
with the mouse, then to segment the object a referring expression of the image names (Chat, two
rounds). The server runs in this process (:func:`samtok.serve.app.launch`, as ``samtok serve``
starts it); the browser is driven with the same flows as the browser tests
(:mod:`samtok.serve.browser`).
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _example(synth: Path, index: int) -> dict:
    """Image path and size, its largest object's mask, the second object's box, a referring expression."""
    from samtok.core.masks import decode_segmentation

    inst = json.loads((synth / "instances_test.json").read_text())
    img = inst["images"][index]
    anns = sorted((a for a in inst["annotations"] if a["image_id"] == img["id"]), key=lambda a: -a["area"])
    if len(anns) < 2:
        raise SystemExit(f"image {img['file_name']} has fewer than two objects; pick another --index")
    mask = decode_segmentation(anns[0]["segmentation"], img["height"], img["width"])
    refs = pickle.loads((synth / "refs(synth)_test.p").read_bytes())
    sentence = next((r["sentences"][0]["sent"] for r in refs if r["image_id"] == img["id"]), "the largest object")
    x, y, w, h = anns[1]["bbox"]
    region = (x / img["width"], y / img["height"], (x + w) / img["width"], (y + h) / img["height"])
    return {"image": synth / img["file_name"], "size": (img["height"], img["width"]), "mask": mask,
            "sentence": sentence, "region": region}


def take(tokenizer: str, model: str, synth: Path, out: Path, index: int = 0, port: int = 7871,
         brush_size: int = 3) -> list[Path]:
    from samtok.serve import browser
    from samtok.serve.app import launch
    from samtok.serve.service import DemoConfig, DemoService

    ex = _example(synth, index)
    service = DemoService(DemoConfig(tokenizer_dir=tokenizer, model_dir=model)).start(wait_for_model=True)
    if service.predictor is None:
        raise SystemExit(service.model_error or service.tokenizer_error)
    app = launch(service, port=port, brush_size=brush_size)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with tempfile.TemporaryDirectory() as tmp, browser.chromium_page(1280, 1000) as page:
            mask_file = Path(tmp) / "mask.png"
            Image.fromarray(ex["mask"].astype(np.uint8) * 255).save(mask_file)
            browser.open_demo(page, f"http://127.0.0.1:{port}/")

            def shot(name: str) -> None:
                page.evaluate("() => window.scrollTo(0, 0)")
                written.append(out / name)
                page.screenshot(path=str(written[-1]))
                # 256-colour palette: a fraction of the size, no visible difference for a page of flat colours
                img = Image.open(written[-1]).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
                img.save(written[-1], optimize=True)

            tok = browser.tokenize_flow(page, ex["image"], mask_file=mask_file)
            print(f"tokenize: {tok}")
            shot("serve_tokenize.png")
            page.click("#tok-send")
            page.wait_for_function("() => document.querySelector('#det-image img')")
            det = browser.detokenize_flow(page, tok["span"])
            print(f"detokenize: {det['rows']}")
            shot("serve_detokenize.png")
            first = browser.chat_flow(page, "Give a detailed description of this region <mask>.", image=ex["image"],
                                      image_size=ex["size"], region=ex["region"], step_px=brush_size)
            print(f"chat 1: {first.get('user_turn')!r} -> {first.get('answer')!r} {first.get('error') or ''}")
            second = browser.chat_flow(page, f"Please segment {ex['sentence']} in this image.")
            print(f"chat 2: {second.get('answer')!r} {second.get('rows')} {second.get('error') or ''}")
            shot("serve_chat.png")
    finally:
        app.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="runs/tokenizer/final")
    parser.add_argument("--model", default="runs/sft/final")
    parser.add_argument("--synth", default="runs/synth", help="the synthetic data set (make synth)")
    parser.add_argument("--index", type=int, default=0, help="which test image")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--brush-size", type=int, default=3, help="brush radius in image pixels")
    args = parser.parse_args()
    for p in take(args.tokenizer, args.model, Path(args.synth), Path(args.out), args.index, args.port, args.brush_size):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
