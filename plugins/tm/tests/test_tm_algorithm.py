"""The tm algorithm: learnable lr (own optimiser, clipped), options and defaults, checkpoints,
memory report, and a loss that goes down."""
import copy

import pytest
import torch

from splatdd.plugin_api import LearnsEvalLR, learned_eval_lr
from splatdd.testing import run_steps

from splatdd_tm import TrajectoryMatching


def _algo(real, buf, seed=0, **kw):
    kw.setdefault("syn_steps", 3)
    kw.setdefault("expert_epochs", 2)
    kw.setdefault("max_start_epoch", 2)
    return TrajectoryMatching(real, ipc=2, generator=torch.Generator().manual_seed(seed),
                              buffer_dir=str(buf), **kw)


def _param(tiny_pixels, real, seed=1):
    return tiny_pixels.build(real.spec, 2, generator=torch.Generator().manual_seed(seed))


def test_defaults_follow_fred_fashion_mnist(make_real, tiny_buffer):
    real = make_real()
    g = torch.Generator()
    a1 = TrajectoryMatching(real, ipc=1, generator=g, buffer_dir=str(tiny_buffer))
    # FreD IPC 1: syn_steps 50, expert_epochs 2, max_start_epoch 5 (clipped to this 4-epoch buffer)
    assert (a1.syn_steps, a1.expert_epochs) == (50, 2)
    assert a1.max_start_epoch == 3                    # starts 0..2, targets up to epoch 4
    a10 = TrajectoryMatching(real, ipc=10, generator=g, buffer_dir=str(tiny_buffer))
    assert a10.syn_steps == 60
    assert TrajectoryMatching.default_iterations == 5000
    assert a1.learned_lr() == pytest.approx(0.01)
    assert isinstance(a1, LearnsEvalLR) and learned_eval_lr(a1) == pytest.approx(0.01)
    assert TrajectoryMatching.regime == "trajectory"
    cfg = a1.config()
    assert cfg["lr_lr"] == 1e-5 and cfg["lr_init"] == 0.01 and cfg["batch_syn"] is None


def test_option_errors(make_real, tiny_buffer):
    real = make_real()
    with pytest.raises(ValueError, match="max_start_epoch"):
        _algo(real, tiny_buffer, max_start_epoch=4)   # 3 + 2 > 4 epochs
    with pytest.raises(TypeError, match="bogus"):
        _algo(real, tiny_buffer, bogus=1)
    with pytest.raises(ValueError):
        _algo(real, tiny_buffer, lr_init=0.0)
    other = make_real()
    other.spec = type(other.spec)(name="other", channels=1, height=8, width=8, num_classes=3)
    with pytest.raises(ValueError, match="other data"):
        _algo(other, tiny_buffer)


def test_lr_is_learned_by_its_own_optimiser_and_clipped(make_real, tiny_buffer, tiny_pixels):
    real = make_real()
    param = _param(tiny_pixels, real)
    algo = _algo(real, tiny_buffer, lr_lr=1e-3)
    loss = algo.loss(param, 0)
    loss.backward()
    g = algo.syn_lr.grad.item()
    assert g != 0.0 and param.images.grad is not None
    lr0 = algo.learned_lr()
    algo.after_step(param)
    assert algo.learned_lr() == pytest.approx(lr0 - 1e-3 * g, rel=1e-5)   # SGD, first step
    assert algo.syn_lr.grad is None
    # a huge lr step would make the lr negative: it is clipped at lr_min
    algo = _algo(real, tiny_buffer, lr_lr=1e6, lr_min=1e-4)
    algo.syn_lr.grad = torch.tensor(1.0)
    algo.after_step(param)
    assert algo.learned_lr() == pytest.approx(1e-4)


def test_checkpoint_resume_reproduces_therun_steps(make_real, tiny_buffer, tiny_pixels):
    real = make_real()
    kw = dict(lr_lr=1e-3, batch_syn=2)
    ref_algo, ref_param = _algo(real, tiny_buffer, seed=4, **kw), _param(tiny_pixels, real)
    ref = run_steps(ref_algo, ref_param, ref_param.optimizer_spec("trajectory").build(), 4)
    algo, param = _algo(real, tiny_buffer, seed=4, **kw), _param(tiny_pixels, real)
    opt = param.optimizer_spec("trajectory").build()
    first = run_steps(algo, param, opt, 2)
    ckpt = copy.deepcopy({"a": algo.state_dict(), "p": param.state_dict(), "o": opt.state_dict()})
    algo2, param2 = _algo(real, tiny_buffer, seed=99, **kw), _param(tiny_pixels, real, seed=7)
    param2.load_state_dict(ckpt["p"])
    opt2 = param2.optimizer_spec("trajectory").build()
    opt2.load_state_dict(ckpt["o"])
    algo2.load_state_dict(ckpt["a"])
    assert algo2.learned_lr() == algo.learned_lr()
    rest = run_steps(algo2, param2, opt2, 2, start=2)
    assert first + rest == pytest.approx(ref, rel=1e-5)
    assert algo2.learned_lr() == pytest.approx(ref_algo.learned_lr(), rel=1e-6)


def test_minibatches_cover_the_set_and_decode_each_image_once(make_real, tiny_buffer,
                                                             tiny_pixels):
    real = make_real()
    algo = _algo(real, tiny_buffer, batch_syn=4, syn_steps=3)
    sched = algo._schedule(6, torch.Generator().manual_seed(0))
    assert [len(b) for b in sched] == [4, 2, 4]
    assert sorted(torch.cat(sched[:2]).tolist()) == list(range(6))
    param = _param(tiny_pixels, real)
    calls = []
    orig = param.decode
    param.decode = lambda idx=None, **k: (calls.append(idx), orig(idx, **k))[1]
    algo.loss(param, 0)
    assert len(calls) == 1 and calls[0] is not None and len(calls[0]) == len(set(calls[0].tolist()))


def test_a_step_on_the_images_lowers_the_loss(make_real, tiny_buffer, tiny_pixels):
    # One expert, one start epoch, no DSA, full batches: the loss is a deterministic function of
    # the images, so gradient descent must lower it.
    real = make_real()
    algo = _algo(real, tiny_buffer, max_experts=1, max_start_epoch=1, dsa=False, syn_steps=4)
    param = _param(tiny_pixels, real)
    opt = torch.optim.SGD([param.images], lr=1.0)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = algo.loss(param, step)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses


def test_memory_report(make_real, tiny_buffer, tiny_pixels):
    real = make_real()
    algo = _algo(real, tiny_buffer, syn_steps=4)
    est = algo.memory_estimate
    P = algo.buffer.num_params
    assert est["params_bytes"] == 4 * 2 * P * 4
    assert est["activation_bytes"] > 0 and est["batch"] == 6
    rep = algo.measure_memory(_param(tiny_pixels, real))
    assert rep["measured_by"] in ("torch.profiler", "rss")
    assert rep["measured_peak_bytes"] is not None and rep["measured_peak_bytes"] > 0


def test_warns_when_the_unroll_will_not_fit(make_real, tiny_buffer, monkeypatch):
    import splatdd_tm.algorithm as tm_algorithm
    monkeypatch.setattr(tm_algorithm, "_available_bytes", lambda device: 1000)
    with pytest.warns(RuntimeWarning, match="syn_steps or batch_syn"):
        _algo(make_real(), tiny_buffer)
