"""Build the parts of SAM 2.1 the tokenizer uses, from the ``sam2`` package's own modules and YAMLs.

We do not go through ``sam2.build_sam`` (it composes configs through Hydra's global state and insists
on CUDA). Instead the package's model YAML is read with OmegaConf, optionally resized (image size,
a smaller Hiera trunk for CPU work), and only the image encoder is instantiated from it; the prompt
encoder and mask decoder are built with exactly the arguments ``SAM2Base._build_sam_heads`` uses.
Parameter names are Meta's, so ``sam2.1_hiera_*.pt`` loads by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from samtok.core.errors import SamtokError

#: Hiera sizes shipped with SAM 2.1 and the YAML that describes each.
SAM2_SIZES = {
    "t": "sam2.1_hiera_t.yaml",
    "s": "sam2.1_hiera_s.yaml",
    "b+": "sam2.1_hiera_b+.yaml",
    "l": "sam2.1_hiera_l.yaml",
}

#: Prefixes of Meta's checkpoint keys that the tokenizer uses (everything else is video memory).
USED_SAM2_PREFIXES = ("image_encoder.", "no_mem_embed", "sam_prompt_encoder.", "sam_mask_decoder.")


class CheckpointError(SamtokError):
    """A checkpoint file is missing, truncated, or does not hold the expected tensors."""


@dataclass
class SAM2Config:
    """Which SAM 2.1 to build. ``trunk_*`` / ``hidden_dim`` override the YAML (for tiny CPU models)."""

    size: str = "l"  # t | s | b+ | l, or a path to a sam2 model YAML
    image_size: int = 1024  # S: images are resized to S x S; the embedding is S/16, mask logits S/4
    checkpoint: Optional[str] = None  # local sam2.1_hiera_*.pt (Meta's file); None = random init
    hidden_dim: Optional[int] = None  # neck / prompt / decoder width (256 in every release)
    decoder_mlp_dim: int = 2048  # MLP width of the mask decoder's two-way transformer (2048 in SAM 2)
    trunk_embed_dim: Optional[int] = None  # Hiera stage-1 width (96 t/s, 112 b+, 144 l)
    trunk_num_heads: Optional[int] = None
    trunk_stages: Optional[list[int]] = None  # blocks per stage, e.g. [1, 1, 2, 1] for a micro Hiera
    trunk_global_att_blocks: Optional[list[int]] = None  # never the first block of a stage
    trunk_window_spec: Optional[list[int]] = None
    trunk_window_pos_embed_bkg_spatial_size: Optional[list[int]] = None
    extra: dict = field(default_factory=dict)  # dotted-key overrides into the YAML's `model` node


def _yaml_path(size: str) -> Path:
    if size in SAM2_SIZES:
        import importlib.util

        spec = importlib.util.find_spec("sam2")
        if spec is None or not spec.submodule_search_locations:
            raise SamtokError("the sam2 package is not installed (make install)")
        return Path(list(spec.submodule_search_locations)[0]) / "configs" / "sam2.1" / SAM2_SIZES[size]
    p = Path(size)
    if not p.is_file():
        raise SamtokError(f"sam2 size must be one of {sorted(SAM2_SIZES)} or a YAML path, got {size!r}")
    return p


def sam2_model_node(cfg: SAM2Config) -> DictConfig:
    """The resolved ``model`` node of the sam2 YAML with our overrides applied."""
    root = OmegaConf.load(_yaml_path(cfg.size))
    model = root.model
    model.image_size = cfg.image_size
    trunk = model.image_encoder.trunk
    neck = model.image_encoder.neck
    for key in ("embed_dim", "num_heads", "stages", "global_att_blocks", "window_spec",
                "window_pos_embed_bkg_spatial_size"):
        value = getattr(cfg, f"trunk_{key}")
        if value is not None:
            trunk[key] = list(value) if isinstance(value, (list, tuple)) else value
    if cfg.trunk_stages is not None and cfg.trunk_global_att_blocks is None:
        raise SamtokError("sam2: trunk_stages is overridden, so trunk_global_att_blocks must be given too")
    if cfg.trunk_embed_dim is not None:
        e = int(cfg.trunk_embed_dim)
        neck.backbone_channel_list = [8 * e, 4 * e, 2 * e, e]
    if cfg.hidden_dim is not None:
        if cfg.hidden_dim % 16:
            raise SamtokError(f"sam2.hidden_dim must be a multiple of 16 (8 heads, downsample 2), got {cfg.hidden_dim}")
        neck.d_model = cfg.hidden_dim
        neck.position_encoding.num_pos_feats = cfg.hidden_dim
    for key, value in cfg.extra.items():
        OmegaConf.update(model, key, value, force_add=True)
    _check_global_blocks(trunk)
    return model


def _check_global_blocks(trunk: Any) -> None:
    stages = list(trunk.get("stages", [2, 3, 16, 3]))
    starts = {sum(stages[:i]) for i in range(len(stages))}
    bad = [b for b in trunk.get("global_att_blocks", []) if b in starts or b >= sum(stages)]
    if bad:
        raise SamtokError(
            f"sam2 trunk: global attention blocks {bad} must lie inside a stage and not be its first block "
            f"(stages {stages})"
        )


def build_sam2_parts(cfg: SAM2Config) -> dict[str, Any]:
    """Image encoder, ``no_mem_embed``, prompt encoder and mask decoder, with Meta's names."""
    from hydra.utils import instantiate
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.prompt_encoder import PromptEncoder
    from sam2.modeling.sam.transformer import TwoWayTransformer

    node = sam2_model_node(cfg)
    image_encoder = instantiate(node.image_encoder, _recursive_=True)
    hidden = int(node.image_encoder.neck.d_model)
    stride = int(node.get("backbone_stride", 16))
    emb = cfg.image_size // stride
    if cfg.image_size % stride:
        raise SamtokError(f"sam2.image_size must be a multiple of {stride}, got {cfg.image_size}")
    prompt_encoder = PromptEncoder(
        embed_dim=hidden,
        image_embedding_size=(emb, emb),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=16,
    )
    extra = node.get("sam_mask_decoder_extra_args", None)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=hidden, mlp_dim=cfg.decoder_mlp_dim, num_heads=8),
        transformer_dim=hidden,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=bool(node.get("use_high_res_features_in_sam", False)),
        iou_prediction_use_sigmoid=bool(node.get("iou_prediction_use_sigmoid", False)),
        pred_obj_scores=bool(node.get("pred_obj_scores", False)),
        pred_obj_scores_mlp=bool(node.get("pred_obj_scores_mlp", False)),
        use_multimask_token_for_obj_ptr=bool(node.get("use_multimask_token_for_obj_ptr", False)),
        **(OmegaConf.to_container(extra) if extra else {}),
    )
    no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden))
    nn.init.trunc_normal_(no_mem_embed, std=0.02)
    return {
        "image_encoder": image_encoder,
        "no_mem_embed": no_mem_embed,
        "sam_prompt_encoder": prompt_encoder,
        "sam_mask_decoder": mask_decoder,
        "hidden_dim": hidden,
        "use_high_res_features": bool(node.get("use_high_res_features_in_sam", False)),
    }


def build_sam2_base(cfg: SAM2Config) -> nn.Module:
    """The whole ``SAM2Base`` of the sam2 package (memory modules included) — for parity tests."""
    from hydra.utils import instantiate

    return instantiate(sam2_model_node(cfg), _recursive_=True)


def load_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, wrong format...
        raise CheckpointError(f"cannot load {what} {p} (truncated or not a weights-only torch file?): {exc}") from exc


def unwrap_state_dict(obj: Any, path: str | Path = "") -> dict[str, torch.Tensor]:
    """Accept a flat state dict or one wrapped in ``model`` / ``state_dict`` / ``module``."""
    for _ in range(3):
        if isinstance(obj, dict) and len(obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            for key in ("model", "state_dict", "module"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    raise CheckpointError(f"{path}: expected a state dict of tensors (optionally under 'model'/'state_dict')")


def load_meta_sam2_weights(module: nn.Module, path: str | Path) -> list[str]:
    """Copy the used SAM 2.1 tensors of Meta's ``sam2.1_hiera_*.pt`` into ``module`` (by name).

    Returns the names that were loaded. Every used tensor of ``module`` must be present with the
    right shape; video-memory tensors of the file are ignored.
    """
    sd = unwrap_state_dict(load_torch_file(path, "SAM 2.1 checkpoint"), path)
    own = module.state_dict()
    wanted = [k for k in own if k.startswith(USED_SAM2_PREFIXES)]
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} SAM 2 tensors missing, e.g. {missing[:3]} (wrong size or truncated?)")
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in wanted if sd[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[:3]} — does the config's size match the file?")
    module.load_state_dict({k: sd[k].to(own[k].dtype) for k in wanted}, strict=False)
    return wanted
