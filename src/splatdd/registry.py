"""Plugin discovery and loading.

Plugins are found through three entry-point groups:

``splatdd.parameterizations``
    classes implementing :class:`splatdd.plugin_api.Parameterization` (``pixel``, ``gaussian``, ...)
``splatdd.algorithms``
    classes implementing :class:`splatdd.plugin_api.Algorithm` (``dm``, ``dc``, ``tm``)
``splatdd.commands``
    a callable ``register(subparsers)`` that adds subcommands to the ``splatdd`` CLI
``splatdd.protocols``
    classes implementing :class:`splatdd.protocols.EvalProtocol` (``paper``, ``cross-arch``,
    ``quick``, ``soft-label``, ...)

Listing (:meth:`Registry.list_plugins`) reads only the installed distributions' metadata: it never
imports a plugin. Loading is lazy and per plugin; a plugin that fails to import or to validate raises
:class:`PluginLoadError` (naming the plugin and carrying the original error) and is remembered in
:meth:`Registry.load_errors`, while every other plugin still loads. The core never imports a plugin
by name: the built-in plugins use exactly the same entry points a third party would.

State lives in :class:`Registry` objects. The module-level functions use one default instance
(:func:`default_registry`); tests create their own ``Registry()`` and register classes directly::

    reg = Registry(entry_points=False)
    reg.register("parameterization", MyPixels)
    with reg.registered("algorithm", MyAlgo):
        ...
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from splatdd.plugin_api import Algorithm, Parameterization, check_plugin_class

__all__ = ["GROUPS", "KINDS", "PluginInfo", "PluginLoadError", "UnknownPluginError", "Registry",
           "default_registry", "list_plugins", "get_parameterization", "get_algorithm",
           "get_command", "load_commands", "register", "unregister", "registered", "load_errors",
           "distribution_of"]

#: kind -> entry-point group
GROUPS: dict[str, str] = {
    "parameterization": "splatdd.parameterizations",
    "algorithm": "splatdd.algorithms",
    "command": "splatdd.commands",
    "protocol": "splatdd.protocols",
}
KINDS: tuple[str, ...] = tuple(GROUPS)

_ALIASES = {
    "parameterization": "parameterization", "parameterizations": "parameterization",
    "param": "parameterization", "params": "parameterization",
    "splatdd.parameterizations": "parameterization",
    "algorithm": "algorithm", "algorithms": "algorithm", "algo": "algorithm", "algos": "algorithm",
    "splatdd.algorithms": "algorithm",
    "command": "command", "commands": "command", "splatdd.commands": "command",
    "protocol": "protocol", "protocols": "protocol", "splatdd.protocols": "protocol",
}


def _kind(kind: str) -> str:
    try:
        return _ALIASES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}") from None


@dataclass(frozen=True)
class PluginInfo:
    """One installed or registered plugin, as listed without importing it."""

    kind: str                    # "parameterization" | "algorithm" | "command"
    name: str                    # entry-point (registry) name
    value: str                   # entry-point value "module:attr", or "<registered> module.Class"
    distribution: str | None     # providing distribution, e.g. "splatdd-pixel"
    version: str | None          # its version
    source: str = "entry_point"  # "entry_point" | "registered"
    shadowed_by: str | None = None  # set when another plugin of the same name takes precedence

    @property
    def active(self) -> bool:
        return self.shadowed_by is None


class PluginLoadError(RuntimeError):
    """A plugin could not be imported or is not a valid plugin. ``__cause__``/``original`` holds the
    original exception."""

    def __init__(self, kind: str, name: str, value: str, original: BaseException,
                 distribution: str | None = None) -> None:
        self.kind, self.name, self.value, self.original = kind, name, value, original
        self.distribution = distribution
        dist = f" from {distribution}" if distribution else ""
        super().__init__(f"{kind} plugin {name!r} ({value}{dist}) failed to load: "
                         f"{type(original).__name__}: {original}")

    def format_original(self) -> str:
        """The original traceback, for ``splatdd plugins --verbose``."""
        return "".join(traceback.format_exception(type(self.original), self.original,
                                                  self.original.__traceback__))


class UnknownPluginError(KeyError):
    """No plugin of that kind and name is installed or registered."""

    def __init__(self, kind: str, name: str, available: Sequence[str]) -> None:
        self.kind, self.name, self.available = kind, name, list(available)
        super().__init__(name)

    def __str__(self) -> str:
        avail = ", ".join(self.available) if self.available else "none"
        return (f"no {self.kind} plugin named {self.name!r}; installed: {avail} "
                f"(see `splatdd plugins`)")


def _ep_dist(ep: md.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # noqa: BLE001 - broken metadata must not break listing
        return None, None


def _norm_dist(name: str | None) -> str:
    return (name or "").lower().replace("_", "-").replace(".", "-")


class Registry:
    """Plugin registry: installed entry points plus directly registered classes.

    ``entry_points``: ``True`` (default) reads the installed distributions via
    :mod:`importlib.metadata` (on ``sys.path`` at the time of each call, or on ``path`` if given);
    ``False`` ignores installed plugins (tests that only use :meth:`register`).
    Directly registered classes take precedence over entry points of the same name.
    """

    def __init__(self, *, entry_points: bool = True, path: Sequence[str] | None = None) -> None:
        self._use_eps = bool(entry_points)
        self._path = list(path) if path is not None else None
        self._registered: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._loaded: dict[tuple[str, str], Any] = {}
        self._errors: dict[tuple[str, str], PluginLoadError] = {}
        self._lock = threading.RLock()

    # ---- discovery (no imports) ---------------------------------------------------------------
    def _entry_points(self, kind: str) -> list[md.EntryPoint]:
        if not self._use_eps:
            return []
        group = GROUPS[kind]
        if self._path is None:
            eps = list(md.entry_points(group=group))
        else:
            eps, seen = [], set()
            for dist in md.distributions(path=self._path):
                key = _norm_dist(dist.metadata["Name"])
                if key in seen:
                    continue
                seen.add(key)
                eps.extend(ep for ep in dist.entry_points if ep.group == group)
        return eps

    def _active_entry_points(self, kind: str) -> dict[str, md.EntryPoint]:
        active: dict[str, md.EntryPoint] = {}
        for ep in self._entry_points(kind):
            active.setdefault(ep.name, ep)   # first on the path wins, like Python imports
        return active

    def list_plugins(self, kind: str) -> list[PluginInfo]:
        """All plugins of ``kind`` (installed and registered), sorted by name, without importing
        any. Entries hidden by an earlier one of the same name have ``shadowed_by`` set."""
        kind = _kind(kind)
        infos: list[PluginInfo] = []
        winners: dict[str, str] = {}
        with self._lock:
            registered = dict(self._registered[kind])
        for name, obj in registered.items():
            mod = getattr(obj, "__module__", "?")
            qual = getattr(obj, "__qualname__", repr(obj))
            dist, ver = distribution_of(obj) if mod not in ("__main__",) else (None, None)
            infos.append(PluginInfo(kind, name, f"<registered> {mod}:{qual}", dist, ver,
                                    source="registered"))
            winners[name] = "registered"
        for ep in self._entry_points(kind):
            dist, ver = _ep_dist(ep)
            shadow = winners.get(ep.name)
            infos.append(PluginInfo(kind, ep.name, ep.value, dist, ver, shadowed_by=shadow))
            winners.setdefault(ep.name, f"{dist or '?'} ({ep.value})")
        infos.sort(key=lambda i: (i.name, i.shadowed_by is not None))
        return infos

    def names(self, kind: str) -> list[str]:
        """Names of the active plugins of ``kind`` (no imports)."""
        return sorted({i.name for i in self.list_plugins(kind) if i.active})

    # ---- loading ------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """Load (once) and validate the plugin ``name`` of ``kind``.

        Raises :class:`UnknownPluginError` if there is none, :class:`PluginLoadError` if it is
        broken (import error, wrong type, wrong ``name`` or plugin-API version)."""
        kind = _kind(kind)
        with self._lock:
            if name in self._registered[kind]:
                return self._registered[kind][name]
            key = (kind, name)
            if key in self._loaded:
                return self._loaded[key]
            if key in self._errors:
                raise self._errors[key]
        ep = self._active_entry_points(kind).get(name)
        if ep is None:
            raise UnknownPluginError(kind, name, self.names(kind))
        dist, _ = _ep_dist(ep)
        try:
            obj = ep.load()
            self._validate(kind, name, obj)
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin is reported by name
            err = PluginLoadError(kind, name, ep.value, exc, dist)
            err.__cause__ = exc
            with self._lock:
                self._errors[key] = err
            raise err from exc
        with self._lock:
            self._loaded[key] = obj
        return obj

    @staticmethod
    def _validate(kind: str, name: str, obj: Any) -> None:
        if kind == "command":
            if not callable(obj):
                raise TypeError(f"a splatdd.commands entry point must be a callable "
                                f"register(subparsers), got {obj!r}")
            return
        if kind == "protocol":
            from splatdd.protocols import check_protocol_class
            check_protocol_class(obj)
        else:
            check_plugin_class(obj, kind)
        if obj.name != name:
            raise ValueError(f"class {obj.__qualname__} declares name {obj.name!r} but is "
                             f"installed under the entry-point name {name!r}")

    def get_parameterization(self, name: str) -> type[Parameterization]:
        return self.get("parameterization", name)

    def get_algorithm(self, name: str) -> type[Algorithm]:
        return self.get("algorithm", name)

    def get_command(self, name: str) -> Callable[..., Any]:
        return self.get("command", name)

    def load_all(self, kind: str) -> dict[str, Any]:
        """Load every active plugin of ``kind``; broken ones are skipped (see :meth:`load_errors`)."""
        kind = _kind(kind)
        out: dict[str, Any] = {}
        for name in self.names(kind):
            try:
                out[name] = self.get(kind, name)
            except PluginLoadError:
                pass
        return out

    def load_errors(self, kind: str | None = None) -> dict[tuple[str, str], PluginLoadError]:
        """``{(kind, name): PluginLoadError}`` for every plugin that failed to load so far."""
        with self._lock:
            errs = dict(self._errors)
        if kind is not None:
            k = _kind(kind)
            errs = {key: e for key, e in errs.items() if key[0] == k}
        return errs

    # ---- direct registration (tests, notebooks) -----------------------------------------------
    def register(self, kind: str, obj: Any, name: str | None = None, *, replace: bool = False
                 ) -> Any:
        """Register a plugin class (or, for ``"command"``, a ``register(subparsers)`` callable)
        without installing anything. Validated like an entry point. Returns ``obj`` (so it works as
        a decorator via ``functools.partial``)."""
        kind = _kind(kind)
        if name is None:
            name = getattr(obj, "name", None) if kind != "command" else getattr(obj, "__name__", None)
        if not name:
            raise ValueError(f"cannot register {obj!r}: no name given and it has no `name`")
        self._validate(kind, name, obj)
        with self._lock:
            if name in self._registered[kind] and not replace:
                raise ValueError(f"a {kind} plugin named {name!r} is already registered "
                                 f"(pass replace=True)")
            self._registered[kind][name] = obj
        return obj

    def unregister(self, kind: str, name: str) -> None:
        kind = _kind(kind)
        with self._lock:
            if name not in self._registered[kind]:
                raise UnknownPluginError(kind, name, sorted(self._registered[kind]))
            del self._registered[kind][name]

    @contextlib.contextmanager
    def registered(self, kind: str, obj: Any, name: str | None = None) -> Iterator[Any]:
        """Context manager: ``obj`` is registered inside the block only."""
        kind = _kind(kind)
        if name is None:
            name = getattr(obj, "name", None) if kind != "command" else getattr(obj, "__name__", None)
        with self._lock:
            previous = self._registered[kind].get(name)
        self.register(kind, obj, name, replace=True)
        try:
            yield obj
        finally:
            with self._lock:
                if previous is None:
                    self._registered[kind].pop(name, None)
                else:
                    self._registered[kind][name] = previous

    def clear_cache(self) -> None:
        """Forget loaded classes and load errors (not registrations)."""
        with self._lock:
            self._loaded.clear()
            self._errors.clear()

    # ---- provenance ---------------------------------------------------------------------------
    def provenance(self, kind: str, name: str) -> dict[str, str | None]:
        """``{"name", "distribution", "version"}`` of an active plugin, without importing it."""
        for info in self.list_plugins(kind):
            if info.name == name and info.active:
                return {"name": name, "distribution": info.distribution, "version": info.version}
        raise UnknownPluginError(_kind(kind), name, self.names(kind))


_packages_cache: dict[str, list[str]] | None = None


def distribution_of(obj: Any) -> tuple[str | None, str | None]:
    """(distribution name, version) that provides the module defining ``obj``, if installed."""
    global _packages_cache
    module = getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    if not top:
        return None, None
    if _packages_cache is None:
        try:
            _packages_cache = md.packages_distributions()
        except Exception:  # noqa: BLE001
            _packages_cache = {}
    for dist_name in _packages_cache.get(top, []):
        try:
            return dist_name, md.version(dist_name)
        except md.PackageNotFoundError:
            continue
    return None, None


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry used by the CLI and the module-level helpers."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default


def _reg(registry: Registry | None) -> Registry:
    return registry if registry is not None else default_registry()


def list_plugins(kind: str, *, registry: Registry | None = None) -> list[PluginInfo]:
    return _reg(registry).list_plugins(kind)


def get_parameterization(name: str, *, registry: Registry | None = None
                         ) -> type[Parameterization]:
    return _reg(registry).get_parameterization(name)


def get_algorithm(name: str, *, registry: Registry | None = None) -> type[Algorithm]:
    return _reg(registry).get_algorithm(name)


def get_command(name: str, *, registry: Registry | None = None) -> Callable[..., Any]:
    return _reg(registry).get_command(name)


def load_commands(*, registry: Registry | None = None) -> dict[str, Callable[..., Any]]:
    return _reg(registry).load_all("command")


def register(kind: str, obj: Any, name: str | None = None, *, replace: bool = False,
             registry: Registry | None = None) -> Any:
    return _reg(registry).register(kind, obj, name, replace=replace)


def unregister(kind: str, name: str, *, registry: Registry | None = None) -> None:
    _reg(registry).unregister(kind, name)


def registered(kind: str, obj: Any, name: str | None = None, *,
               registry: Registry | None = None):
    return _reg(registry).registered(kind, obj, name)


def load_errors(kind: str | None = None, *, registry: Registry | None = None
                ) -> dict[tuple[str, str], PluginLoadError]:
    return _reg(registry).load_errors(kind)

