"""``samtok export``: either the released tokenizer (``--from-official``) or a trained model (``--model``)."""

from __future__ import annotations

import argparse

from samtok.core.errors import SamtokError


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-official", metavar="PTH",
                     help="the released mask_tokenizer_256x2.pth: convert it into a tokenizer directory")
    src.add_argument("--model", metavar="DIR", help="a trained QwenVL-SAMTok directory (e.g. runs/sft/final)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sam2", metavar="PT", help="Meta's sam2.1_hiera_large.pt (only for tensors the release lacks)")
    parser.add_argument("--image-size", type=int, default=1024, help="SAM 2 input size of the release (default 1024)")
    parser.add_argument("--release-compat", action="store_true",
                        help="decode a second code of -1 as code 0, like the released code does (exact parity)")
    parser.add_argument("--tokenizer", help="--model only: the mask tokenizer directory (default: the one the model records)")


def run(name: str, args: argparse.Namespace) -> int:
    if args.from_official:
        from samtok.tokenizer.cli import export_official_command

        return export_official_command(args)
    if args.sam2 or args.release_compat:
        raise SamtokError("--sam2 and --release-compat apply to --from-official only")
    from samtok.mllm.export import export_model

    out = export_model(args.model, args.out, tokenizer_dir=args.tokenizer)
    print(f"exported {args.model} -> {out} (model + processor, mask_tokenizer/, README.md)")
    return 0
