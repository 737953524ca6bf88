"""The plugin contracts: what a parameterization and a distillation algorithm must provide.

A *parameterization* owns the learnable tensors of a distilled dataset and decodes them to images
(`pixel`, `gaussian`, `siren`, `ld3m`). An *algorithm* turns a parameterization plus real data into a
loss per step (`dm`, `dc`, `tm`). Algorithms never look inside a parameterization: they only call
:meth:`Parameterization.decode` and read :attr:`Parameterization.labels`.

Plugins are classes registered through the entry-point groups ``splatdd.parameterizations`` and
``splatdd.algorithms`` (see :mod:`splatdd.registry`). Each declares :data:`PLUGIN_API_VERSION`,
the version of this module it was written for.

Example, a third-party parameterization::

    class Pixels(Parameterization):
        name = "mypixels"
        api_version = splatdd.plugin_api.PLUGIN_API_VERSION
        ...
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch

#: Version of the plugin contract. A plugin whose ``api_version`` differs is refused at load time.
PLUGIN_API_VERSION = 1


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
    """A parameterization's choice of optimiser for its tensors, for a given algorithm."""

    params: list[dict[str, Any]]          # torch param groups, each with its own "lr"
    kind: str = "adam"                    # "adam" or "sgd"
    momentum: float = 0.5                 # SGD only

    def build(self) -> torch.optim.Optimizer:
        if self.kind == "adam":
            return torch.optim.Adam(self.params)
        if self.kind == "sgd":
            return torch.optim.SGD(self.params, momentum=self.momentum)
        raise ValueError(f"OptimizerSpec.kind must be 'adam' or 'sgd', got {self.kind!r}")


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
        """Initialise from real images ``(n, C, H, W)`` (normalised) with labels ``(n,)``, one real
        image per stored item, ``n == len(self.labels)``. Returns diagnostics, e.g. ``{"mse": ...}``."""

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

    # ---- optimisation hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def optimizer_spec(self, algorithm: str, lr: float | None = None) -> OptimizerSpec:
        """Optimiser for this parameterization's tensors under ``algorithm`` (``"dm"``, ``"dc"``,
        ``"tm"``, ...), using the papers' defaults; ``lr`` overrides the default learning rate."""

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

    The core's loop (:func:`splatdd.distill.distill`) does, per step::

        loss = algo.loss(param, step)            # + param.regularization()
        loss.backward(); param_opt.step(); algo.after_step(); param.post_step()
    """

    name: ClassVar[str] = ""
    api_version: ClassVar[int] = PLUGIN_API_VERSION
    #: Paper default number of outer iterations (used when the CLI gets no --iterations).
    default_iterations: ClassVar[int] = 1000

    def __init__(self, real: RealData, *, ipc: int, generator: torch.Generator,
                 **options: Any) -> None:
        self.real = real
        self.ipc = ipc
        self.generator = generator

    @abc.abstractmethod
    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        """The differentiable loss of one outer step (a scalar)."""

    def after_step(self) -> None:
        """Called after the parameterization's optimiser step (e.g. TM steps its lr optimiser)."""

    def learned_lr(self) -> float | None:
        """The learned evaluation learning rate (TM), stored in the distilled file; else ``None``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Algorithm state for resumable checkpoints (optimisers, learned lr, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings, recorded in the distilled file's metadata."""
        return {}


def check_plugin_class(obj: Any, kind: str) -> None:
    """Raise ``TypeError``/``ValueError`` if ``obj`` is not a valid plugin class of ``kind``
    (``"parameterization"`` or ``"algorithm"``)."""
    base = Parameterization if kind == "parameterization" else Algorithm
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TypeError(f"{kind} plugin must be a subclass of splatdd.plugin_api.{base.__name__}, "
                        f"got {obj!r}")
    if not obj.name:
        raise ValueError(f"{kind} plugin {obj.__name__} has no `name`")
    if obj.api_version != PLUGIN_API_VERSION:
        raise ValueError(f"{kind} plugin {obj.name!r} was written for plugin API "
                         f"v{obj.api_version}; this splatdd provides v{PLUGIN_API_VERSION}")


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


__all__: Sequence[str] = ["PLUGIN_API_VERSION", "DatasetSpec", "OptimizerSpec",
                          "Parameterization", "RealData", "Algorithm", "check_plugin_class",
                          "reject_unknown_options"]
