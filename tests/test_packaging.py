"""Every folder that is a package must be listed in pyproject (else a wheel install would miss it)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    # sub-packages of the root package that are mapped elsewhere are found through their mapping
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"


def test_everything_installs_under_samtok():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    names = set(cfg["packages"]) | set(cfg["package-dir"])
    assert all(n == "samtok" or n.startswith("samtok.") for n in names), names
