"""Pre-tokenization throughput: masks/s of ``samtok.data.pretokenize`` on a small synthetic set.

A synthetic data set (``samtok.data.synth``) is generated once; its COCO-style instances are
tokenized by ``pretokenize`` (Lightning predict loop, one image-encoder pass per image, masks in
chunks, Arrow shards) into a fresh folder per repeat. Reported: the predict loop's masks/s (what
scales with data) and end-to-end masks/s (planning, Trainer start-up and table finalisation included).

* CPU: the micro SAM 2 at 128 px, 1 device.
* GPU: Hiera-L at 1024 px with random weights (the synthetic 128-px images are upscaled), 1 device.

    python bench/pretokenize_throughput.py [--device cpu|cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchkit import (  # noqa: E402
    BenchResult,
    command_line,
    Timing,
    device_description,
    resolve_device,
    script_main,
)

NAME = "pretokenize_throughput"
TITLE = "Pre-tokenization (samtok.data.pretokenize)"
COLUMNS = ["images", "masks", "batch (images)", "predict loop masks/s", "end-to-end masks/s", "seconds per run",
           "spread"]


def prepare(root: Path, num_images: int, gpu_size: bool) -> tuple[Path, Path]:
    from samtok.data.synth import SynthConfig, generate
    from samtok.tokenizer.api import SAMTokenizer
    from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config

    synth = root / "synth"
    generate(SynthConfig(out_dir=str(synth), num_images=num_images, seed=0, progress=False))
    torch.manual_seed(0)
    sam2 = (SAM2Config(size="l", image_size=1024) if gpu_size else
            SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                       trunk_global_att_blocks=[3]))
    tok = root / "tokenizer"
    SAMTokenizer(SAMTokModel(TokenizerModelConfig(sam2=sam2))).save_pretrained(tok)
    return synth / "instances_train.json", tok


def run(device: str = "auto", quick: bool = False, repeats: int = 5, num_images: Optional[int] = None,
        batch_size: int = 8) -> BenchResult:
    from samtok.data.pretokenize import PretokenizeConfig, pretokenize

    device = resolve_device(device)
    gpu = device == "cuda"
    n = num_images or (6 if quick else (64 if gpu else 96))
    root = Path(tempfile.mkdtemp(prefix="samtok-bench-pretok-"))
    try:
        data, tok = prepare(root, n, gpu)
        loop, total, masks, images = [], [], 0, 0
        for k in range(max(1, repeats) + 1):  # the first run is the warm-up
            out = root / f"out{k}"
            cfg = PretokenizeConfig(tokenizer=str(tok), data=str(data), out=str(out), source="synth",
                                    accelerator="gpu" if gpu else "cpu", devices="1", batch_size=batch_size,
                                    progress=False, overwrite=True)
            t0 = time.perf_counter()
            res = pretokenize(cfg)
            wall = time.perf_counter() - t0
            if k == 0:
                continue
            masks, images = res.encoded, res.images
            loop.append(res.loop_seconds or wall)
            total.append(wall)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t_loop, t_total = Timing(loop), Timing(total)
    row = {"images": images, "masks": masks, "batch (images)": batch_size,
           "predict loop masks/s": masks / t_loop.median, "end-to-end masks/s": masks / t_total.median,
           "seconds per run": t_total.median, "spread": f"{max(t_loop.spread, t_total.spread):.2f}x"}
    what = ("Hiera-L at 1024 px, random weights" if gpu else "micro SAM 2 at 128 px, random weights, fp32")
    notes = [f"Model: {what}; the synthetic set's train-split COCO instances (every mask of every image).",
             "predict loop = `PretokenizeResult.loop_seconds` (rank 0's loop, all masks); end-to-end = the whole "
             "`pretokenize()` call (plan, Trainer start, shards, finalize).",
             f"Median of {repeats} runs after one warm-up run; spread = slowest / fastest run."]
    return BenchResult(NAME, TITLE, device, device_description(device), COLUMNS, [row], notes,
                       command=command_line(NAME, device, repeats))


def main(argv: Optional[Sequence[str]] = None) -> list[BenchResult]:
    return script_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
