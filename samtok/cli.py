"""The ``samtok`` command: one sub-command per job.

Sub-command modules are imported only when their command runs, so ``samtok --help`` and light
commands do not pay for Lightning / transformers imports. Each command module defines

    def build_parser(name: str, parser: argparse.ArgumentParser) -> None
    def run(name: str, args: argparse.Namespace) -> int

Config-driven commands take ``--config FILE`` (a path, or a name under ``configs/``) and any
number of ``key=value`` overrides; ``--print-config`` shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("synth", "samtok.data.cli", "generate the embedded synthetic data set (images, masks, language)"),
    Command("train-tokenizer", "samtok.tokenizer.cli", "train the SAMTok mask tokenizer (stage 0 SAM2 + stage 1 SAMTok)"),
    Command("encode", "samtok.tokenizer.cli", "mask file(s) -> two-token span(s) printed on stdout"),
    Command("decode", "samtok.tokenizer.cli", "span(s) -> binary mask PNG(s) at the image's size"),
    Command("pretokenize", "samtok.data.pretokenize_cli", "tokenize every mask of a data set once into an Arrow table"),
    Command("sft", "samtok.mllm.cli", "supervised fine-tuning of a QwenVL-SAMTok model"),
    Command("pretrain", "samtok.mllm.scene_qa_cli", "grounding pretraining of the tiny VLM on synthetic scenes (before sft)"),
    Command("vision-check", "samtok.mllm.scene_qa_cli", "train briefly on image-only questions: does the image reach the model?"),
    Command("chat", "samtok.mllm.chat", "run a QwenVL-SAMTok model on an image and a prompt"),
    Command("serve", "samtok.serve.cli", "the web demo in a browser: tokenize, detokenize, chat (localhost)"),
    Command("serve-openai", "samtok.mllm.serving", "an exported model behind transformers' OpenAI-compatible server"),
    Command("rl", "samtok.rl.cli", "GRPO with the textual answer-matching reward"),
    Command("eval", "samtok.eval.cli", "run a benchmark and write report.json / report.md"),
    Command("export", "samtok.export_cli", "export a tokenizer (--from-official) or a merged Hugging Face model"),
    Command("demo", "samtok.demo", "run the whole pipeline on the embedded default, with a summary"),
)


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """The ``--config`` / overrides / ``--print-config`` trio shared by config-driven commands."""
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config: a path or a name under configs/ (default: {default_config})",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _top_help() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = ["usage: samtok COMMAND [options]   (samtok COMMAND --help for details)", "", "commands:"]
    lines += [f"  {c.name.ljust(width)}  {c.help}" for c in COMMANDS]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from samtok import __version__

        print(__version__)
        return 0
    by_name = {c.name: c for c in COMMANDS}
    cmd = by_name.get(argv[0])
    if cmd is None:
        print(f"samtok: unknown command {argv[0]!r}\n\n{_top_help()}", file=sys.stderr)
        return 2

    from samtok.core.runtime import set_offline

    set_offline()
    module = importlib.import_module(cmd.module)
    parser = argparse.ArgumentParser(prog=f"samtok {cmd.name}", description=cmd.help)
    module.build_parser(cmd.name, parser)
    args = parser.parse_args(argv[1:])

    import os

    from samtok.core.errors import SamtokError

    try:
        return int(module.run(cmd.name, args) or 0)
    except (SamtokError, FileNotFoundError) as exc:
        if os.environ.get("SAMTOK_DEBUG"):
            raise
        print(f"samtok {cmd.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"samtok {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
