"""Mask tokenizer throughput: encode and decode with the image embedding cached vs re-run per mask.

``SAMTokenizer.encode(image, masks)`` runs SAM 2's image encoder once per image and then encodes
every mask against the cached embedding; the release's scripts re-run the image encoder for every
mask. For 1, 4, 16 and 64 masks per image this measures masks/s both ways (and decode likewise),
the speed-up, and images/s of the cached path.

* CPU: the micro SAM 2 of the embedded default (Hiera embed 16, stages 1-1-2-1) at 128 px, fp32.
* GPU: Hiera-L at 1024 px (the release's size), random weights, bf16 autocast (the API's default on
  CUDA); also 8 images per call for images/s.

    python bench/tokenizer_throughput.py [--device cpu|cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchkit import (  # noqa: E402
    BenchResult,
    command_line,
    device_description,
    measure,
    random_image,
    random_masks,
    resolve_device,
    script_main,
)

NAME = "tokenizer_throughput"
TITLE = "Mask tokenizer: cached image embedding vs image encoder per mask"
COLUMNS = ["images/call", "masks/image", "encode cached masks/s", "encode per-mask masks/s", "encode speed-up",
           "decode cached masks/s", "decode per-mask masks/s", "decode speed-up", "images/s (cached encode)", "spread"]


def build_tokenizer(device: str, gpu_size: bool):
    from samtok.tokenizer.api import SAMTokenizer
    from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config

    torch.manual_seed(0)
    if gpu_size:
        sam2 = SAM2Config(size="l", image_size=1024)
    else:
        sam2 = SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                          trunk_global_att_blocks=[3])
    tok = SAMTokenizer(SAMTokModel(TokenizerModelConfig(sam2=sam2)), device=device)
    return tok, ("Hiera-L at 1024 px, random weights, bf16 autocast" if gpu_size else
                 "micro SAM 2 (Hiera embed 16, stages 1-1-2-1) at 128 px, random weights, fp32")


def run(device: str = "auto", quick: bool = False, repeats: int = 5, masks_per_image: Optional[Sequence[int]] = None,
        gpu_size: Optional[bool] = None, images_per_call: Optional[Sequence[int]] = None) -> BenchResult:
    device = resolve_device(device)
    gpu = device == "cuda" if gpu_size is None else gpu_size
    tok, what = build_tokenizer(device, gpu)
    counts = list(masks_per_image or ((1, 4) if quick else (1, 4, 16, 64)))
    per_call = list(images_per_call or ([1, 8] if device == "cuda" and not quick else [1]))
    h, w = (720, 960) if gpu else (160, 200)
    rows = []
    for n_images in per_call:
        images = [random_image(max(h, w), seed=k)[:h, :w] for k in range(n_images)]
        for m in counts:
            masks = [random_masks(m, h, w, seed=10 * k + m) for k in range(n_images)]
            codes = tok.encode_batch(images, masks)
            total = m * n_images

            def enc_cached():
                tok.encode_batch(images, masks)

            def enc_per_mask():  # the release: image encoder again for every mask
                for img, ms in zip(images, masks):
                    for i in range(m):
                        tok.encode(img, ms[i:i + 1])

            def dec_cached():
                tok.decode_batch(images, codes)

            def dec_per_mask():
                for img, cs in zip(images, codes):
                    for i in range(m):
                        tok.decode(img, cs[i:i + 1])

            fns = [("ec", enc_cached), ("dc", dec_cached)]
            if n_images == 1:  # per image the per-mask cost does not depend on the images per call
                fns += [("ep", enc_per_mask), ("dp", dec_per_mask)]
            t = {name: measure(fn, device, repeats=repeats) for name, fn in fns}
            per = {k: (total / t[k].median if k in t else float("nan")) for k in ("ep", "dp")}
            speed = {k: (f"{t[k].median / t[c].median:.1f}x" if k in t else "-") for k, c in (("ep", "ec"), ("dp", "dc"))}
            rows.append({
                "images/call": n_images, "masks/image": m,
                "encode cached masks/s": total / t["ec"].median, "encode per-mask masks/s": per["ep"],
                "encode speed-up": speed["ep"],
                "decode cached masks/s": total / t["dc"].median, "decode per-mask masks/s": per["dp"],
                "decode speed-up": speed["dp"],
                "images/s (cached encode)": n_images / t["ec"].median,
                "spread": f"{max(x.spread for x in t.values()):.2f}x",
            })
    notes = [f"Model: {what}; images {w}x{h} px with random rectangle/ellipse masks (speed does not depend on "
             "the weights being trained).",
             "cached = `SAMTokenizer.encode/decode(image, all masks)`: one image-encoder pass per image; per-mask = one "
             "`encode/decode(image, one mask)` call per mask, as the release's scripts do.",
             f"Median of {repeats} timed repeats after one warm-up; spread = slowest / fastest repeat (worst column)."]
    return BenchResult(NAME, TITLE, device, device_description(device), COLUMNS, rows, notes,
                       command=command_line(NAME, device, repeats))


def main(argv: Optional[Sequence[str]] = None) -> list[BenchResult]:
    return script_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
