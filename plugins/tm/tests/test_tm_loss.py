"""The TM loss against its definition, and the student unroll's derivatives (gradcheck)."""
import json

import pytest
import torch
import torch.nn as nn

import splatdd_tm._core as tm_core
from splatdd.plugin_api import DatasetSpec, RealData
from splatdd_tm import TrajectoryMatching, student_unroll, tm_loss
from splatdd_tm.buffer import BUFFER_FORMAT, BUFFER_VERSION, _save_expert, expert_path
from splatdd_tm.unroll import param_layout, unflatten

SPEC2 = DatasetSpec(name="two", channels=1, height=2, width=2, num_classes=2, mean=(0.0,),
                    std=(1.0,))


class TwoParam(nn.Module):
    """logits = (a * s, b * s) with s the mean pixel of each image: two scalar parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3]))
        self.b = nn.Parameter(torch.tensor([-0.2]))

    def forward(self, x):
        s = x.flatten(1).mean(1)
        return torch.stack([self.a * s, self.b * s], dim=1)


def _write_buffer(path, trajectories, epochs):
    names, shapes = param_layout(TwoParam())
    cfg = {"format": BUFFER_FORMAT, "version": BUFFER_VERSION,
           "dataset": {"name": SPEC2.name, "channels": 1, "height": 2, "width": 2,
                       "num_classes": 2, "mean": [0.0], "std": [1.0], "zca": False},
           "model": "TwoParam", "width": 1, "depth": None, "epochs": epochs, "lr": 0.01,
           "momentum": 0.0, "weight_decay": 0.0, "batch_size": 4, "dsa": False,
           "dsa_strategy": "none", "seed": 0, "param_names": names,
           "param_shapes": [list(s) for s in shapes], "num_params": 2}
    path.mkdir(exist_ok=True)
    (path / "buffer.json").write_text(json.dumps(cfg))
    for i, t in enumerate(trajectories):
        _save_expert(expert_path(path, i), t, {"expert": i, "config_sha256": "x"})


class _Images:
    """A parameterization-like object (only decode/labels are used by tm)."""

    def __init__(self, x, y):
        self.x, self._y = x, y

    @property
    def labels(self):
        return self._y

    def decode(self, indices=None, *, resolution=None):
        return self.x if indices is None else self.x[indices]


def _hand_step(theta, x, y, lr):
    """One SGD step of the two-parameter model, gradient written out by hand."""
    a, b = theta
    s = x.flatten(1).mean(1)
    logits = torch.stack([a * s, b * s], 1)
    p = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(y, 2).to(x.dtype)
    d = (p - onehot) / len(y)                   # dCE/dlogits for the mean CE
    grad = torch.stack([(d[:, 0] * s).sum(), (d[:, 1] * s).sum()])
    return theta - lr * grad


@pytest.mark.parametrize("syn_steps", [1, 3])
def test_loss_equals_definition_on_two_parameter_model(tmp_path, monkeypatch, syn_steps):
    monkeypatch.setattr(tm_core, "get_network", lambda *a, **k: TwoParam())
    traj = torch.tensor([[0.3, -0.2], [0.5, -0.4], [0.9, -0.5], [1.0, -0.9]])
    _write_buffer(tmp_path, [traj], epochs=3)
    x = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]], [[[-1.0, 0.5], [0.5, -2.0]]],
                      [[[0.3, 0.3], [0.2, 0.1]]], [[[-0.5, -0.5], [-1.0, 0.0]]]])
    y = torch.tensor([0, 0, 1, 1])
    real = RealData(spec=SPEC2, images=x.clone(), labels=y.clone())
    algo = TrajectoryMatching(real, ipc=2, generator=torch.Generator().manual_seed(0),
                              buffer_dir=str(tmp_path), syn_steps=syn_steps, expert_epochs=2,
                              max_start_epoch=2, dsa=False, lr_init=0.7)
    loss = algo.loss(_Images(x, y), 0)
    t, M = algo.last_start, 2
    theta = traj[t]
    for _ in range(syn_steps):                   # batch_syn None: the whole set every step
        theta = _hand_step(theta, x, y, 0.7)
    expected = ((theta - traj[t + M]) ** 2).sum() / ((traj[t] - traj[t + M]) ** 2).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert algo.syn_lr.grad is not None and algo.syn_lr.grad.item() != 0.0


def test_tm_loss_formula():
    s = torch.tensor([1.0, 2.0])
    start = torch.tensor([0.0, 0.0])
    target = torch.tensor([3.0, 4.0])
    assert tm_loss(s, start, target).item() == pytest.approx(((2**2 + 2**2) / 25.0))
    assert tm_loss(target, start, target).item() == 0.0
    assert tm_loss(start, start, target).item() == pytest.approx(1.0)


def _gradcheck_unroll(net, x, y, batches, theta0, target):
    net = net.double()
    names, shapes = param_layout(net)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    x = x.double().requires_grad_(True)

    def f(images, lr_):
        th = student_unroll(net, names, shapes, theta0, images, y, lr_, batches)
        return th, tm_loss(th, theta0, target)

    assert torch.autograd.gradcheck(f, (x, lr), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_unroll_gradcheck_images_and_lr_mlp():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(4, 1, 2, 2, generator=g)
    y = torch.tensor([0, 1, 1, 0])
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.double().parameters()])
    target = theta0 + 0.1 * torch.randn(theta0.shape, generator=g, dtype=torch.float64)
    batches = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([3, 0])]
    _gradcheck_unroll(net, x, y, batches, theta0, target)


def test_unroll_gradcheck_tiny_convnet():
    # The core's ConvNet (conv, instance norm, ReLU, avg pool, linear) at width 2, depth 1.
    net = tm_core.get_network("ConvNet", 1, 2, (4, 4), width=2, depth=1, seed=0).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 4, 4, generator=g)
    y = torch.tensor([0, 1, 1])
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = theta0 + 0.1 * torch.randn(theta0.shape, generator=g, dtype=torch.float64)
    batches = [torch.tensor([0, 1]), torch.tensor([2, 0])]
    _gradcheck_unroll(net, x, y, batches, theta0, target)


def test_unflatten_roundtrip_and_size_check():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    names, shapes = param_layout(net)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    d = unflatten(flat, names, shapes)
    for (n, p) in net.named_parameters():
        assert torch.equal(d[n], p.detach())
    with pytest.raises(ValueError):
        unflatten(flat[:-1], names, shapes)
