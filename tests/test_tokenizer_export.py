"""Importing the released SAMTok checkpoint (`samtok export --from-official`)."""

from pathlib import Path

import pytest
import torch

from samtok.tokenizer.checkpoints import (
    OFFICIAL_PREFIX,
    codebook_ema_consistency,
    export_official,
    official_config,
)
from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig, state_dict_shapes
from samtok.tokenizer.sam2_parts import USED_SAM2_PREFIXES, CheckpointError, SAM2Config

# the release's state-dict key list (names, shapes), from shared/reference/ of the project
REF = Path(__file__).resolve().parent / "fixtures" / "official_mask_tokenizer_keys.tsv"
MICRO = SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                   trunk_global_att_blocks=[3])


def official_rows():
    rows = []
    for line in REF.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _dtype, _kind, _meta = line.split("\t")
        rows.append((name, tuple(int(v) for v in shape.strip("()").split(",") if v.strip())))
    return rows


def test_release_layout_maps_onto_ours_exactly():
    rows = official_rows()
    assert len(rows) == 992
    ours = state_dict_shapes(official_config())
    mapped = {}
    for name, shape in rows:
        key = name[len(OFFICIAL_PREFIX):] if name.startswith(OFFICIAL_PREFIX) else name
        if key in ours:
            mapped[key] = shape
        else:  # only video-memory tensors may be left over
            assert not key.startswith(USED_SAM2_PREFIXES + ("sam_mask_encoder", "quantizer")), name
    assert set(mapped) == set(ours), sorted(set(ours) - set(mapped))[:5]
    assert all(mapped[k] == ours[k] for k in ours)
    assert ours["quantizer.codebooks.0.weight"] == (257, 256)
    assert sum(1 for k in ours if k.startswith("sam_mask_encoder")) == 83


def fake_official_file(path, cfg, wrap=False):
    torch.manual_seed(0)
    model = SAMTokModel(cfg)
    state = {}
    for k, v in model.state_dict().items():
        t = torch.randn_like(v.float()).to(v.dtype)
        state[k if k.startswith("quantizer.") else OFFICIAL_PREFIX + k] = t
    for d in range(cfg.quantizer.depth):  # a realistic EMA state: weight = embed_ema / smoothed counts
        counts = torch.rand(cfg.quantizer.codebook_size) * 10 + 0.1
        embed = torch.randn(cfg.quantizer.codebook_size, model.hidden_dim)
        n = counts.sum()
        smoothed = (counts + 1e-5) / (n + cfg.quantizer.codebook_size * 1e-5) * n
        weight = torch.zeros(cfg.quantizer.codebook_size + 1, model.hidden_dim)
        weight[:-1] = embed / smoothed[:, None]
        state[f"quantizer.codebooks.{d}.weight"] = weight
        state[f"quantizer.codebooks.{d}.cluster_size_ema"] = counts
        state[f"quantizer.codebooks.{d}.embed_ema"] = embed
    state[OFFICIAL_PREFIX + "memory_attention.layers.0.linear1.weight"] = torch.randn(4, 4)
    state[OFFICIAL_PREFIX + "maskmem_tpos_enc"] = torch.randn(7, 1, 1, 64)
    payload = {"state_dict": {"hf_model." + k: v for k, v in state.items()}} if wrap else state
    torch.save(payload, path)
    return state


@pytest.mark.parametrize("wrap", [False, True])
def test_export_lands_every_tensor(tmp_path, wrap):
    from samtok.tokenizer import SAMTokenizer

    cfg = TokenizerModelConfig(sam2=MICRO)
    state = fake_official_file(tmp_path / "official.pth", cfg, wrap=wrap)
    info = export_official(tmp_path / "official.pth", tmp_path / "out", model_config=cfg)
    assert info["conversion"]["dropped_video_memory"] == 2
    tok = SAMTokenizer.from_pretrained(tmp_path / "out")
    for k, v in tok.model.state_dict().items():
        src = state[k if k.startswith("quantizer.") else OFFICIAL_PREFIX + k]
        assert torch.equal(v, src), k
    assert max(codebook_ema_consistency(tok.model)) < 1e-5


def test_export_refuses_truncated_and_incomplete_files(tmp_path):
    cfg = TokenizerModelConfig(sam2=MICRO)
    fake_official_file(tmp_path / "official.pth", cfg)
    data = (tmp_path / "official.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        export_official(tmp_path / "truncated.pth", tmp_path / "o1", model_config=cfg)
    state = torch.load(tmp_path / "official.pth", weights_only=True)
    del state[OFFICIAL_PREFIX + "sam_mask_encoder.mask_tokens.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        export_official(tmp_path / "partial.pth", tmp_path / "o2", model_config=cfg)
    assert not (tmp_path / "o2").exists()
    with pytest.raises(CheckpointError, match="not found"):
        export_official(tmp_path / "nope.pth", tmp_path / "o3", model_config=cfg)
