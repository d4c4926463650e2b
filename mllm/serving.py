"""An exported QwenVL-SAMTok model behind transformers' own OpenAI-compatible server, without remote code.

    samtok serve-openai exported/ --device cpu --port 8000       # transformers' `serve`, in this process
    python -m samtok.mllm.serving exported/ --port 8000           # the same

No server patch is needed for the answers: the 514 mask words are ordinary (non-special) added
tokens, so a server that decodes with ``skip_special_tokens=True`` — ``transformers serve`` and
vLLM both do — returns them in the answer text like any other word, and the client turns the spans
into masks with the SAMTokenizer (:mod:`samtok.mllm.openai_client`).

What this launcher is for: machines without torchvision (this project's CPU machines, where PyPI's
torchvision cannot import beside the CPU build of torch). For Qwen-VL models transformers'
``AutoProcessor`` builds ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``, which always load a video
processor, and those need torchvision: plain ``transformers serve DIR`` stops at start-up there. The
launcher registers the project's image-only processor (:class:`ServerProcessor`) for the Qwen-VL
config classes with ``AutoProcessor.register`` — the extension point ``AutoProcessor.from_pretrained``
consults for a model's config class, which is how the server's ``ModelManager._load_processor``
builds its processor — and then runs transformers' own ``serve`` command in the same process. The
server's code is not changed, nothing is written into the model directory, and no code is loaded
from it (``trust_remote_code`` stays off). Where torchvision works (GPU machines) plain
``transformers serve DIR`` or ``vllm serve DIR`` serve the same directory with the native processor.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Optional, Sequence

from samtok.core.errors import SamtokError
from samtok.mllm.processor import QwenVLImageTextProcessor, load_processor

# Model types whose processors are Qwen-VL processors with a video processor (config.json "model_type").
SERVED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Files AutoProcessor reads a "processor_class" from, in its order; a name found there wins over the registry.
_PROCESSOR_CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                          "tokenizer_config.json")


class ServerProcessor(QwenVLImageTextProcessor):
    """The processor the server builds for a Qwen-VL model directory: images and text, no video.

    ``from_pretrained`` is :func:`samtok.mllm.processor.load_processor` (the PIL image processor with
    the directory's settings), so the server turns a request into the same ``input_ids`` and
    ``pixel_values`` as local inference does (checked by tests/test_serve_openai.py).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> QwenVLImageTextProcessor:
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise SamtokError(f"{path}: the image-only processor loads from a local model directory")
        return load_processor(path)


def register_image_only_processor() -> list[str]:
    """Make ``AutoProcessor`` build :class:`ServerProcessor` for Qwen-VL models; returns the config classes."""
    from transformers import AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    names = []
    for model_type in SERVED_MODEL_TYPES:
        config_class = CONFIG_MAPPING[model_type]
        AutoProcessor.register(config_class, ServerProcessor, exist_ok=True)
        names.append(config_class.__name__)
    return names


def check_servable(model_dir: str | Path) -> str:
    """The directory's model type, or :class:`SamtokError` saying why the launcher cannot serve it."""
    p = Path(model_dir)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise SamtokError(f"no model at {p} (no config.json); export one with `samtok export --model DIR --out {p}`")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type not in SERVED_MODEL_TYPES:
        raise SamtokError(f"{p} holds a {model_type!r} model; the launcher serves Qwen-VL models "
                          f"({', '.join(SERVED_MODEL_TYPES)})")
    for name in _PROCESSOR_CLASS_FILES:
        f = p / name
        if not f.is_file():
            continue
        declared = json.loads(f.read_text()).get("processor_class")
        if declared:
            # AutoProcessor takes a class named in the files before the registry; transformers' Qwen-VL
            # processors would need torchvision again.
            raise SamtokError(f"{f} names processor_class {declared!r}, which transformers would build instead of the "
                              f"image-only processor; serve an export (`samtok export --model {p} --out DIR`, whose "
                              f"files name none) or remove that entry")
    return model_type


# ------------------------------------------------------------------------------------------ command
def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="an exported QwenVL-SAMTok directory (samtok export --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--device", default="auto", help="torch device, as transformers serve takes it (default: auto)")
    parser.add_argument("--serve-args", default="", metavar="ARGS",
                        help="more options for transformers serve, in one string (--serve-args=\"--log-level info\"); "
                             "`transformers serve --help` lists them")


def serve_command(model_dir: str | Path, host: str, port: int, device: str, extra: Sequence[str] = ()) -> list[str]:
    """The argument list of transformers' ``serve`` command for ``model_dir``."""
    return ["serve", str(model_dir), "--host", host, "--port", str(port), "--device", device, *extra]


def run(name: str, args: argparse.Namespace) -> int:
    check_servable(args.model)
    extra = shlex.split(args.serve_args)
    if any(a.replace("_", "-").startswith("--trust-remote-code") for a in extra):
        raise SamtokError("--trust-remote-code is not used here: the image-only processor is registered in-process")
    registered = register_image_only_processor()
    print(f"samtok serve-openai: image-only processor registered for {', '.join(registered)}; starting transformers "
          f"serve on http://{host_for_url(args.host)}:{args.port}/v1 (Ctrl+C to stop)", flush=True)
    from transformers.cli.transformers import app  # the `transformers` command, without its PyPI update check

    app(serve_command(args.model, args.host, args.port, args.device, extra), prog_name="transformers",
        standalone_mode=False)
    return 0


def host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m samtok.mllm.serving MODEL_DIR [options]`` = ``samtok serve-openai MODEL_DIR [options]``."""
    import sys

    from samtok.cli import main as samtok_main

    return samtok_main(["serve-openai", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
