"""Commands of the tokenizer: ``train-tokenizer``, ``encode``, ``decode`` (``export --from-official``
is reached through ``samtok export``, see :func:`export_official_command`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samtok.cli import add_config_arguments
from samtok.core.errors import SamtokError


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "train-tokenizer":
        add_config_arguments(parser, "configs/tokenizer/tiny.yaml")
    elif name == "encode":
        parser.add_argument("--tokenizer", required=True, help="tokenizer directory (config.json + model.safetensors)")
        parser.add_argument("--image", required=True, help="image file")
        parser.add_argument("--mask", required=True, nargs="+", help="binary mask image(s) (0/255 or 0/1), image-sized")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--codes", action="store_true", help="print 'c0 c1' instead of the span")
    elif name == "decode":
        parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
        parser.add_argument("--image", required=True, help="image file")
        parser.add_argument("--tokens", required=True, nargs="+",
                            help="span(s) '<|mt_start|><|mt_0012|><|mt_0300|><|mt_end|>' (or text containing them)")
        parser.add_argument("--out", required=True, nargs="+",
                            help="output PNG per mask; with one path and several masks, _0, _1... are appended")
        parser.add_argument("--device", default="cpu")
    else:  # pragma: no cover
        raise KeyError(name)


def run(name: str, args: argparse.Namespace) -> int:
    return {"train-tokenizer": _train, "encode": _encode, "decode": _decode}[name](args)


def _train(args: argparse.Namespace) -> int:
    from samtok.core.config import load_config, print_config, save_config
    from samtok.tokenizer.train import TrainTokenizerConfig, train_tokenizer

    cfg = load_config(TrainTokenizerConfig, args.config, args.overrides)
    print_config(cfg, "train-tokenizer")
    if args.print_config:
        return 0
    save_config(cfg, cfg.out_dir)
    summary = train_tokenizer(cfg)
    s1 = summary.get("stage1", {})
    print(f"tokenizer written to {Path(cfg.out_dir) / 'final'}")
    if s1:
        print(f"val rMaskIoU {s1.get('val/rMaskIoU', float('nan')):.3f} "
              f"(first code only {s1.get('val/rMaskIoU_first_code', float('nan')):.3f}) "
              f"on {int(s1.get('val/masks', 0))} masks; total {summary['minutes_total']:.1f} min")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from samtok.core.images import load_image, load_mask
    from samtok.tokenizer.api import SAMTokenizer

    tok = SAMTokenizer.from_pretrained(args.tokenizer, device=args.device)
    image = load_image(args.image)
    masks = [load_mask(p) for p in args.mask]
    for p, m in zip(args.mask, masks):
        if m.shape != image.shape[:2]:
            raise SamtokError(f"{p}: mask is {m.shape[0]}x{m.shape[1]} but {args.image} is {image.shape[0]}x{image.shape[1]}")
    codes = tok.encode(image, masks)
    for c in codes.tolist():
        print(" ".join(str(v) for v in c) if args.codes else tok.codec.format(*c))
    return 0


def _decode(args: argparse.Namespace) -> int:
    import torch

    from samtok.core.images import load_image, save_mask_png
    from samtok.tokenizer.api import SAMTokenizer

    tok = SAMTokenizer.from_pretrained(args.tokenizer, device=args.device)
    codes = []
    for text in args.tokens:
        parsed = tok.codec.parse(text)
        if not parsed.spans:
            raise SamtokError(f"no mask span found in {text!r}")
        for span in parsed.spans:
            if not span.valid:
                raise SamtokError(f"span {text[span.start:span.end]!r}: first code out of range")
            codes.append(span.codes)
    outs = list(args.out)
    if len(outs) == 1 and len(codes) > 1:
        base = Path(outs[0])
        outs = [str(base.with_name(f"{base.stem}_{k}{base.suffix or '.png'}")) for k in range(len(codes))]
    if len(outs) != len(codes):
        raise SamtokError(f"{len(codes)} masks to write but {len(outs)} --out paths given")
    image = load_image(args.image)
    masks = tok.decode(image, torch.tensor(codes))
    for m, path in zip(masks, outs):
        save_mask_png(m.numpy(), path)
        print(path)
    return 0


def export_official_command(args: argparse.Namespace) -> int:
    """``samtok export --from-official FILE [--sam2 FILE] --out DIR``."""
    from samtok.tokenizer.checkpoints import export_official

    info = export_official(args.from_official, args.out, sam2_path=args.sam2,
                           image_size=args.image_size, release_compat=args.release_compat)
    conv = info["conversion"]
    print(f"wrote {args.out}: {conv['loaded_from_official']} tensors from the release, "
          f"{conv['loaded_from_sam2']} from SAM 2, {conv['dropped_video_memory']} video-memory tensors dropped; "
          f"codebook EMA consistency (max rel. err per depth) {info['codebook_ema_max_rel_err']}", file=sys.stdout)
    return 0
