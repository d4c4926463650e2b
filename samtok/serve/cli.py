"""``samtok serve``: the web demo (Gradio) on http://127.0.0.1:7860/ (Tokenize, Detokenize, Chat).

    samtok serve                                   # the embedded default: runs/tokenizer/final + runs/rl|sft/final
    samtok serve --model exported/                 # any model directory the CLI accepts (its mask tokenizer comes along)
    samtok serve --tokenizer tokenizers/official --no-model     # the released tokenizer alone (no Chat)

Without ``--model`` the newest embedded-default model is used (``runs/rl/final``, else
``runs/sft/final``); without ``--tokenizer``, the model's own mask tokenizer (``mask_tokenizer/`` or
the one ``samtok.json`` records), else ``runs/tokenizer/final``. Whatever is missing is explained on
the page, and the tabs that do not need it keep working.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Optional

from samtok.core.errors import SamtokError

DEFAULT_TOKENIZER = Path("runs/tokenizer/final")
DEFAULT_MODELS = (Path("runs/rl/final"), Path("runs/sft/final"))


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="SAMTok tokenizer directory (default: the model's own, else runs/tokenizer/final)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="QwenVL-SAMTok model directory for Chat (default: runs/rl/final, else runs/sft/final)")
    parser.add_argument("--no-model", action="store_true", help="serve Tokenize and Detokenize only")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--device", default="cpu", help="torch device for the tokenizer and the model")
    parser.add_argument("--max-image-side", type=int, default=1600,
                        help="larger images are resized to this many pixels on their longer side (default 1600)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default answer length in tokens for Chat")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="requests of each kind Gradio's queue runs at once (default 4; the tokenizer and the "
                             "model each run one at a time, the rest wait)")
    parser.add_argument("--brush-size", type=int, default=None, metavar="PX",
                        help="default brush radius in image pixels (default: Gradio's; adjustable in the page)")


def resolve_paths(model: Optional[str], tokenizer: Optional[str], no_model: bool,
                  root: Path = Path(".")) -> tuple[Optional[str], Optional[str], list[str]]:
    """``(model_dir, tokenizer_dir, notes)`` after applying the defaults (see the module docstring)."""
    from samtok.mllm.export import mask_tokenizer_for

    notes = []
    model_dir: Optional[Path] = None
    if not no_model:
        if model:
            model_dir = Path(model)
        else:
            model_dir = next((root / p for p in DEFAULT_MODELS if (root / p / "config.json").is_file()), None)
            if model_dir is None:
                notes.append(f"no model found at {' or '.join(str(p) for p in DEFAULT_MODELS)}: Chat is off "
                             f"(train one with `make sft`, or pass --model DIR)")
    tok_dir: Optional[Path] = Path(tokenizer) if tokenizer else None
    if tok_dir is None and model_dir is not None and (model_dir / "config.json").is_file():
        try:
            tok_dir = mask_tokenizer_for(model_dir)
        except SamtokError:
            tok_dir = None
        if tok_dir is not None and not (tok_dir / "config.json").is_file():
            notes.append(f"the model records the mask tokenizer {tok_dir}, which does not exist; using the default")
            tok_dir = None
    if tok_dir is None:
        tok_dir = root / DEFAULT_TOKENIZER
    return (str(model_dir) if model_dir else None), str(tok_dir), notes


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SamtokError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server running there? "
                              f"Pass --port N") from exc


def run(name: str, args: argparse.Namespace) -> int:
    try:
        from samtok.serve.app import launch
    except ImportError as exc:
        raise SamtokError(f"the web demo needs the serve extra ({exc.name} is missing): "
                          f"pip install -e '.[serve]' (make install does it)") from exc
    from samtok.serve.service import DemoConfig, DemoService

    if args.model and args.no_model:
        raise SamtokError("--model and --no-model exclude each other")
    if args.max_image_side < 64:
        raise SamtokError("--max-image-side must be at least 64")
    if args.concurrency < 1:
        raise SamtokError("--concurrency must be at least 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model_dir, tok_dir, notes = resolve_paths(args.model, args.tokenizer, args.no_model)
    _check_port(args.host, args.port)
    config = DemoConfig(tokenizer_dir=tok_dir, model_dir=model_dir, device=args.device,
                        max_image_side=args.max_image_side, max_new_tokens=args.max_new_tokens)
    service = DemoService(config).start()
    print(f"tokenizer: {tok_dir}" + ("" if service.tokenizer is not None else f"  (not usable: {service.tokenizer_error})"))
    print(f"model:     {model_dir or '(none: Chat is off)'}" + ("  (loading in the background)" if model_dir else ""))
    for note in notes:
        print(f"note: {note}")
    app = launch(service, args.host, args.port, concurrency=args.concurrency, brush_size=args.brush_size)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"samtok serve: open http://{shown}:{args.port}/ in a browser (Ctrl+C to stop)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
    return 0
