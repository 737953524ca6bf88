"""Helpers for plugin authors' tests: a tiny dataset, a tiny pixel parameterization, one-thread
execution, and registry look-ups that skip the test when a plugin is not installed.

Everything here is small enough for a unit test to run in well under a second on a CPU::

    from splatdd.testing import TinyPixels, make_tiny_real, single_thread

    def test_my_algorithm_step():
        real = make_tiny_real()
        param = TinyPixels.build(real.spec, ipc=2, generator=torch.Generator().manual_seed(0))
        algo = MyAlgorithm(real, ipc=2, generator=torch.Generator().manual_seed(1))
        with single_thread():
            loss = algo.loss(param, 0)

This module imports only torch and the core; pytest is imported lazily, by the helpers that skip.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from splatdd.plugin_api import (PLUGIN_API_VERSION, Algorithm, DatasetSpec, OptimizerSpec,
                                Parameterization, RealData, check_regime)

__all__ = ["TINY_SPEC", "TinyDistillation", "TinyPixels", "algorithm_class", "build_quick",
           "init_from_real_samples", "installed_algorithms", "installed_parameterizations",
           "make_quick", "make_tiny_real", "quick_depth", "parameterization_class", "run_steps", "run_tiny_distillation",
           "single_thread"]

#: A 1-channel 8x8 dataset with 3 classes, already normalised (mean 0, std 1).
TINY_SPEC = DatasetSpec(name="tiny", channels=1, height=8, width=8, num_classes=3,
                        mean=(0.0,), std=(1.0,))


def make_tiny_real(n_per_class: int = 20, seed: int = 0, spec: DatasetSpec = TINY_SPEC) -> RealData:
    """A tiny, learnable real dataset for ``spec``: class-dependent blobs plus noise (class ``c`` is
    bright in the ``c``-th vertical stripe). Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    imgs, labs = [], []
    for c in range(spec.num_classes):
        base = torch.zeros(spec.channels, spec.height, spec.width)
        lo, hi = c * spec.width // spec.num_classes, (c + 1) * spec.width // spec.num_classes
        base[:, :, lo:hi] = 1.5
        x = base + 0.5 * torch.randn(n_per_class, spec.channels, spec.height, spec.width,
                                     generator=g)
        imgs.append(x)
        labs.append(torch.full((n_per_class,), c, dtype=torch.long))
    return RealData(spec=spec, images=torch.cat(imgs).float(), labels=torch.cat(labs))


class TinyPixels(Parameterization):
    """Minimal pixel parameterization (a stand-in for the ``pixel`` plugin in algorithms' unit
    tests): one learnable image per synthetic sample, SGD with momentum 0.5, lr 0.1 by default
    under every regime."""

    name = "tinypixels"
    api_version = PLUGIN_API_VERSION

    def __init__(self, spec: DatasetSpec, ipc: int, images: torch.Tensor) -> None:
        super().__init__()
        self.spec, self.ipc = spec, ipc
        self.images = nn.Parameter(images)
        self.register_buffer("_labels", torch.arange(spec.num_classes).repeat_interleave(ipc))

    @classmethod
    def build(cls, spec, ipc, *, generator=None, **options):
        if options:
            raise TypeError(f"unknown options {sorted(options)}")
        x = torch.randn(spec.num_classes * ipc, spec.channels, spec.height, spec.width,
                        generator=generator)
        return cls(spec, ipc, x)

    def init_from_real(self, images, labels, *, steps=None, progress=False):
        with torch.no_grad():
            self.images.copy_(images)
        return {"mse": 0.0}

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def decode(self, indices=None, *, resolution=None):
        return self.images if indices is None else self.images[indices]

    def optimizer_spec(self, regime, lr=None):
        check_regime(regime, what="tinypixels: regime")
        return OptimizerSpec([{"params": [self.images], "lr": lr if lr is not None else 0.1}],
                             kind="sgd", momentum=0.5)

    def num_bytes(self) -> int:
        return self.images.numel() * 4

    def state_tensors(self):
        return {"images": self.images.detach().cpu()}

    def config(self):
        return {"ipc": self.ipc}

    @classmethod
    def from_state(cls, spec, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]):
        return cls(spec, int(config["ipc"]), tensors["images"].clone())


class ToyProjection(Algorithm):
    """A tiny distribution-matching objective for loop and checkpoint tests: matches random
    projections (64 -> 4) of real and synthetic class means of 8x8 single-channel images; all
    randomness comes from ``self.generator``, so a resumed run equals an uninterrupted one.

    >>> p = TinyPixels.build(TINY_SPEC, 1, generator=torch.Generator().manual_seed(1))
    >>> a = ToyProjection(make_tiny_real(8), ipc=1, generator=torch.Generator().manual_seed(0))
    >>> float(a.loss(p, 0)) > 0
    True
    """

    name = "toyproj"
    api_version = PLUGIN_API_VERSION
    regime = "distribution"

    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        syn = param.decode()
        w = torch.randn(64, 4, generator=self.generator) / 8
        loss = syn.new_zeros(())
        for c in range(self.real.spec.num_classes):
            fr = self.real.sample(c, 4, self.generator).flatten(1) @ w
            fs = syn[param.class_indices(c)].flatten(1) @ w
            loss = loss + ((fr.mean(0) - fs.mean(0)) ** 2).sum()
        return loss


def default_sigint() -> None:
    """``preexec_fn`` for a child process that a test interrupts with SIGINT (Ctrl-C).

    A job that a non-interactive shell starts in the background (``cmd &``, CI runners, nohup)
    inherits SIGINT *ignored*, its children too, and Python then installs no KeyboardInterrupt
    handler: the test's SIGINT would do nothing. The child gets the default disposition back.

    >>> import subprocess, sys
    >>> subprocess.run([sys.executable, "-c", "pass"], preexec_fn=default_sigint).returncode
    0
    """
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with one intra-op torch thread, restoring the previous count afterwards.

    Tiny tensors gain nothing from intra-op threads, and on a shared, busy machine the threads'
    spin-waiting can make small tests orders of magnitude slower. As a pytest fixture::

        @pytest.fixture(autouse=True)
        def _one_thread():
            with single_thread():
                yield
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _or_skip(kind: str, name: str, get):
    from splatdd import registry
    try:
        return get(name)
    except registry.UnknownPluginError:
        import pytest
        pytest.skip(f"{kind} plugin {name!r} is not installed")


def parameterization_class(name: str) -> type[Parameterization]:
    """The parameterization registered as ``name``; skips the calling pytest test when no such
    plugin is installed."""
    from splatdd import registry
    return _or_skip("parameterization", name, registry.get_parameterization)


def algorithm_class(name: str) -> type[Algorithm]:
    """The algorithm registered as ``name``; skips the calling pytest test when no such plugin is
    installed."""
    from splatdd import registry
    return _or_skip("algorithm", name, registry.get_algorithm)


def init_from_real_samples(param: Parameterization, real: RealData, *, steps: int | None = 5,
                           seed: int = 0) -> Mapping[str, Any]:
    """Initialise ``param`` from real images of its labels' classes, drawn with a generator seeded
    by ``seed`` through the core's :func:`splatdd.initialise.init_from_real` (one
    :meth:`RealData.sample` call per class, in class order); returns the diagnostics::

        init_from_real_samples(param, make_tiny_real(), steps=5)
    """
    from splatdd.initialise import init_from_real
    return init_from_real(param, real, torch.Generator().manual_seed(seed), steps=steps)


def installed_parameterizations() -> list[str]:
    """Names of the installed parameterization plugins (from the registry, without importing
    them), for tests that run an algorithm with every parameterization::

        @pytest.mark.parametrize("name", installed_parameterizations())
        def test_with_every_parameterization(name): ...
    """
    from splatdd import registry
    return registry.default_registry().names("parameterization")


def installed_algorithms() -> list[str]:
    """Names of the installed algorithm plugins (from the registry, without importing them)."""
    from splatdd import registry
    return registry.default_registry().names("algorithm")


def quick_depth(spec: DatasetSpec) -> int:
    """ConvNet depth for quick tests at ``spec``: each block halves the resolution, and an
    instance-normalised 1x1 map is degenerate, so ``floor(log2(min(H, W))) - 1`` blocks, 1 to 3
    (8x8 -> 2, 16x16 and up -> 3)."""
    import math
    return max(1, min(3, int(math.log2(min(spec.height, spec.width))) - 1))


def build_quick(param_cls: type[Parameterization], spec: DatasetSpec, ipc: int,
                workdir: str | os.PathLike, *, seed: int = 0, **options: Any) -> Parameterization:
    """``param_cls`` built for a quick test run: its own
    :meth:`~splatdd.plugin_api.Parameterization.quick_options` for ``spec``/``ipc`` (small, within
    the budget; files under ``workdir``), updated with ``options``; randomness from a generator
    seeded by ``seed``::

        param = build_quick(parameterization_class("siren"), TINY_SPEC, 2, tmp_path)
    """
    opts = {**param_cls.quick_options(spec, ipc, workdir), **options}
    return param_cls.build(spec, ipc, generator=torch.Generator().manual_seed(seed), **opts)


def make_quick(algo_cls: type[Algorithm], real: RealData, ipc: int, workdir: str | os.PathLike,
               *, seed: int = 0, **options: Any) -> Algorithm:
    """``algo_cls`` for a quick test run on ``real``: its own
    :meth:`~splatdd.plugin_api.Algorithm.quick_options` (tiny networks; files it needs made under
    ``workdir``) updated with ``options``, its generator seeded by ``seed``::

        algo = make_quick(algorithm_class("tm"), make_tiny_real(), 2, tmp_path)
    """
    opts = {**algo_cls.quick_options(real, ipc, workdir), **options}
    return algo_cls(real, ipc=ipc, generator=torch.Generator().manual_seed(seed), **opts)


@dataclass
class TinyDistillation:
    """What :func:`run_tiny_distillation` returns."""

    real: RealData
    param: Parameterization            #: the trained parameterization (what ``distill`` returned)
    algo: Algorithm
    init_diag: Mapping[str, Any]       #: ``init_from_real``'s diagnostics
    before: torch.Tensor | None        #: a copy of the watched tensor before distillation
    losses: list[float] = field(default_factory=list)   #: the loss of every step
    out_dir: str | os.PathLike | None = None
    iterations: int = 0                #: the steps asked for

    def check_finished(self) -> None:
        """Assert that every asked-for step ran with a finite loss, and that the distilled file
        was written and loads back to exactly the returned parameterization's images."""
        import math

        from splatdd.distill import DISTILLED_NAME
        from splatdd.distilled_file import load

        assert len(self.losses) == self.iterations, (len(self.losses), self.iterations)
        assert all(math.isfinite(float(x)) for x in self.losses), self.losses
        loaded = load(os.path.join(os.fspath(self.out_dir), DISTILLED_NAME))
        assert torch.equal(loaded.param.decode(), self.param.decode().detach())


def run_tiny_distillation(param_cls: type[Parameterization], algo_name: str,
                          out_dir: str | os.PathLike, *,
                          algo_options: Mapping[str, Any] | None = None, watch: str | None = None,
                          iterations: int = 2, init_steps: int = 5,
                          **build_options: Any) -> TinyDistillation:
    """A tiny end-to-end run: a 2-class 3x16x16 random dataset (10 images per class), ``param_cls``
    built with ipc 1 and ``build_options`` (plus ``init_steps``) and initialised from random real
    images of its classes (:func:`splatdd.initialise.init_from_real`), then ``iterations`` steps of the algorithm registered as
    ``algo_name`` (skips the test when it is not installed) through :func:`splatdd.distill.distill`
    with no intermediate checkpoints. ``watch`` names a tensor attribute of the parameterization
    to copy before distilling (``TinyDistillation.before``)."""
    from splatdd.distill import distill

    algo_cls = algorithm_class(algo_name)
    gen = torch.Generator().manual_seed(0)
    spec = DatasetSpec("toy", 3, 16, 16, 2, (0.0,) * 3, (1.0,) * 3)
    images = torch.randn(20, 3, 16, 16, generator=gen)
    labels = torch.arange(2).repeat_interleave(10)
    real = RealData(spec, images, labels)
    param = param_cls.build(spec, 1, generator=gen, init_steps=init_steps, **build_options)
    from splatdd.initialise import init_from_real
    diag = init_from_real(param, real, torch.Generator().manual_seed(2))
    algo = algo_cls(real, ipc=1, generator=torch.Generator().manual_seed(1),
                    **(algo_options or {}))
    before = getattr(param, watch).detach().clone() if watch is not None else None
    run = TinyDistillation(real=real, param=param, algo=algo, init_diag=diag, before=before,
                           out_dir=out_dir, iterations=iterations)
    run.param = distill(param, algo, iterations=iterations, out_dir=out_dir, checkpoint_every=0,
                        progress=False,
                        on_step=lambda step, loss, p, a: run.losses.append(loss))
    return run


def run_steps(algo: Algorithm, param: Parameterization, optimizer: torch.optim.Optimizer,
              steps: int, start: int = 0) -> list[float]:
    """``steps`` distillation steps numbered from ``start``, each the core's
    :func:`splatdd.distill.run_step` (the step :func:`splatdd.distill.distill` runs, without its
    files); returns the losses. For resume tests that stop and restart an algorithm by hand::

        opt = param.optimizer_spec(algo.regime).build()
        losses = run_steps(algo, param, opt, 3)
    """
    from splatdd.distill import run_step
    return [run_step(param, algo, optimizer, step) for step in range(start, start + steps)]
