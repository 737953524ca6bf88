"""The distillation loop: bit-identical resume, checkpoints, outputs, budget refusal."""
import json

import pytest
import torch

from splatdd import distill as D
from splatdd import distilled_file as F
from splatdd.budget import BudgetError
from splatdd.plugin_api import Algorithm, DatasetSpec, OptimizerSpec, Parameterization, RealData
from splatdd.registry import Registry

SPEC = DatasetSpec("toy", 1, 6, 6, 3, mean=(0.0,), std=(1.0,))


class Pix(Parameterization):
    name = "testpix"

    def __init__(self, spec, ipc, opt="sgd", extra_bytes=0):
        super().__init__()
        self.spec, self.ipc, self.opt, self.extra_bytes = spec, ipc, opt, extra_bytes
        self.images = torch.nn.Parameter(torch.zeros(spec.num_classes * ipc, 1, 6, 6))
        self.post_calls = 0

    @classmethod
    def build(cls, spec, ipc, *, generator=None, **options):
        p = cls(spec, ipc, **options)
        with torch.no_grad():
            p.images.normal_(generator=generator)
        return p

    def init_from_real(self, images, labels, *, steps=None, progress=False):
        return {}

    @property
    def labels(self):
        return torch.arange(self.spec.num_classes).repeat_interleave(self.ipc)

    def decode(self, indices=None, *, resolution=None):
        return self.images if indices is None else self.images[indices]

    def optimizer_spec(self, algorithm, lr=None):
        return OptimizerSpec([{"params": [self.images], "lr": lr or 0.05}], kind=self.opt,
                             momentum=0.5)

    def regularization(self):
        return 1e-3 * (self.images ** 2).mean()

    @torch.no_grad()
    def post_step(self):
        self.post_calls += 1
        self.images.clamp_(-5, 5)

    def num_bytes(self):
        return self.images.numel() * 4 + self.extra_bytes

    def state_tensors(self):
        return {"images": self.images.detach().clone()}

    def config(self):
        return {"ipc": self.ipc}

    @classmethod
    def from_state(cls, spec, tensors, config):
        p = cls(spec, config["ipc"])
        with torch.no_grad():
            p.images.copy_(tensors["images"])
        return p


class RandomProjection(Algorithm):
    """A toy objective whose every step depends on fresh randomness, from the algorithm's
    generator AND from torch's global RNG (the fallback the loop also checkpoints); it also
    keeps its own state (a running counter and an lr-like tensor)."""
    name = "randproj"
    regime = "distribution"

    def __init__(self, real, *, ipc, generator, **options):
        super().__init__(real, ipc=ipc, generator=generator)
        self.counter = 0
        self.ema = torch.zeros(())

    def loss(self, param, step):
        syn = param.decode()
        loss = syn.new_zeros(())
        w = torch.randn(36, 4, generator=self.generator) / 6
        jitter = torch.randn(()) * 1e-3                       # global RNG on purpose
        for c in range(self.real.spec.num_classes):
            real = self.real.sample(c, 5, self.generator)
            fr = real.flatten(1) @ w
            fs = syn[param.class_indices(c)].flatten(1) @ w
            loss = loss + ((fr.mean(0) - fs.mean(0)) ** 2).sum()
        return loss * (1 + jitter)

    def after_step(self, param):
        self.counter += 1
        self.ema = 0.9 * self.ema + 0.1

    def state_dict(self):
        return {"counter": self.counter, "ema": self.ema.clone()}

    def load_state_dict(self, state):
        self.counter, self.ema = state["counter"], state["ema"].clone()

    def config(self):
        return {"kind": "toy"}


def real_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return RealData(spec=SPEC, images=torch.randn(30, 1, 6, 6, generator=g),
                    labels=torch.arange(3).repeat_interleave(10))


def make(seed=0, opt="sgd"):
    p = Pix.build(SPEC, 2, generator=torch.Generator().manual_seed(1), opt=opt)
    a = RandomProjection(real_data(), ipc=2, generator=torch.Generator().manual_seed(seed))
    return p, a


class Interrupt(Exception):
    pass


def interrupt_at(k):
    def hook(step, loss, param, algo):
        if step == k:
            raise Interrupt
    return hook


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp, p, a, iterations, **kw):
    kw.setdefault("plot", False)
    return D.distill(p, a, iterations=iterations, out_dir=tmp, progress=False, **kw)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_resume_is_bit_identical(tmp_path, opt):
    p1, a1 = make(opt=opt)
    _run(tmp_path / "full", p1, a1, 12, checkpoint_every=4)

    p2, a2 = make(opt=opt)
    with pytest.raises(Interrupt):       # dies after step 7; last checkpoint is step 4
        _run(tmp_path / "cut", p2, a2, 12, checkpoint_every=4, on_step=interrupt_at(7))
    assert torch.load(D.checkpoint_path(tmp_path / "cut"), weights_only=False)["step"] == 4
    torch.manual_seed(12345)             # disturb global RNG: the checkpoint must restore it
    p3, a3 = make(seed=999, opt=opt)     # fresh objects; even a wrong generator seed is restored
    _run(tmp_path / "cut", p3, a3, 12, checkpoint_every=4, resume=True)

    assert torch.equal(p1.images, p3.images)
    assert a1.counter == a3.counter == 12 and torch.equal(a1.ema, a3.ema)
    assert torch.equal(a1.generator.get_state(), a3.generator.get_state())
    h1 = json.loads((tmp_path / "full" / "history.json").read_text())
    h3 = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert h1["losses"] == h3["losses"] and len(h1["losses"]) == 12
    b1 = (tmp_path / "full" / "distilled.safetensors")
    b3 = (tmp_path / "cut" / "distilled.safetensors")
    assert F.read_metadata(b1)["sha256"] == F.read_metadata(b3)["sha256"]


def test_resume_extends_iterations_and_outputs(tmp_path):
    p1, a1 = make()
    _run(tmp_path / "a", p1, a1, 10, checkpoint_every=0, plot=True)
    p2, a2 = make()
    _run(tmp_path / "b", p2, a2, 6, checkpoint_every=0)
    p3, a3 = make()
    _run(tmp_path / "b", p3, a3, 10, checkpoint_every=0, resume=True)
    assert torch.equal(p1.images, p3.images)
    out = tmp_path / "a"
    for name in ("checkpoint.pt", "distilled.safetensors", "history.json", "loss.png"):
        assert (out / name).is_file(), name
    reg = Registry(entry_points=False)
    reg.register("parameterization", Pix)
    d = F.load(out / "distilled.safetensors", registry=reg)
    assert torch.equal(d.param.images, p1.images)
    assert d.meta["algorithm"] == {"name": "randproj", "distribution": None, "version": None,
                                   "config": {"kind": "toy"}}
    assert d.meta["extra"]["iterations"] == 10
    assert p1.post_calls == 10


def test_losses_decrease_and_regularization_added(tmp_path):
    p, a = make()
    seen = []
    _run(tmp_path, p, a, 30, on_step=lambda s, loss, *_: seen.append(loss))
    assert len(seen) == 30 and sum(seen[-5:]) < sum(seen[:5])


def test_eval_fn_does_not_change_the_run(tmp_path):
    p1, a1 = make()
    _run(tmp_path / "a", p1, a1, 6)
    p2, a2 = make()
    calls = []

    def ev(param, step):
        torch.randn(10)                  # eval randomness must not leak into the run
        calls.append(step)
        return {"acc": float(step)}
    _run(tmp_path / "b", p2, a2, 6, eval_every=2, eval_fn=ev)
    assert calls == [2, 4, 6]
    assert torch.equal(p1.images, p2.images)
    h = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [e["step"] for e in h["evals"]] == [2, 4, 6]


def test_checkpoint_from_other_run_rejected(tmp_path):
    p, a = make()
    _run(tmp_path, p, a, 2)
    p2 = Pix.build(SPEC, 1)
    a2 = RandomProjection(real_data(), ipc=1, generator=torch.Generator())
    with pytest.raises(D.CheckpointMismatch, match="different run"):
        _run(tmp_path, p2, a2, 4, resume=True)


def test_budget_refused(tmp_path):
    p = Pix.build(SPEC, 2, extra_bytes=1)
    a = RandomProjection(real_data(), ipc=2, generator=torch.Generator())
    with pytest.raises(BudgetError):
        _run(tmp_path, p, a, 1)


def test_non_finite_loss_stops(tmp_path):
    p, a = make()
    with torch.no_grad():
        p.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        _run(tmp_path, p, a, 3)


def test_pixel_dm_resume_bit_identical(tmp_path):
    """The real plugins: pixel + dm (tiny ConvNet, DSA on) resume exactly."""
    pixel = pytest.importorskip("splatdd_pixel")
    dm = pytest.importorskip("splatdd_dm")
    spec = DatasetSpec("toy", 1, 12, 12, 2, mean=(0.0,), std=(1.0,))
    g = torch.Generator().manual_seed(0)
    real = RealData(spec=spec, images=torch.randn(16, 1, 12, 12, generator=g),
                    labels=torch.arange(2).repeat_interleave(8))

    def mk():
        p = pixel.PixelImages.build(spec, 1, generator=torch.Generator().manual_seed(0))
        a = dm.DistributionMatching(real, ipc=1, generator=torch.Generator().manual_seed(3),
                                    batch_real=4, net_width=8, net_depth=2)
        return p, a
    p1, a1 = mk()
    _run(tmp_path / "full", p1, a1, 6, checkpoint_every=2)
    p2, a2 = mk()
    with pytest.raises(Interrupt):
        _run(tmp_path / "cut", p2, a2, 6, checkpoint_every=2, on_step=interrupt_at(3))
    p3, a3 = mk()
    _run(tmp_path / "cut", p3, a3, 6, checkpoint_every=2, resume=True)
    assert torch.equal(p1.images, p3.images)
