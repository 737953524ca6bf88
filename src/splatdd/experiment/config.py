"""The typed experiment config: what to distil, how, and how to evaluate it; TOML in and out.

An :class:`ExperimentConfig` names everything a run needs, so a results folder can be re-run from
the ``config.toml`` it holds. Plugin options stay free-form tables (each plugin validates its own and
names unknown keys), everything else is typed and checked by :meth:`ExperimentConfig.validate`.

TOML layout (every key optional except ``ipc``; ``splatdd config show fmnist-pixel-dm-ipc1`` prints a
complete one)::

    name = "my-run"
    parameterization = "gaussian"
    algorithm = "dm"
    ipc = 1
    iterations = 300
    seed = 0

    [dataset]
    name = "fashion_mnist"

    [param_options]
    gpc = 11

    [algo_options]
    batch_real = 64

    [eval]
    protocol = "paper"
    models = ["ConvNet"]
    runs = 3

Example::

    from splatdd.experiment import ExperimentConfig
    cfg = ExperimentConfig.from_toml(open("exp.toml").read())
    cfg = cfg.with_overrides(["iterations=5", "eval.runs=0"])
    print(cfg.to_toml())
"""
from __future__ import annotations

import dataclasses
import json
import math
try:                                     # Python >= 3.11
    import tomllib
except ImportError:                      # pragma: no cover - Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["ConfigError", "DatasetConfig", "EvalConfig", "ExperimentConfig", "parse_value",
           "load_config", "INIT_MODES"]

#: How the stored items start: from random real images (``init_from_real``) or the plugin's own.
INIT_MODES = ("real", "noise")


class ConfigError(ValueError):
    """An experiment config is malformed; the message names the key and what was wrong."""


def parse_value(text: str) -> Any:
    """A ``key=value`` value from the command line: JSON if it parses (numbers, booleans, lists,
    quoted strings), ``True``/``False``/``None`` as Python spells them, else the string itself."""
    low = text.strip()
    if low in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[low]
    try:
        return json.loads(low)
    except json.JSONDecodeError:
        return text


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(float(v))


@dataclass
class DatasetConfig:
    """The real data: a dataset splatdd loads (:func:`splatdd.data.load_dataset`)."""

    name: str = "fashion_mnist"
    #: Folder of the data (CIFAR pickles, an image folder); ``None``: the dataset's default place.
    root: str | None = None
    #: ``[H, W]`` to resize to; ``None``: the dataset's own resolution.
    resolution: list[int] | None = None
    #: ZCA-whiten (the CIFAR protocol of TM / GSDD).
    zca: bool = False


@dataclass
class EvalConfig:
    """How the distilled set is evaluated at the end (:mod:`splatdd.protocols`)."""

    #: Registered protocol name: ``paper`` (the field's hard-label protocol), ``cross-arch``,
    #: ``quick`` (development only), ``soft-label`` (sre2l plugin), ...
    protocol: str = "paper"
    #: Architectures; one row of results per model.
    models: list[str] = field(default_factory=lambda: ["ConvNet"])
    #: Networks trained per model (0: no evaluation).
    runs: int = 3
    #: Protocol options (e.g. ``epochs``, ``lr``, ``teacher``); the protocol checks them.
    options: dict[str, Any] = field(default_factory=dict)
    #: Also evaluate the initialised set before distillation (separates the gain of distilling
    #: from the gain of the parameterization's extra images).
    before: bool = False
    #: Evaluate every N iterations during distillation (0: only at the end).
    every: int = 0


@dataclass
class ExperimentConfig:
    """One distillation experiment. ``ipc`` is the storage budget in images per class."""

    ipc: int = 1
    parameterization: str = "pixel"
    algorithm: str = "dm"
    param_options: dict[str, Any] = field(default_factory=dict)
    algo_options: dict[str, Any] = field(default_factory=dict)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    #: Outer iterations; ``None``: the algorithm's paper default.
    iterations: int | None = None
    #: Learning rate of the parameterization's tensors; ``None``: its default for the algorithm's
    #: optimisation regime.
    lr: float | None = None
    seed: int = 0
    init: str = "real"
    #: Steps of ``init_from_real`` for parameterizations that fit (``None``: the plugin's default).
    init_steps: int | None = None
    checkpoint_every: int = 100
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: Run folder; ``None``: ``runs/<name>`` or ``runs/<dataset>_<param>_<algo>_ipc<ipc>``.
    out: str | None = None
    device: str = "cpu"
    #: torch CPU threads (0: torch's default).
    threads: int = 0
    #: Name of the experiment (a preset's name when it comes from one).
    name: str = ""
    #: Where the settings come from, e.g. ``"GSDD appendix A, Table 9, IPC 1"``.
    source: str = ""
    #: Free-text notes (e.g. unit conversions a preset made).
    notes: str = ""
    #: Commands that must have run first (e.g. ``splatdd buffer ...`` for trajectory matching).
    requires: list[str] = field(default_factory=list)

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (``None`` values dropped: TOML has no null)."""
        return _drop_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> "ExperimentConfig":
        """Build and :meth:`validate` from a nested dict; unknown keys raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
        data = dict(data)
        kw: dict[str, Any] = {}
        for sub, sub_cls in (("dataset", DatasetConfig), ("eval", EvalConfig)):
            if sub in data:
                kw[sub] = _build(sub_cls, data.pop(sub), f"{where}: [{sub}]")
        kw.update(_check_keys(cls, data, where))
        cfg = cls(**kw)
        cfg.validate(where=where)
        return cfg

    def to_toml(self) -> str:
        """TOML text that :meth:`from_toml` reads back into an equal config."""
        import tomli_w
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str, *, where: str = "config") -> "ExperimentConfig":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        return cls.from_dict(data, where=where)

    def save(self, path: str | Path) -> Path:
        """Write as TOML, atomically."""
        from splatdd.io_utils import atomic_write_bytes
        path = Path(path)
        atomic_write_bytes(path, self.to_toml().encode())
        return path

    # ---- overrides ----------------------------------------------------------------------------
    def with_overrides(self, items: Sequence[str] | Mapping[str, Any]) -> "ExperimentConfig":
        """A copy with dotted ``key=value`` overrides applied (``iterations=5``, ``eval.runs=0``,
        ``param_options.gpc=30``, ``dataset.resolution=[64,64]``); validated."""
        data = self.to_dict()
        pairs = items.items() if isinstance(items, Mapping) else [_split_kv(s) for s in items]
        for key, value in pairs:
            _set_dotted(data, key, value)
        return ExperimentConfig.from_dict(data, where="--set")

    def replace(self, **changes: Any) -> "ExperimentConfig":
        """``dataclasses.replace`` plus validation."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ---- derived ------------------------------------------------------------------------------
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        stem = self.name or (f"{self.dataset.name}_{self.parameterization}_{self.algorithm}"
                             f"_ipc{self.ipc}")
        return Path("runs") / stem

    def validate(self, *, where: str = "config") -> None:
        """Raise :class:`ConfigError` naming the first key whose type or range is wrong."""
        def bad(key: str, what: str, value: Any) -> ConfigError:
            return ConfigError(f"{where}: {key} must be {what}, got {value!r}")

        for key in ("parameterization", "algorithm"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v:
                raise bad(key, "a plugin name", v)
        if not _is_int(self.ipc) or self.ipc < 1:
            raise bad("ipc", "an integer >= 1", self.ipc)
        if self.iterations is not None and (not _is_int(self.iterations) or self.iterations < 0):
            raise bad("iterations", "an integer >= 0", self.iterations)
        if self.lr is not None and (not _is_num(self.lr) or self.lr <= 0):
            raise bad("lr", "a positive number", self.lr)
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad("seed", "an integer in [0, 2**63)", self.seed)
        if self.init not in INIT_MODES:
            raise bad("init", f"one of {', '.join(INIT_MODES)}", self.init)
        if self.init_steps is not None and (not _is_int(self.init_steps) or self.init_steps < 0):
            raise bad("init_steps", "an integer >= 0", self.init_steps)
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            raise bad("checkpoint_every", "an integer >= 0", self.checkpoint_every)
        if not _is_int(self.threads) or self.threads < 0:
            raise bad("threads", "an integer >= 0", self.threads)
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "a device name such as cpu or cuda:0", self.device)
        for key in ("param_options", "algo_options"):
            if not isinstance(getattr(self, key), dict):
                raise bad(key, "a table", getattr(self, key))
        for key in ("name", "source", "notes"):
            if not isinstance(getattr(self, key), str):
                raise bad(key, "a string", getattr(self, key))
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise bad("out", "a folder path", self.out)
        if not isinstance(self.requires, list) or not all(isinstance(r, str) for r in self.requires):
            raise bad("requires", "a list of strings", self.requires)
        d = self.dataset
        if not isinstance(d.name, str) or not d.name:
            raise bad("dataset.name", "a dataset name", d.name)
        if d.root is not None and not isinstance(d.root, str):
            raise bad("dataset.root", "a folder path", d.root)
        if d.resolution is not None:
            r = d.resolution
            if (not isinstance(r, list) or len(r) != 2 or not all(_is_int(x) and 1 <= x <= 8192
                                                                 for x in r)):
                raise bad("dataset.resolution", "[H, W] with 1 <= H, W <= 8192", r)
        if not isinstance(d.zca, bool):
            raise bad("dataset.zca", "true or false", d.zca)
        e = self.eval
        if not isinstance(e.protocol, str) or not e.protocol:
            raise bad("eval.protocol", "a protocol name", e.protocol)
        if (not isinstance(e.models, list) or not e.models
                or not all(isinstance(m, str) and m for m in e.models)):
            raise bad("eval.models", "a non-empty list of model names", e.models)
        if not _is_int(e.runs) or e.runs < 0:
            raise bad("eval.runs", "an integer >= 0", e.runs)
        if not isinstance(e.options, dict):
            raise bad("eval.options", "a table", e.options)
        if not isinstance(e.before, bool):
            raise bad("eval.before", "true or false", e.before)
        if not _is_int(e.every) or e.every < 0:
            raise bad("eval.every", "an integer >= 0", e.every)


def load_config(name_or_path: str | Path) -> ExperimentConfig:
    """A config from a TOML file, or a shipped preset by name (:mod:`splatdd.experiment.presets`)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"no such config file: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        return ExperimentConfig.from_toml(text, where=str(path))
    from splatdd.experiment.presets import load_preset
    return load_preset(str(name_or_path))


# ---- helpers ----------------------------------------------------------------------------------
def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    return dict(data)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    return cls(**_check_keys(cls, data, where))


def _split_kv(item: str) -> tuple[str, Any]:
    key, sep, value = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return key, parse_value(value)


_TABLES = {"dataset", "eval", "param_options", "algo_options", "eval.options"}


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[:i + 1])
        nxt = node.get(part)
        if nxt is None:
            if prefix not in _TABLES:
                raise ConfigError(f"--set {key}: {prefix!r} is not a table of the config")
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {prefix!r} is a value, not a table")
        node = nxt
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
