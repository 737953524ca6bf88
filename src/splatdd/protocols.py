"""Evaluation protocols: how a distilled set is turned into a test accuracy, as named objects.

A protocol trains fresh networks on the distilled images and tests them on the real test set. The
papers use several, and their numbers are only comparable within one protocol:

``paper``       the field's hard-label protocol (DC/DSA/DM/MTT): SGD momentum 0.9, wd 5e-4, lr 0.01
                (or the learned lr of trajectory matching) x0.1 at half, 1000 epochs, DSA, batch 256.
``cross-arch``  GSDD appendix B.2 / LD3M: the same hard labels, per-architecture optimiser (Adam or
                SGD) with a cosine schedule; LD3M reports 5 runs per architecture.
``quick``       ``paper`` with 300 epochs and 1 run: for development only, labelled in every output.
``soft-label``  SRe2L/FKD (provided by the ``sre2l`` plugin): the teacher relabels every crop.

Protocols are plugins like parameterizations and algorithms: classes registered through the
entry-point group ``splatdd.protocols`` (the built-in ones by splatdd's own entry points), looked up
by name through :mod:`splatdd.registry`. A protocol is built with its options (unknown options raise
``TypeError`` naming them) and evaluates with :meth:`EvalProtocol.evaluate`.

Example::

    from splatdd.protocols import get_protocol
    proto = get_protocol("quick")()
    res = proto.evaluate(images, labels, test, model="ConvNet", runs=1, seed=0)
    print(proto.describe(), res.mean)
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from splatdd.plugin_api import PLUGIN_API_VERSION, RealData

__all__ = ["EvalProtocol", "check_protocol_class", "get_protocol", "LABEL_KINDS", "PaperProtocol",
           "QuickProtocol", "CrossArchProtocol", "DEFAULT_EVAL_LR"]

#: What kind of labels a protocol trains with. Accuracies of different kinds are never compared
#: without saying so (hard-label and soft-label numbers differ by design).
LABEL_KINDS = ("hard", "soft")


class EvalProtocol(abc.ABC):
    """A named, configurable way of measuring a distilled set's test accuracy."""

    #: Registry name, e.g. ``"paper"``.
    name: ClassVar[str] = ""
    #: Plugin-API version the class was written for.
    api_version: ClassVar[int] = PLUGIN_API_VERSION
    #: ``"hard"`` (integer labels) or ``"soft"`` (teacher soft labels).
    label_kind: ClassVar[str] = "hard"

    def __init__(self, **options: Any) -> None:
        from splatdd.plugin_api import reject_unknown_options
        reject_unknown_options(f"protocol {self.name}", options, ())

    @abc.abstractmethod
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, test: RealData, *,
                 model: str = "ConvNet", runs: int = 3, seed: int = 0,
                 learned_lr: float | None = None, progress: bool = False,
                 train: RealData | None = None) -> Any:
        """Train ``runs`` fresh ``model`` nets on ``(images, labels)`` and test them on ``test``;
        returns a :class:`splatdd.evaluate.EvalResult`. ``learned_lr`` is the distilled file's
        learned evaluation lr (trajectory matching), if any; ``train`` is the real training set,
        for protocols that need it."""

    def config(self) -> dict[str, Any]:
        """JSON-able settings of this protocol instance (recorded in results files)."""
        return {}

    def describe(self) -> str:
        """One line naming the protocol and its settings, printed next to every accuracy."""
        opts = ", ".join(f"{k} {v}" for k, v in self.config().items())
        return f"protocol {self.name} ({self.label_kind} labels{', ' + opts if opts else ''})"


def check_protocol_class(obj: Any) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``obj`` is a complete :class:`EvalProtocol`
    subclass with a name, a known label kind and this splatdd's plugin-API version."""
    if not (isinstance(obj, type) and issubclass(obj, EvalProtocol)):
        raise TypeError(f"protocol plugin must be a subclass of splatdd.protocols.EvalProtocol, "
                        f"got {obj!r}")
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"protocol plugin {obj.__name__} is abstract: it does not implement "
                        f"{', '.join(missing)}")
    if not obj.name:
        raise ValueError(f"protocol plugin {obj.__name__} has no `name`")
    if obj.label_kind not in LABEL_KINDS:
        raise ValueError(f"protocol plugin {obj.name!r}: label_kind must be one of "
                         f"{LABEL_KINDS}, got {obj.label_kind!r}")
    if obj.api_version != PLUGIN_API_VERSION:
        raise ValueError(f"protocol plugin {obj.name!r} was written for plugin API "
                         f"v{obj.api_version}; this splatdd provides v{PLUGIN_API_VERSION}")


def get_protocol(name: str, *, registry: Any = None) -> type[EvalProtocol]:
    """The protocol class registered as ``name`` (entry point or direct registration)."""
    from splatdd import registry as reg_mod
    reg = registry if registry is not None else reg_mod.default_registry()
    return reg.get("protocol", name)


# ---- the built-in protocols (registered by splatdd's own entry points) ------------------------
#: Evaluation lr when the distilled file has no learned lr (DC/DSA/DM evaluation).
DEFAULT_EVAL_LR = 0.01


def _check_positive(name: str, key: str, value: Any, *, integer: bool = False) -> Any:
    import math
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(float(value)))
    if not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"protocol {name}: {key} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


class PaperProtocol(EvalProtocol):
    """The field's hard-label protocol (DC, DSA, DM, MTT; GSDD and LD3M main tables).

    SGD momentum 0.9, weight decay 5e-4, lr ``lr`` (default: the distilled file's learned lr,
    else 0.01) x0.1 at half, ``epochs`` epochs (1000), batch 256, DSA on every batch.
    ``test_precision="bf16"`` (opt-in, for development) runs the test pass with a bfloat16 copy
    of each trained net where the CPU/GPU has native bf16 (:mod:`splatdd.precision`); it is
    recorded in :meth:`config` and so printed next to every accuracy.
    """

    name = "paper"
    default_epochs: ClassVar[int] = 1000

    def __init__(self, *, epochs: int | None = None, lr: float | None = None,
                 batch_size: int = 256, dsa: bool = True, test_precision: str = "fp32",
                 **unknown: Any) -> None:
        from splatdd.plugin_api import reject_unknown_options
        from splatdd.precision import PRECISIONS
        reject_unknown_options(f"protocol {self.name}", unknown,
                               ("epochs", "lr", "batch_size", "dsa", "test_precision"))
        if test_precision not in PRECISIONS:
            raise ValueError(f"protocol {self.name}: test_precision must be one of "
                             f"{', '.join(PRECISIONS)}, got {test_precision!r}")
        self.test_precision = test_precision
        self.epochs = _check_positive(self.name, "epochs",
                                      self.default_epochs if epochs is None else epochs,
                                      integer=True)
        self.lr = None if lr is None else _check_positive(self.name, "lr", lr)
        self.batch_size = _check_positive(self.name, "batch_size", batch_size, integer=True)
        if not isinstance(dsa, bool):
            raise ValueError(f"protocol {self.name}: dsa must be true or false, got {dsa!r}")
        self.dsa = dsa

    def lr_for(self, model: str, learned_lr: float | None) -> float:
        """The training lr: the option, else the learned lr, else 0.01."""
        if self.lr is not None:
            return self.lr
        return float(learned_lr) if learned_lr is not None else DEFAULT_EVAL_LR

    def evaluate(self, images, labels, test, *, model="ConvNet", runs=3, seed=0,
                 learned_lr=None, progress=False, train=None):
        from splatdd.evaluate import evaluate
        return evaluate(images, labels, test, model=model, runs=runs, epochs=self.epochs,
                        lr=self.lr_for(model, learned_lr), batch_size=self.batch_size,
                        dsa=self.dsa, seed=seed, progress=progress,
                        test_precision=self.test_precision)

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epochs": self.epochs, "batch_size": self.batch_size,
                               "dsa": self.dsa}
        if self.lr is not None:
            out["lr"] = self.lr
        if self.test_precision != "fp32":
            out["test_precision"] = self.test_precision
        return out


class QuickProtocol(PaperProtocol):
    """``paper`` with 100 epochs: for development runs only. Its numbers are labelled ``quick``
    everywhere and are not comparable with published figures."""

    name = "quick"
    default_epochs = 100


class CrossArchProtocol(PaperProtocol):
    """GSDD appendix B.2: hard labels, Adam (or SGD) with cosine annealing and a per-architecture
    lr (AlexNet 1e-3, ViT 5e-5, every other architecture 1e-2); LD3M reports 5 runs per
    architecture. ``lr`` overrides every architecture's lr; ``optimizer`` is ``adam`` or ``sgd``."""

    name = "cross-arch"
    #: GSDD appendix B.2 learning rates by architecture name (lower case); others: ``other``.
    ARCH_LR: ClassVar[dict[str, float]] = {"alexnet": 1e-3, "vit": 5e-5, "other": 1e-2}

    def __init__(self, *, optimizer: str = "adam", **options: Any) -> None:
        super().__init__(**options)
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"protocol {self.name}: optimizer must be 'adam' or 'sgd', "
                             f"got {optimizer!r}")
        self.optimizer = optimizer

    def lr_for(self, model: str, learned_lr: float | None) -> float:
        if self.lr is not None:
            return self.lr
        return self.ARCH_LR.get(model.lower(), self.ARCH_LR["other"])

    def evaluate(self, images, labels, test, *, model="ConvNet", runs=3, seed=0,
                 learned_lr=None, progress=False, train=None):
        from splatdd.evaluate import evaluate
        return evaluate(images, labels, test, model=model, runs=runs, epochs=self.epochs,
                        lr=self.lr_for(model, learned_lr), batch_size=self.batch_size,
                        dsa=self.dsa, seed=seed, progress=progress, optimizer=self.optimizer,
                        schedule="cosine", test_precision=self.test_precision)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "optimizer": self.optimizer, "schedule": "cosine"}
