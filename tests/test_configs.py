"""Every YAML shipped under configs/ loads against its schema and builds what it describes."""

from pathlib import Path

import pytest

from samtok.core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def schema_for(path: Path):
    """The config class of a YAML, by its folder under configs/."""
    kind = path.relative_to(ROOT / "configs").parts[0]
    if kind == "synth":
        from samtok.data.synth.config import SynthConfig

        return SynthConfig
    if kind == "tokenizer":
        from samtok.tokenizer.train import TrainTokenizerConfig

        return TrainTokenizerConfig
    if kind == "sft":
        from samtok.mllm.train_sft import SFTConfig

        return SFTConfig
    if kind == "scene_qa":
        from samtok.mllm.scene_qa import SceneQAConfig

        return SceneQAConfig
    if kind == "eval":
        from samtok.eval.config import EvalConfig

        return EvalConfig
    if kind == "rl" and "mixtures" not in path.parts:
        from samtok.rl.config import GRPOConfig

        return GRPOConfig
    return None  # data mixtures are checked by test_mixture_configs


def test_there_are_configs_of_every_stage():
    kinds = {p.relative_to(ROOT / "configs").parts[0] for p in CONFIGS}
    assert {"synth", "tokenizer", "data", "sft", "rl", "eval"} <= kinds


@pytest.mark.parametrize("path", [p for p in CONFIGS if schema_for(p) is not None], ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads_and_builds(path):
    schema = schema_for(path)
    cfg = load_config(schema, path)
    kind = path.relative_to(ROOT / "configs").parts[0]
    if kind == "tokenizer":
        from samtok.tokenizer.model import SAMTokModel, state_dict_shapes

        if cfg.model.sam2.image_size <= 256:
            model = SAMTokModel(cfg.model)  # the tiny one is built for real
            assert model.quantizer.codebooks[0].weight.shape[0] == cfg.model.quantizer.codebook_size + 1
        else:
            shapes = state_dict_shapes(cfg.model)  # release sizes: layout only
            assert "sam_mask_encoder.mask_tokens.weight" in shapes
    elif kind == "sft":
        if cfg.model.path is None:
            from samtok.mllm.models import build_tiny

            model, processor = build_tiny(cfg.model.tiny, corpus=["please segment the red star", "No target."])
            assert len(processor.tokenizer) > 514
        else:
            assert cfg.lora.enabled and cfg.lora.r == 128 and cfg.lora.alpha == 256  # the release's recipe
    elif kind == "eval":
        from samtok.eval.config import check_config

        check_config(cfg)
    elif kind == "synth":
        assert cfg.image_size > 0
    elif kind == "scene_qa":
        from samtok.mllm.train_sft import SFTConfig

        cfg.validate()
        # the vision-path check and the pretraining are about the embedded SFT model: the same sizes
        assert cfg.model == load_config(SFTConfig, ROOT / "configs/sft/tiny.yaml").model.tiny


@pytest.mark.parametrize("path", [p for p in CONFIGS if "data" in p.relative_to(ROOT / "configs").parts[:1]
                                  or "mixtures" in p.parts], ids=lambda p: str(p.relative_to(ROOT)))
def test_mixture_configs(path):
    from samtok.data.mixture import load_mixture_config

    cfg = load_mixture_config(path)
    assert cfg.entries and all(e.name for e in cfg.entries)


def test_unknown_key_in_a_shipped_preset_is_named(tmp_path):
    from samtok.mllm.train_sft import SFTConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: " + str(ROOT / "configs/sft/tiny.yaml") + "\noptim:\n  lr_warmup: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lr_warmup'"):
        load_config(SFTConfig, bad)
