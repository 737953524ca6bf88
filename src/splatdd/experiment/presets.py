"""Presets: every published distillation setting, shipped as TOML inside the package.

Each ``*.toml`` file in ``splatdd/experiment/presets/`` holds presets as top-level tables named by
the preset (``[gsdd-cifar10-tm-ipc1]``); each table is an :class:`ExperimentConfig` whose ``source``
cites the paper's table and row. ``splatdd config list`` lists them, ``splatdd config show NAME``
prints one as a complete TOML file, ``splatdd distill --config NAME`` runs it.

Example::

    from splatdd.experiment.presets import list_presets, load_preset
    for p in list_presets():
        print(p.name, "|", p.source)
    cfg = load_preset("gsdd-cifar10-tm-ipc1")
"""
from __future__ import annotations

import difflib
try:                                     # Python >= 3.11
    import tomllib
except ImportError:                      # pragma: no cover - Python 3.10
    import tomli as tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from splatdd.experiment.config import ConfigError, ExperimentConfig

__all__ = ["PresetInfo", "list_presets", "load_preset", "preset_names"]


@dataclass(frozen=True)
class PresetInfo:
    name: str
    source: str
    file: str
    parameterization: str
    algorithm: str
    ipc: int
    dataset: str


@lru_cache(maxsize=1)
def _tables() -> dict[str, tuple[str, dict[str, Any]]]:
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    folder = resources.files("splatdd.experiment").joinpath("presets")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        try:
            data = tomllib.loads(entry.read_text())
        except tomllib.TOMLDecodeError as exc:  # a broken shipped file is a bug: say where
            raise ConfigError(f"preset file {entry.name}: {exc}") from None
        for name, table in data.items():
            if name in out:
                raise ConfigError(f"preset {name!r} is defined in both {out[name][0]} and "
                                  f"{entry.name}")
            out[name] = (entry.name, table)
    return out


def preset_names() -> list[str]:
    return sorted(_tables())


def load_preset(name: str) -> ExperimentConfig:
    """The preset ``name`` as a validated :class:`ExperimentConfig` (its ``name`` set)."""
    tables = _tables()
    if name not in tables:
        close = difflib.get_close_matches(name, list(tables), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"no preset named {name!r}{hint} (`splatdd config list` lists "
                          f"{len(tables)})")
    file, table = tables[name]
    cfg = ExperimentConfig.from_dict({"name": name, **table}, where=f"preset {name} ({file})")
    return cfg


def list_presets() -> list[PresetInfo]:
    """Every shipped preset, sorted by name."""
    out = []
    for name in preset_names():
        cfg = load_preset(name)
        out.append(PresetInfo(name, cfg.source, _tables()[name][0], cfg.parameterization,
                              cfg.algorithm, cfg.ipc, cfg.dataset.name))
    return out
