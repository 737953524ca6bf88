"""The plugin contracts: what a parameterization and a distillation algorithm must provide.

A *parameterization* owns the learnable tensors of a distilled dataset and decodes them to images
(`pixel`, `gaussian`, `siren`, `ld3m`). An *algorithm* turns a parameterization plus real data into a
loss per step (`dm`, `dc`, `tm`). Algorithms never look inside a parameterization: they only call
:meth:`Parameterization.decode` and read :attr:`Parameterization.labels`.

Plugins are classes registered through the entry-point groups ``splatdd.parameterizations`` and
``splatdd.algorithms`` (see :mod:`splatdd.registry`). Each declares :data:`PLUGIN_API_VERSION`,
the version of this module it was written for. Registration refuses a class that still has abstract
methods (naming them), an algorithm without a valid :data:`REGIMES` entry or with an unknown
:data:`LR_SCHEDULES` entry.

Algorithms and parameterizations never name each other: an algorithm declares its optimisation
*regime* (``"distribution"``, ``"gradient"``, ``"trajectory"``, ``"recover"``) and the loop asks the
parameterization for its optimiser under that regime (:meth:`Parameterization.optimizer_spec`). A new
algorithm of a known regime therefore gets every parameterization's deliberate learning rate; a
parameterization asked for a regime it has no setting for raises ``ValueError`` (never a fallback).

Example, a third-party algorithm (tests/test_third_party.py runs one end to end)::

    class MeanMatching(Algorithm):
        name = "meanmatch"
        api_version = splatdd.plugin_api.PLUGIN_API_VERSION
        regime = "distribution"            # optimise like DM
        def loss(self, param, step):
            ...

Version history: 2 -- ``optimizer_spec(regime)`` instead of ``optimizer_spec(algorithm_name)``,
``Algorithm.regime``/``lr_schedule``, ``after_step(param)``, ``learned_lr`` moved to the
:class:`LearnsEvalLR` protocol, abstract classes refused at registration.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import (Any, ClassVar, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar,
                    runtime_checkable)

import torch

#: Version of the plugin contract. A plugin whose ``api_version`` differs is refused at load time.
PLUGIN_API_VERSION = 2

#: Optimisation regimes an algorithm can declare (:attr:`Algorithm.regime`); a parameterization
#: chooses its optimiser and learning rate per regime (:meth:`Parameterization.optimizer_spec`):
#: ``distribution`` -- feature/distribution matching (DM); ``gradient`` -- gradient matching (DC);
#: ``trajectory`` -- trajectory matching (MTT/TM); ``recover`` -- decoupled recovery from a trained
#: model (SRe2L-style).
REGIMES: tuple[str, ...] = ("distribution", "gradient", "trajectory", "recover")

#: Learning-rate schedules an algorithm can ask the core loop for (:attr:`Algorithm.lr_schedule`).
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")

#: Exclusive upper bound of :func:`draw_seed`'s default range (seeds fit a signed 32-bit int).
SEED_HIGH = 2**31 - 1

_T = TypeVar("_T")


def draw_seed(generator: torch.Generator | None, high: int = SEED_HIGH) -> int:
    """One integer seed in ``[0, high)`` from ``generator`` (the only place plugins draw seeds for
    networks and DSA transforms, so every plugin consumes its generator the same way)::

        g = torch.Generator().manual_seed(0)
        seed = draw_seed(g)                     # e.g. for splatdd.augment.dsa(x, seed=seed)
    """
    return int(torch.randint(0, int(high), (1,), generator=generator).item())


def check_regime(regime: Any, *, what: str = "regime") -> str:
    """``regime`` if it is one of :data:`REGIMES`, else ``ValueError`` naming it and the valid ones::

        check_regime("distribution")            # -> "distribution"
    """
    if not isinstance(regime, str) or regime not in REGIMES:
        raise ValueError(f"{what} must be one of {', '.join(REGIMES)}; got {regime!r}")
    return regime


def regime_setting(table: Mapping[str, _T], regime: str, plugin: str) -> _T:
    """``table[regime]`` for a parameterization's per-regime settings; ``ValueError`` naming the
    plugin, the regime and the regimes it supports when the regime is unknown or not covered::

        lr = regime_setting({"distribution": 1.0, "gradient": 0.1}, "gradient", "pixel")  # 0.1
    """
    if not isinstance(regime, str) or regime not in table:
        known = ", ".join(r for r in REGIMES if r in table)
        what = "unknown regime" if regime not in REGIMES else "no optimiser setting for regime"
        raise ValueError(f"{plugin}: {what} {regime!r}; it has settings for: {known} "
                         f"(valid regimes: {', '.join(REGIMES)})")
    return table[regime]


@dataclass(frozen=True)
class DatasetSpec:
    """What a parameterization needs to know about the dataset it distils.

    ``mean``/``std`` are the per-channel normalisation the real images were given; decoded images are
    in the same normalised space as the real images the algorithm sees.
    """

    name: str
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    zca: bool = False

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.height, self.width)


@dataclass
class OptimizerSpec:
    """A parameterization's choice of optimiser for its tensors, for a given regime::

        OptimizerSpec([{"params": [x], "lr": 0.25}], kind="adam", betas=(0.5, 0.9)).build()

    A param group may carry ``"lr_scale"``: a tensor broadcastable to its (single) parameter that
    multiplies each element's step, i.e. a per-element learning rate ``lr * lr_scale``. The update of
    Adam and of SGD without weight decay is linear in the lr, so this is exact; it lets a
    parameterization keep its values in one tensor and still give some entries their own lr (e.g.
    gaussian's ``lr_cholesky``).
    """

    params: list[dict[str, Any]]          # torch param groups, each with its own "lr"
    kind: str = "adam"                    # "adam" or "sgd"
    momentum: float = 0.5                 # SGD only
    betas: tuple[float, float] | None = None   # Adam only; None: torch's (0.9, 0.999)

    def build(self) -> torch.optim.Optimizer:
        if self.kind == "adam":
            opt = (torch.optim.Adam(self.params) if self.betas is None
                   else torch.optim.Adam(self.params, betas=tuple(self.betas)))
        elif self.kind == "sgd":
            opt = torch.optim.SGD(self.params, momentum=self.momentum)
        else:
            raise ValueError(f"OptimizerSpec.kind must be 'adam' or 'sgd', got {self.kind!r}")
        _apply_lr_scales(opt)
        return opt


def _apply_lr_scales(opt: torch.optim.Optimizer) -> None:
    """Hooks that scale each step of the param groups with an ``"lr_scale"`` tensor."""
    scaled = []
    for group in opt.param_groups:
        scale = group.get("lr_scale")
        if scale is None:
            continue
        if len(group["params"]) != 1:
            raise ValueError("an 'lr_scale' param group must hold exactly one parameter")
        p = group["params"][0]
        scale = torch.as_tensor(scale, dtype=p.dtype, device=p.device)
        torch.broadcast_shapes(scale.shape, p.shape)      # raises naming both shapes
        scaled.append((p, scale))
    if not scaled:
        return
    before: list[torch.Tensor] = []

    def pre(*_: Any) -> None:
        before[:] = [p.detach().clone() for p, _ in scaled]

    def post(*_: Any) -> None:
        with torch.no_grad():
            for (p, scale), old in zip(scaled, before):
                p.copy_(old + (p - old) * scale)

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)


class Parameterization(torch.nn.Module, abc.ABC):
    """A distilled dataset stored in some compact form, decoded to images on demand.

    Subclasses are ``torch.nn.Module``s: their learnable tensors are ``nn.Parameter``s (fp32 masters),
    so ``.parameters()``, ``.to(device)`` and ``state_dict()`` work as usual.
    """

    #: Registry name (the entry-point name), e.g. ``"gaussian"``.
    name: ClassVar[str] = ""
    #: The plugin-API version the class was written for.
    api_version: ClassVar[int] = PLUGIN_API_VERSION

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def build(cls, spec: DatasetSpec, ipc: int, *, generator: torch.Generator | None = None,
              **options: Any) -> "Parameterization":
        """A fresh parameterization that fits the storage budget of ``ipc`` images per class.

        ``options`` are the plugin's own settings (e.g. ``gpc=`` for gaussian); unknown options raise
        ``TypeError`` naming them. Randomness comes only from ``generator``.
        """

    @abc.abstractmethod
    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor, *,
                       steps: int | None = None, progress: bool = False) -> dict[str, float]:
        """Initialise from real images ``(n, C, H, W)`` (normalised) with labels ``(n,)``: one real
        image per decoded image, ``n == len(self.labels)`` (not ``ipc`` per class), in the order of
        :attr:`labels` (class-major for the built-ins). :func:`splatdd.initialise.init_from_real`
        draws them. Returns diagnostics, e.g. ``{"mse": ...}``."""

    # ---- decoding -------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def labels(self) -> torch.Tensor:
        """``(n,)`` int64 class label of every decoded image (fixed, not learnable)."""

    @abc.abstractmethod
    def decode(self, indices: torch.Tensor | None = None, *,
               resolution: tuple[int, int] | None = None) -> torch.Tensor:
        """Differentiably decode images ``(len(indices), C, H, W)`` (all images when ``None``) at the
        dataset resolution or at ``resolution`` where the representation allows it."""

    def class_indices(self, c: int) -> torch.Tensor:
        """Indices of the decoded images of class ``c``."""
        return torch.nonzero(self.labels == c, as_tuple=False).flatten()

    @classmethod
    def storage_options(cls, spec: DatasetSpec, items_per_class: int,
                        bytes_per_item: float) -> dict[str, Any] | None:
        """Build options giving ``items_per_class`` decoded images per class of at most
        ``bytes_per_item`` stored bytes each (``splatdd fit`` compares parameterizations this way at
        equal storage, far below one image's pixels). ``None`` (the default): not supported, the
        user passes the options by hand."""
        return None

    @classmethod
    def quick_options(cls, spec: DatasetSpec, ipc: int, workdir: str | os.PathLike
                      ) -> dict[str, Any]:
        """Build options for a quick smoke run at ``spec``/``ipc`` that fit its storage budget (tiny
        sizes, few init steps); small files it needs (e.g. a tiny model) may be written under
        ``workdir`` (reused across calls). Other plugins' tests and :mod:`splatdd.testing` build
        every installed parameterization with these, never with options keyed on its name.
        Default ``{}``."""
        return {}

    # ---- optimisation hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def optimizer_spec(self, regime: str, lr: float | None = None) -> OptimizerSpec:
        """Optimiser for this parameterization's tensors under the optimisation ``regime`` (one of
        :data:`REGIMES`: the running algorithm's :attr:`Algorithm.regime`), with the learning rate
        and optimiser of the paper that tuned it; ``lr`` overrides the learning rate. A regime the
        plugin has no setting for raises ``ValueError`` naming it (see :func:`regime_setting`)."""

    def regularization(self) -> torch.Tensor | None:
        """Extra loss added to the algorithm's loss (e.g. gaussian's boundary loss), or ``None``."""
        return None

    @torch.no_grad()
    def post_step(self) -> None:
        """Called after every optimiser step (e.g. gaussian's centre clipping)."""

    # ---- storage --------------------------------------------------------------------------------
    @abc.abstractmethod
    def num_bytes(self) -> int:
        """Exact storage cost in bytes of what :meth:`state_tensors` saves."""

    @abc.abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store in the distilled file (in their storage dtype, e.g. bf16), CPU."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that, with :meth:`state_tensors`, rebuild this object."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, spec: DatasetSpec, tensors: Mapping[str, torch.Tensor],
                   config: Mapping[str, Any]) -> "Parameterization":
        """Rebuild from what :meth:`state_tensors` and :meth:`config` returned. Raises ``ValueError``
        naming the tensor or key that is missing or has the wrong shape."""


@dataclass
class RealData:
    """Real training data as an algorithm sees it (normalised, ZCA'd if the protocol says so).

    ``sample(c, n, generator)`` returns ``n`` random real images of class ``c`` on ``device``
    without moving the whole dataset there.
    """

    spec: DatasetSpec
    images: torch.Tensor            # (N, C, H, W) float32, CPU
    labels: torch.Tensor            # (N,) int64, CPU
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _by_class: list[torch.Tensor] | None = field(default=None, repr=False)

    def indices_of(self, c: int) -> torch.Tensor:
        if self._by_class is None:
            self._by_class = [torch.nonzero(self.labels == k, as_tuple=False).flatten()
                              for k in range(self.spec.num_classes)]
        return self._by_class[c]

    def sample(self, c: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = self.indices_of(c)
        if len(idx) == 0:
            raise ValueError(f"class {c} has no real images")
        pick = idx[torch.randperm(len(idx), generator=generator)[:n]]
        return self.images[pick].to(self.device)

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled epoch of ``(images, labels)`` batches on ``device``."""
        perm = torch.randperm(len(self.labels), generator=generator)
        for i in range(0, len(perm), batch_size):
            j = perm[i:i + batch_size]
            yield self.images[j].to(self.device), self.labels[j].to(self.device)


class Algorithm(abc.ABC):
    """A distillation objective: one loss per step over a parameterization and real data.

    The core's loop (:func:`splatdd.distill.run_step`) does, per step::

        loss = algo.loss(param, step)            # + param.regularization()
        loss.backward(); param_opt.step(); algo.after_step(param); param.post_step()

    where ``param_opt = param.optimizer_spec(algo.regime, lr).build()``.
    """

    name: ClassVar[str] = ""
    api_version: ClassVar[int] = PLUGIN_API_VERSION
    #: The optimisation regime (one of :data:`REGIMES`); decides the parameterization's optimiser.
    #: Required: registration refuses an algorithm without a valid one.
    regime: ClassVar[str] = ""
    #: Learning-rate schedule of the parameterization's optimiser over the run (one of
    #: :data:`LR_SCHEDULES`; the core loop applies it).
    lr_schedule: ClassVar[str] = "constant"
    #: Paper default number of outer iterations (used when the CLI gets no --iterations).
    default_iterations: ClassVar[int] = 1000
    #: How the algorithm runs on several processes (torchrun; :mod:`splatdd.distributed`):
    #: ``"sum"``: each rank computes the loss terms :func:`splatdd.distributed.owned` gives it
    #: (e.g. its classes) and the gradients are summed; ``"mean"``: each rank computes an
    #: independent replica (e.g. its own expert segment) and the gradients are averaged;
    #: ``None``: single-process only (a multi-process run refuses it).
    gradient_reduction: ClassVar[str | None] = None

    def __init__(self, real: RealData, *, ipc: int, generator: torch.Generator,
                 **options: Any) -> None:
        self.real = real
        self.ipc = ipc
        self.generator = generator

    @abc.abstractmethod
    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        """The differentiable loss of one outer step (a scalar)."""

    @classmethod
    def quick_options(cls, real: RealData, ipc: int, workdir: str | os.PathLike
                      ) -> dict[str, Any]:
        """Options for a quick smoke run on ``real`` (tiny networks, few inner steps); files the
        algorithm needs (e.g. TM's expert buffer) may be made under ``workdir`` (reused across
        calls). Used by :mod:`splatdd.testing` so that tests run every installed algorithm without
        naming it. Default ``{}``."""
        return {}

    def extra_parameters(self) -> list[torch.Tensor]:
        """The algorithm's own learnable tensors stepped in :meth:`after_step` (e.g. TM's learned
        lr); in a multi-process run their gradients are reduced like the parameterization's."""
        return []

    def after_step(self, param: Parameterization) -> None:
        """Called after the parameterization's optimiser step, with the parameterization (e.g. TM
        steps its lr optimiser, DC trains its network on ``param.decode()``)."""

    def state_dict(self) -> dict[str, Any]:
        """Algorithm state for resumable checkpoints (optimisers, learned lr, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings, recorded in the distilled file's metadata."""
        return {}


@runtime_checkable
class LearnsEvalLR(Protocol):
    """An algorithm that learns the learning rate evaluation should train with (TM's learnable
    ``syn_lr``). It implements one method; the core stores its value in the distilled file::

        class MyTM(Algorithm):
            regime = "trajectory"
            def learned_lr(self) -> float:
                return float(self.syn_lr)
    """

    def learned_lr(self) -> float:
        """The learned evaluation learning rate, as a float."""
        ...


def learned_eval_lr(algo: Any) -> float | None:
    """The evaluation learning rate ``algo`` learned (:class:`LearnsEvalLR`), else ``None``. The one
    function the core calls for it::

        learned_eval_lr(tm_algo)       # e.g. 0.0123
        learned_eval_lr(dm_algo)       # None
    """
    if isinstance(algo, LearnsEvalLR):
        value = algo.learned_lr()
        return None if value is None else float(value)
    return None


def check_plugin_class(obj: Any, kind: str) -> None:
    """Raise ``TypeError``/``ValueError`` if ``obj`` is not a valid plugin class of ``kind``
    (``"parameterization"`` or ``"algorithm"``): not a subclass of the base, no ``name``, another
    plugin-API version, abstract methods left unimplemented (named), or, for an algorithm, a
    ``regime`` not in :data:`REGIMES` or an ``lr_schedule`` not in :data:`LR_SCHEDULES`::

        check_plugin_class(MyAlgorithm, "algorithm")
    """
    base = Parameterization if kind == "parameterization" else Algorithm
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TypeError(f"{kind} plugin must be a subclass of splatdd.plugin_api.{base.__name__}, "
                        f"got {obj!r}")
    if not obj.name:
        raise ValueError(f"{kind} plugin {obj.__name__} has no `name`")
    if obj.api_version != PLUGIN_API_VERSION:
        raise ValueError(f"{kind} plugin {obj.name!r} was written for plugin API "
                         f"v{obj.api_version}; this splatdd provides v{PLUGIN_API_VERSION}")
    missing = sorted(getattr(obj, "__abstractmethods__", ()) or ())
    if missing:
        raise TypeError(f"{kind} plugin {obj.name!r} ({obj.__module__}.{obj.__qualname__}) is "
                        f"abstract: it does not implement {', '.join(missing)} (required by "
                        f"splatdd.plugin_api.{base.__name__})")
    if base is Algorithm:
        check_regime(obj.regime, what=f"algorithm plugin {obj.name!r}: `regime`")
        if obj.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"algorithm plugin {obj.name!r}: `lr_schedule` must be one of "
                             f"{', '.join(LR_SCHEDULES)}; got {obj.lr_schedule!r}")
        if obj.gradient_reduction not in (None, "sum", "mean"):
            raise ValueError(f"algorithm plugin {obj.name!r}: `gradient_reduction` must be "
                             f"'sum', 'mean' or None; got {obj.gradient_reduction!r}")


def reject_unknown_options(plugin: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raise ``TypeError`` naming the plugin, each unknown option in ``given`` and the ``known``
    ones; do nothing when every option is known. For ``build(**options)`` and ``__init__``::

        reject_unknown_options("gaussian", options, ("gpc", "points", "bf16"))
    """
    known = list(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{plugin}: unknown option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(known) or 'none'}")


__all__: Sequence[str] = ["PLUGIN_API_VERSION", "REGIMES", "LR_SCHEDULES", "SEED_HIGH",
                          "DatasetSpec", "OptimizerSpec", "Parameterization", "RealData",
                          "Algorithm", "LearnsEvalLR", "learned_eval_lr", "check_plugin_class",
                          "check_regime", "regime_setting", "draw_seed", "reject_unknown_options"]
