from dataclasses import dataclass, field
from typing import Optional

import pytest

from samtok.core.config import ConfigError, load_config, save_config


@dataclass
class Inner:
    max_steps: int = 10
    lr: float = 1e-3
    name: Optional[str] = None


@dataclass
class Outer:
    trainer: Inner = field(default_factory=Inner)
    seed: int = 0


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  max_steps: 5\nseed: 3\n")
    cfg = load_config(Outer, f, ["trainer.lr=0.5"])
    assert cfg.trainer.max_steps == 5 and cfg.seed == 3 and cfg.trainer.lr == 0.5
    assert cfg.trainer.name is None


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trainer:\n  max_stepz: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, f)
    assert "bad.yaml" in str(e.value) and "trainer.max_stepz" in str(e.value) and "unknown key" in str(e.value)


def test_unknown_and_mistyped_overrides():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'foo'"):
        load_config(Outer, None, ["foo=1"])
    with pytest.raises(ConfigError, match=r"wrong type or value for 'trainer.lr'"):
        load_config(Outer, None, ["trainer.lr=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["seed"])


def test_missing_file_and_base_chain(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "base.yaml").write_text("seed: 7\ntrainer:\n  max_steps: 2\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrainer:\n  max_steps: 9\n")
    cfg = load_config(Outer, tmp_path / "child.yaml")
    assert (cfg.seed, cfg.trainer.max_steps) == (7, 9)
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(Outer, tmp_path / "loop.yaml")


def test_save_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["seed=11"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(Outer, path)
    assert again == cfg
