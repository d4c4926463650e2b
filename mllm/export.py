"""Writing QwenVL-SAMTok model directories.

* :func:`save_trained_model` — what SFT / GRPO write at the end (``runs/sft/final``): LoRA merged
  into the weights, a plain Hugging Face model + processor directory, and ``samtok.json`` naming
  the mask tokenizer it was trained with (path and fingerprint) and how it was trained.
* :func:`export_model` — ``samtok export --model DIR --out OUT``: a self-contained copy for
  sharing: the model directory, the mask tokenizer copied into ``OUT/mask_tokenizer/``, and a
  README card. ``AutoModelForImageTextToText.from_pretrained(OUT)`` loads it with plain transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from samtok.core.errors import SamtokError

SAMTOK_JSON = "samtok.json"
MASK_TOKENIZER_DIR = "mask_tokenizer"


def merged_model(model):
    """The plain transformers model with LoRA weights merged in (no-op without LoRA)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_trained_model(model, processor, out_dir: str | Path, tokenizer_dir: str | Path, info: dict) -> Path:
    """Merge LoRA, save model + processor, and record the mask tokenizer in ``samtok.json``."""
    from samtok.mllm.models import save_model_and_processor
    from samtok.tokenizer.checkpoints import file_fingerprint

    out = Path(out_dir)
    plain = merged_model(model)
    save_model_and_processor(plain, processor, out)
    meta = {
        "mask_tokenizer": str(Path(tokenizer_dir).resolve()),
        "mask_tokenizer_fingerprint": file_fingerprint(tokenizer_dir),
        "info": info,
    }
    _write_json(out / SAMTOK_JSON, meta)
    return out


def read_samtok_json(model_dir: str | Path) -> dict:
    p = Path(model_dir) / SAMTOK_JSON
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise SamtokError(f"{p}: invalid JSON: {exc}") from exc


def mask_tokenizer_for(model_dir: str | Path, explicit: Optional[str | Path] = None) -> Path:
    """The mask tokenizer of a model directory: ``explicit``, else ``mask_tokenizer/``, else samtok.json's."""
    if explicit:
        return Path(explicit)
    local = Path(model_dir) / MASK_TOKENIZER_DIR
    if (local / "config.json").is_file():
        return local
    meta = read_samtok_json(model_dir)
    if meta.get("mask_tokenizer"):
        return Path(meta["mask_tokenizer"])
    raise SamtokError(f"{model_dir}: no mask tokenizer recorded (no {MASK_TOKENIZER_DIR}/ and no {SAMTOK_JSON}); pass --tokenizer")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _card(meta: dict, model_dir: Path) -> str:
    info = meta.get("info", {})
    cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    lines = [
        "# QwenVL-SAMTok model",
        "",
        "A Qwen-VL model that reads and writes image masks as two words each (SAMTok, arXiv 2601.16093),",
        "exported by `samtok export`. Masks are `<|mt_start|><|mt_AAAA|><|mt_BBBB|><|mt_end|>` spans;",
        f"decode them with the mask tokenizer in `{MASK_TOKENIZER_DIR}/`:",
        "",
        "```python",
        "from samtok.mllm.inference import SamtokPredictor",
        f"p = SamtokPredictor.from_pretrained('.', '{MASK_TOKENIZER_DIR}')",
        "print(p.predict(['image.jpg'], ['Please segment the red car in this image.'])[0].readable_text)",
        "```",
        "",
        "Plain transformers loads the language model: `AutoModelForImageTextToText.from_pretrained(dir)`.",
        "",
        "## How it was trained",
        "",
        f"- architecture: `{cfg.get('model_type', '?')}`",
        f"- stage: {info.get('stage', '?')}",
    ]
    for key in ("recipe", "steps", "minutes", "data", "base_model", "lora", "metrics"):
        if key in info:
            lines.append(f"- {key}: `{json.dumps(info[key], sort_keys=True)}`")
    lines.append(f"- mask tokenizer fingerprint: `{meta.get('mask_tokenizer_fingerprint', '?')}`")
    return "\n".join(lines) + "\n"


def export_model(model_dir: str | Path, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None) -> Path:
    """Self-contained copy: model + processor files, ``mask_tokenizer/``, README card."""
    from samtok.mllm.models import load_model_and_processor, save_model_and_processor

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise SamtokError(f"not a model directory (no config.json): {src}")
    tok_dir = mask_tokenizer_for(src, tokenizer_dir)
    if not (tok_dir / "config.json").is_file():
        raise SamtokError(f"mask tokenizer directory not found: {tok_dir}")
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise SamtokError("--out must differ from the model directory")
    model, processor = load_model_and_processor(src)
    save_model_and_processor(merged_model(model), processor, out)
    dst_tok = out / MASK_TOKENIZER_DIR
    tmp = out / (MASK_TOKENIZER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tok_dir, tmp)
    shutil.rmtree(dst_tok, ignore_errors=True)
    os.replace(tmp, dst_tok)
    meta = read_samtok_json(src)
    from samtok.tokenizer.checkpoints import file_fingerprint

    meta.update({"mask_tokenizer": MASK_TOKENIZER_DIR, "mask_tokenizer_fingerprint": file_fingerprint(dst_tok)})
    _write_json(out / SAMTOK_JSON, meta)
    (out / "README.md").write_text(_card(meta, out))
    return out
