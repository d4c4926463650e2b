"""``samtok pretokenize``: every mask of a data set (or mixture) → two codes, into an Arrow table.

    samtok pretokenize --tokenizer runs/tokenizer/final --data configs/data/synth_mixture.yaml --out runs/pretok
    samtok pretokenize --tokenizer DIR --data /data/coco/annotations/instances_train2017.json --out DIR \\
        --image-root /data/coco/train2017 --source coco2017 devices=4 strategy=ddp batch_size=16 num_workers=8

Flags set the keys of :class:`samtok.data.pretokenize.PretokenizeConfig`; any key can also be given
as ``key=value`` (applied after ``--config``, before the flags). Killing the job and running the
same command again resumes: committed shards are kept and only missing masks are encoded.
"""

from __future__ import annotations

import argparse

from samtok.cli import add_config_arguments


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None)
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (sets tokenizer)")
    parser.add_argument("--data", metavar="FILE", help="a COCO instances .json or a mixture .yaml (sets data)")
    parser.add_argument("--out", metavar="DIR", help="output folder (sets out)")
    parser.add_argument("--source", help="mask-pool name of a COCO JSON's records (sets source; default coco)")
    parser.add_argument("--image-root", metavar="DIR", help="images of a COCO JSON (sets image_root)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="images per step (sets batch_size)")
    parser.add_argument("--num-workers", type=int, metavar="N", help="DataLoader workers per rank (sets num_workers)")
    parser.add_argument("--devices", help="devices per node: auto, a count or a list (sets devices)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="delete an existing table first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from samtok.core.config import load_config
    from samtok.data.pretokenize import PretokenizeConfig

    cfg = load_config(PretokenizeConfig, args.config, args.overrides)
    for flag, key in (("tokenizer", "tokenizer"), ("data", "data"), ("out", "out"), ("source", "source"),
                      ("image_root", "image_root"), ("batch_size", "batch_size"), ("num_workers", "num_workers"),
                      ("devices", "devices"), ("overwrite", "overwrite")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, key, value)
    if args.no_progress:
        cfg.progress = False
    return cfg


def run(name: str, args: argparse.Namespace) -> int:
    from samtok.core.config import print_config
    from samtok.data.pretokenize import pretokenize

    cfg = config_from_args(args)
    if args.print_config:
        print_config(cfg, "pretokenize config")
        return 0
    result = pretokenize(cfg)
    if result.rows:  # the launching process (rank 0) reports
        speed = f", {result.masks_per_second:.1f} masks/s" if result.encoded else ""
        print(f"pretokenized table: {result.rows} rows in {cfg.out} "
              f"({result.encoded} masks encoded in {result.seconds:.1f} s{speed})")
    return 0
