"""A third party's plugins are full citizens: a new algorithm and a new parameterization, written
in this module as a third party would (only :mod:`splatdd.plugin_api` and documented helpers) and
registered directly with a :class:`~splatdd.registry.Registry`, run end to end through
:func:`splatdd.distill.distill` with every installed built-in counterpart -- every installed
parameterization with the new algorithm, the new parameterization with every installed algorithm --
although no built-in plugin knows their names. Each built-in is built from its own
``quick_options`` hook, never from options keyed on its name. The registry refuses an incomplete
(abstract) plugin class with a message naming the missing methods."""
from __future__ import annotations

import math
from typing import Any, Mapping

import pytest
import torch
import torch.nn.functional as F

from splatdd import distilled_file
from splatdd.distill import DISTILLED_NAME, distill
from splatdd.initialise import init_from_real
from splatdd.plugin_api import (PLUGIN_API_VERSION, REGIMES, Algorithm, DatasetSpec,
                                OptimizerSpec, Parameterization, RealData, learned_eval_lr,
                                regime_setting, reject_unknown_options)
from splatdd.registry import Registry
from splatdd.testing import (build_quick, installed_algorithms, installed_parameterizations,
                             make_quick, make_tiny_real)

IPC = 2
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the third party's plugins ------------------------------------------------------------------
class ClassMeanMatching(Algorithm):
    """Match each class's mean synthetic image to the mean of a fresh real batch (a pixel-space DM).
    Records the parameterization ``after_step`` received."""

    name = "tp_meanmatch"
    api_version = PLUGIN_API_VERSION
    regime = "distribution"
    default_iterations = 10

    def __init__(self, real: RealData, *, ipc: int, generator: torch.Generator,
                 **options: Any) -> None:
        super().__init__(real, ipc=ipc, generator=generator)
        reject_unknown_options(self.name, options, ("batch",))
        self.batch = int(options.get("batch", 8))
        self.steps_done = 0
        self.seen: list[Parameterization] = []

    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        syn = param.decode()
        loss = syn.new_zeros(())
        for c in range(self.real.spec.num_classes):
            idx = param.class_indices(c)
            if len(idx):
                real = self.real.sample(c, self.batch, self.generator).to(syn.device)
                loss = loss + ((syn[idx.to(syn.device)].mean(0) - real.mean(0)) ** 2).sum()
        return loss

    def after_step(self, param: Parameterization) -> None:
        self.steps_done += 1
        self.seen.append(param)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])

    def config(self) -> dict[str, Any]:
        return {"batch": self.batch}


class HalfResImages(Parameterization):
    """Four half-resolution fp32 images per IPC slot (the budget of one full image), decoded by
    bilinear upsampling: ``4 * ipc`` decoded images per class, class-major."""

    name = "tp_halfres"
    api_version = PLUGIN_API_VERSION
    #: (kind, lr) per regime, deliberately chosen for every regime.
    OPTIMIZERS = {"distribution": ("sgd", 1.0), "gradient": ("sgd", 0.1),
                  "trajectory": ("sgd", 100.0), "recover": ("adam", 0.1)}

    def __init__(self, spec: DatasetSpec, ipc: int, small: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec, self.ipc = spec, int(ipc)
        n = spec.num_classes * 4 * self.ipc
        shape = (n, spec.channels, spec.height // 2, spec.width // 2)
        self.small = torch.nn.Parameter(torch.zeros(shape) if small is None else small.clone())
        self.register_buffer("_labels", torch.arange(spec.num_classes).repeat_interleave(
            4 * self.ipc), persistent=False)

    @classmethod
    def build(cls, spec, ipc, *, generator=None, **options):
        reject_unknown_options(cls.name, options, ())
        p = cls(spec, ipc)
        with torch.no_grad():
            p.small.normal_(generator=generator)
        return p

    def init_from_real(self, images, labels, *, steps=None, progress=False):
        if images.shape[0] != len(self._labels) or not torch.equal(labels.cpu(), self._labels):
            raise ValueError("tp_halfres: one real image per decoded image, class-major")
        with torch.no_grad():
            self.small.copy_(F.interpolate(images.float(), size=self.small.shape[-2:],
                                           mode="area"))
        return {"mse": float(F.mse_loss(self.decode().detach(), images.float()))}

    @property
    def labels(self):
        return self._labels

    def decode(self, indices=None, *, resolution=None):
        x = self.small if indices is None else self.small[indices]
        size = resolution or (self.spec.height, self.spec.width)
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

    def optimizer_spec(self, regime, lr=None):
        kind, default = regime_setting(self.OPTIMIZERS, regime, self.name)
        return OptimizerSpec([{"params": [self.small], "lr": default if lr is None else lr}],
                             kind=kind, momentum=0.5)

    def num_bytes(self):
        return self.small.numel() * 4

    def state_tensors(self):
        return {"small": self.small.detach().cpu().contiguous()}

    def config(self):
        return {"ipc": self.ipc}

    @classmethod
    def from_state(cls, spec, tensors, config):
        return cls(spec, int(config["ipc"]), tensors["small"].float())


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Where the built-ins' quick_options put their small files (tm's experts, a tiny teacher or
    LDM), once for the module."""
    return tmp_path_factory.mktemp("quick")


@pytest.fixture(scope="module")
def registry():
    """The installed plugins plus the third party's, registered directly."""
    reg = Registry()
    reg.register("algorithm", ClassMeanMatching)
    reg.register("parameterization", HalfResImages)
    return reg


@pytest.fixture(scope="module")
def real():
    return make_tiny_real(20)


def _run(param, algo, out, registry, iterations=2):
    losses = []
    distill(param, algo, iterations=iterations, out_dir=out, checkpoint_every=1, progress=False,
            plot=False, registry=registry, on_step=lambda step, loss, p, a: losses.append(loss))
    assert len(losses) == iterations and all(math.isfinite(x) for x in losses), losses
    loaded = distilled_file.load(out / DISTILLED_NAME, registry=registry)
    assert loaded.algorithm == algo.name and loaded.param.name == param.name
    assert torch.equal(loaded.param.decode(), param.decode().detach())
    assert loaded.learned_lr == learned_eval_lr(algo)
    return losses


# ---- the tests ----------------------------------------------------------------------------------
def test_the_third_party_plugins_are_registered_like_built_ins(registry):
    assert registry.get_algorithm("tp_meanmatch") is ClassMeanMatching
    assert registry.get_parameterization("tp_halfres") is HalfResImages
    assert set(installed_parameterizations()) <= set(registry.names("parameterization"))
    assert "tp_halfres" not in installed_parameterizations()        # only in this registry
    # every regime has a deliberate optimiser; an algorithm name is not a regime
    for regime in REGIMES:
        HalfResImages.build(make_tiny_real().spec, 1).optimizer_spec(regime).build()
    with pytest.raises(ValueError, match="tp_halfres: unknown regime 'dm'"):
        HalfResImages.build(make_tiny_real().spec, 1).optimizer_spec("dm")


@pytest.mark.parametrize("pname", installed_parameterizations())
def test_new_algorithm_with_every_installed_parameterization(pname, registry, real, workdir,
                                                             tmp_path):
    pcls = registry.get_parameterization(pname)
    param = build_quick(pcls, real.spec, IPC, workdir)
    init_from_real(param, real, torch.Generator().manual_seed(0), steps=3)
    before = param.decode().detach().clone()
    algo = ClassMeanMatching(real, ipc=IPC, generator=torch.Generator().manual_seed(1))
    _run(param, algo, tmp_path, registry)
    assert algo.steps_done == 2 and all(p is param for p in algo.seen)
    assert not torch.equal(param.decode().detach(), before)


@pytest.mark.parametrize("aname", installed_algorithms())
def test_new_parameterization_with_every_installed_algorithm(aname, registry, real, workdir,
                                                             tmp_path):
    acls = registry.get_algorithm(aname)
    param = HalfResImages.build(real.spec, IPC, generator=torch.Generator().manual_seed(0))
    init_from_real(param, real, torch.Generator().manual_seed(0))
    before = param.small.detach().clone()
    algo = make_quick(acls, real, IPC, workdir, seed=1)
    _run(param, algo, tmp_path, registry)
    assert not torch.equal(param.small.detach(), before)


def test_registry_refuses_an_incomplete_plugin_naming_what_is_missing():
    # a third party's class that forgot two methods (the rest as HalfResImages)
    members = {k: v for k, v in vars(HalfResImages).items()
               if k not in ("num_bytes", "from_state", "__dict__", "__weakref__")}
    Unfinished = type("Unfinished", (Parameterization,), {**members, "name": "tp_unfinished"})
    reg = Registry(entry_points=False)
    with pytest.raises(TypeError) as e:
        reg.register("parameterization", Unfinished)
    msg = str(e.value)
    assert "'tp_unfinished'" in msg and "is abstract" in msg
    assert "does not implement from_state, num_bytes" in msg

    class NoRegime(ClassMeanMatching):
        name = "tp_noregime"
        regime = ""
    with pytest.raises(ValueError, match="regime.*distribution, gradient, trajectory, recover"):
        reg.register("algorithm", NoRegime)
    assert reg.names("parameterization") == [] and reg.names("algorithm") == []
