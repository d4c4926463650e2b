"""One config system for every command: dataclass schemas + OmegaConf YAML + ``key=value`` overrides.

Each stage declares its config as a (nested) dataclass whose defaults are documented in place.
A YAML file is merged onto that schema, then command-line overrides; OmegaConf's structured
configs turn unknown keys and wrong types into errors, which we re-raise as :class:`ConfigError`
naming the file (or the command line) and the key.

A YAML file may start from another one with ``_base_: other.yaml`` (path relative to the file);
the base is merged first, then the file's own keys.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from samtok.core.errors import SamtokError

T = TypeVar("T")

BASE_KEY = "_base_"


class ConfigError(SamtokError):
    """A config file or override is wrong; the message names where and which key."""


def repo_root() -> Path:
    """The checkout this package was installed from (editable install) or the package folder."""
    return Path(__file__).resolve().parents[2]


def resolve_config_path(path: str | Path) -> Path:
    """Find a config by path, or by name under the repository's ``configs/`` (``sft/tiny``)."""
    p = Path(path)
    if p.is_file():
        return p
    candidates = [repo_root() / "configs" / p, repo_root() / "configs" / p.with_suffix(".yaml")]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file not found: {path} (also looked in {repo_root() / 'configs'})")


def _load_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(s) for s in (*seen, path))
        raise ConfigError(f"{path}: circular {BASE_KEY} chain: {chain}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml parse errors come in several types
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    if node is None:
        node = OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(node).__name__}")
    base = node.pop(BASE_KEY, None) if BASE_KEY in node else None
    if base is None:
        return node
    base_path = (path.parent / str(base)).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: {BASE_KEY} file not found: {base_path}")
    merged = _load_yaml_with_bases(base_path, (*seen, path))
    return OmegaConf.merge(merged, node)


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = (str(getattr(exc, "msg", "") or exc).splitlines() or [""])[0]
    if isinstance(exc, ConfigKeyError):
        what = "unknown key"
    elif isinstance(exc, ValidationError):
        what = "wrong type or value for"
    else:
        what = "invalid"
    where = f" '{key}'" if key else ""
    return ConfigError(f"{source}: {what}{where}: {msg}")


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build a ``schema`` instance from its defaults, an optional YAML file and ``key=value`` overrides.

    Raises :class:`ConfigError` for unknown keys, wrong types, malformed overrides or missing files.
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    cfg = OmegaConf.structured(schema)
    if path is not None:
        resolved = resolve_config_path(path)
        node = _load_yaml_with_bases(resolved)
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(resolved)) from exc
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line: cannot parse overrides {list(overrides)}: {exc}") from exc
        try:
            cfg = OmegaConf.merge(cfg, dot)
        except OmegaConfBaseException as exc:
            raise _explain(exc, "command line") from exc
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path) if path else "config") from exc


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (dataclass instance or OmegaConf node)."""
    node = cfg if isinstance(cfg, (DictConfig, ListConfig)) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def to_dict(cfg: Any) -> dict:
    node = cfg if isinstance(cfg, (DictConfig, ListConfig)) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``run_dir`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / name
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(out)
    return out


def print_config(cfg: Any, title: str = "config", stream: io.TextIOBase | None = None) -> None:
    import sys

    stream = stream or sys.stderr
    text = to_yaml(cfg).rstrip()
    print(f"── {title} ──\n{text}\n", file=stream)


def from_dict(schema: type[T], data: dict, source: str = "dict") -> T:
    """Validate a plain dict (e.g. a saved ``config.json``) against ``schema``."""
    cfg = OmegaConf.structured(schema)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from exc
