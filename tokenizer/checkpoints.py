"""Saving and loading tokenizer directories, and importing the released SAMTok checkpoint.

Our format (what ``save_pretrained`` writes, what ``from_pretrained`` reads)::

    DIR/config.json         {"format": "samtok-tokenizer", "version": 1, "model": TokenizerModelConfig, "info": {...}}
    DIR/model.safetensors   the state dict of SAMTokModel (image encoder, prompt encoder, mask
                            decoder, mask encoder, codebooks — no video-memory modules)

The released ``mask_tokenizer_256x2.pth`` is a flat state dict whose SAM 2 tensors are named
``model.sam2_model.<Meta's name>`` and whose codebooks are ``quantizer.codebooks.{d}.*`` with the
same shapes as ours (``size + 1`` rows, the last a zero padding row); see
``shared/reference/official_checkpoint_layout.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from samtok.core.config import from_dict, to_dict
from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig, state_dict_shapes
from samtok.tokenizer.sam2_parts import (
    USED_SAM2_PREFIXES,
    CheckpointError,
    SAM2Config,
    load_torch_file,
    unwrap_state_dict,
)

FORMAT_NAME = "samtok-tokenizer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OFFICIAL_PREFIX = "model.sam2_model."


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tokenizer_dir(model: SAMTokModel, out_dir: str | Path, info: Optional[dict] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir`` (each file atomically)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT_NAME})
    os.replace(tmp, out / WEIGHTS_FILE)
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": to_dict(model.cfg), "info": info or {}}
    _atomic_write_text(out / CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return out


def read_tokenizer_config(path: str | Path) -> tuple[TokenizerModelConfig, dict]:
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise CheckpointError(f"not a tokenizer directory (no {CONFIG_FILE}): {Path(path)}")
    try:
        payload = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}: invalid JSON: {exc}") from exc
    if payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{p}: 'format' must be {FORMAT_NAME!r}, got {payload.get('format')!r}")
    cfg = from_dict(TokenizerModelConfig, payload.get("model", {}), source=str(p))
    return cfg, payload.get("info", {})


def load_tokenizer_dir(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SAMTokModel, dict]:
    """Build the model from ``config.json`` and load ``model.safetensors`` strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg, info = read_tokenizer_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {weights} (truncated or corrupted?): {exc}") from exc
    model = SAMTokModel(cfg)
    load_state_strict(model, state, str(weights))
    return model, info


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: does not match the config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{where}: shape mismatch (file, model) for {bad[:3]}")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)


def file_fingerprint(path: str | Path, extra: str = "") -> str:
    """SHA-256 (first 16 hex digits) of a tokenizer directory's config + weights bytes."""
    h = hashlib.sha256()
    p = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        f = p / name
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the released checkpoint


def official_config(image_size: int = 1024) -> TokenizerModelConfig:
    """The release's architecture: SAM 2.1 Hiera-L at 1024, 2 x 256 codebooks."""
    return TokenizerModelConfig(sam2=SAM2Config(size="l", image_size=image_size))


def convert_official_state(
    official: dict[str, torch.Tensor],
    own_keys: dict[str, tuple[int, ...]],
    sam2_fallback: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rename the release's tensors into our layout.

    ``own_keys`` maps our state-dict names to shapes. Returns our state dict and a report
    (how many tensors came from each file, which official tensors were dropped as unused).
    A tensor the release lacks is taken from ``sam2_fallback`` (Meta's file) when given.
    """
    renamed: dict[str, torch.Tensor] = {}
    dropped = []
    for name, tensor in official.items():
        if name.startswith(OFFICIAL_PREFIX):
            ours = name[len(OFFICIAL_PREFIX):]
        elif name.startswith("quantizer."):
            ours = name
        else:
            dropped.append(name)
            continue
        if ours in own_keys:
            renamed[ours] = tensor
        else:
            dropped.append(name)
    from_fallback = []
    missing = [k for k in own_keys if k not in renamed]
    if missing and sam2_fallback is not None:
        for k in list(missing):
            if k.startswith(USED_SAM2_PREFIXES) and k in sam2_fallback:
                renamed[k] = sam2_fallback[k]
                from_fallback.append(k)
        missing = [k for k in own_keys if k not in renamed]
    if missing:
        raise CheckpointError(
            f"official checkpoint lacks {len(missing)} tensors the tokenizer needs, e.g. {missing[:4]} "
            "(truncated file, or pass --sam2 with Meta's sam2.1_hiera_large.pt)"
        )
    bad = [(k, tuple(renamed[k].shape), own_keys[k]) for k in own_keys if tuple(renamed[k].shape) != tuple(own_keys[k])]
    if bad:
        raise CheckpointError(f"official checkpoint: shape mismatch (file, expected) for {bad[:3]}")
    unused_video = [d for d in dropped if any(s in d for s in ("memory_", "mask_downsample", "obj_ptr", "maskmem", "no_mem_pos_enc", "no_obj"))]
    report = {
        "loaded_from_official": len(renamed) - len(from_fallback),
        "loaded_from_sam2": len(from_fallback),
        "dropped_video_memory": len(unused_video),
        "dropped_other": sorted(set(dropped) - set(unused_video)),
    }
    return renamed, report


def export_official(
    official_path: str | Path,
    out_dir: str | Path,
    sam2_path: Optional[str | Path] = None,
    image_size: int = 1024,
    release_compat: bool = False,
    model_config: Optional[TokenizerModelConfig] = None,
) -> dict:
    """Convert ``mask_tokenizer_256x2.pth`` (+ optional Meta SAM 2.1 file) into a tokenizer directory.

    ``model_config`` defaults to the release's architecture (Hiera-L at ``image_size``).
    """
    official = unwrap_state_dict(load_torch_file(official_path, "official SAMTok checkpoint"), official_path)
    # tolerate training-time wrappers: strip a leading hf_model. / module.
    official = {
        (k[len("hf_model."):] if k.startswith("hf_model.") else k[len("module."):] if k.startswith("module.") else k): v
        for k, v in official.items()
    }
    fallback = None
    if sam2_path is not None:
        fallback = unwrap_state_dict(load_torch_file(sam2_path, "SAM 2.1 checkpoint"), sam2_path)
    cfg = model_config or official_config(image_size)
    cfg.minus_one_as_code0 = release_compat
    shapes = state_dict_shapes(cfg)
    state, report = convert_official_state(official, shapes, fallback)
    model = SAMTokModel(cfg)
    load_state_strict(model, state, str(official_path))
    check = codebook_ema_consistency(model)
    info = {"source": "official", "official_file": str(official_path), "sam2_file": str(sam2_path or ""),
            "conversion": report, "codebook_ema_max_rel_err": check}
    save_tokenizer_dir(model, out_dir, info=info)
    return info


@torch.no_grad()
def codebook_ema_consistency(model: SAMTokModel, eps: float = 1e-5) -> list[float]:
    """For each depth, max relative error between ``weight[:K]`` and ``embed_ema / smoothed counts``.

    A converted release should give ~0 (the EMA update writes exactly that); a large value means
    the EMA buffers and the codes disagree (harmless for inference, suspicious for training).
    """
    errs = []
    for cb in model.quantizer.codebooks:
        n = cb.cluster_size_ema.sum()
        if float(n) <= 0:
            errs.append(float("nan"))
            continue
        smoothed = (cb.cluster_size_ema + eps) / (n + cb.size * eps) * n
        expected = cb.embed_ema / smoothed[:, None]
        err = (cb.codes - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
        errs.append(float(err))
    return errs
