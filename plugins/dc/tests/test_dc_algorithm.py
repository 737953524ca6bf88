"""The dc algorithm on a toy problem: the matching loss goes down, the loop structure follows the
paper (fresh network every outer_loop steps, inner training in between), checkpoints resume."""
import copy

import pytest
import torch

from splatdd.plugin_api import learned_eval_lr
from splatdd.testing import run_steps

from splatdd_dc import GradientMatching


def _algo(real, ipc=2, seed=0, **kw):
    kw.setdefault("net_width", 8)
    kw.setdefault("net_depth", 2)     # 8x8 -> 2x2: a third block would instance-normalise 1x1 maps
    return GradientMatching(real, ipc=ipc, generator=torch.Generator().manual_seed(seed), **kw)


def _param(tiny_pixels, real, ipc=2, seed=1):
    return tiny_pixels.build(real.spec, ipc, generator=torch.Generator().manual_seed(seed))


def test_step_decreases_matching_loss_for_a_fixed_network(real, tiny_pixels):
    # No DSA and a real batch larger than each class: the loss is a deterministic function of the
    # synthetic images for the current network, so plain gradient descent must reduce it.
    algo = _algo(real, outer_loop=100, dsa=False, batch_real=10_000)
    param = _param(tiny_pixels, real)
    opt = torch.optim.SGD([param.images], lr=0.1)
    first = algo.loss(param, 0)
    net = algo._net
    losses = [first.item()]
    loss = first
    for _ in range(15):
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = algo.matching_loss(param)
        losses.append(loss.item())
    assert algo._net is net
    assert losses[1] < losses[0]
    assert losses[-1] < 0.75 * losses[0], losses


def test_loss_is_differentiable_in_the_decoded_images(real, tiny_pixels):
    algo = _algo(real)
    param = _param(tiny_pixels, real)
    loss = algo.loss(param, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert param.images.grad is not None and param.images.grad.abs().sum() > 0


def test_fresh_network_every_outer_loop_and_inner_training(real, tiny_pixels):
    algo = _algo(real, outer_loop=3, inner_loop=2)
    param = _param(tiny_pixels, real)
    opt = param.optimizer_spec("gradient").build()
    nets, before_after = [], []
    for step in range(7):
        opt.zero_grad()
        algo.loss(param, step).backward()
        opt.step()
        nets.append(algo._net)
        w0 = [p.detach().clone() for p in algo._net.parameters()]
        algo.after_step(param)
        if algo._net is not None:
            w1 = list(algo._net.parameters())
            before_after.append(any(not torch.equal(a, b) for a, b in zip(w0, w1)))
    # groups of 3 calls share a network; a new one starts at calls 0, 3, 6
    assert nets[0] is nets[1] is nets[2]
    assert nets[3] is nets[4] is nets[5]
    assert nets[2] is not nets[3] and nets[5] is not nets[6]
    # the network is trained between outer steps (not after the last one of a group)
    assert before_after == [True] * 5
    # different random initialisations
    assert not torch.equal(next(nets[0].parameters()), next(nets[3].parameters()))


def test_inner_training_uses_the_parameterization_given_to_after_step(real, tiny_pixels):
    """after_step trains on the images of the parameterization it receives (not on one kept from
    loss()): the same network trained on two different image sets ends in different weights."""
    nets = []
    for seed in (1, 2):
        algo = _algo(real, outer_loop=3, inner_loop=2, seed=7)
        algo.loss(_param(tiny_pixels, real, seed=1), 0)
        before = [p.detach().clone() for p in algo._net.parameters()]
        algo.after_step(_param(tiny_pixels, real, seed=seed))
        nets.append([p.detach().clone() for p in algo._net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(before, before))
    assert any(not torch.equal(a, b) for a, b in zip(nets[0], nets[1]))


def test_ipc1_uses_a_new_network_every_step(real, tiny_pixels):
    algo = _algo(real, ipc=1)
    assert (algo.outer_loop, algo.inner_loop) == (1, 1)
    param = _param(tiny_pixels, real, ipc=1)
    algo.loss(param, 0).backward()
    n0 = algo._net
    algo.after_step(param)
    algo.loss(param, 1)
    assert algo._net is not n0


def test_checkpoint_resume_reproduces_therun_steps(real, tiny_pixels):
    ref_algo = _algo(real, outer_loop=3, inner_loop=2, seed=5)
    ref_param = _param(tiny_pixels, real)
    ref_opt = ref_param.optimizer_spec("gradient").build()
    ref = run_steps(ref_algo, ref_param, ref_opt, 5)

    algo = _algo(real, outer_loop=3, inner_loop=2, seed=5)
    param = _param(tiny_pixels, real)
    opt = param.optimizer_spec("gradient").build()
    first = run_steps(algo, param, opt, 2)           # stop inside an outer loop (pos == 2)
    ckpt = copy.deepcopy({"algo": algo.state_dict(), "param": param.state_dict(),
                          "opt": opt.state_dict()})
    algo2 = _algo(real, outer_loop=3, inner_loop=2, seed=123)   # different seed: state wins
    param2 = _param(tiny_pixels, real, seed=9)
    param2.load_state_dict(ckpt["param"])
    opt2 = param2.optimizer_spec("gradient").build()
    opt2.load_state_dict(ckpt["opt"])
    algo2.load_state_dict(ckpt["algo"])
    rest = run_steps(algo2, param2, opt2, 3, start=2)
    assert first + rest == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_unknown_option_and_config(real):
    with pytest.raises(TypeError, match="bogus"):
        _algo(real, bogus=1)
    cfg = _algo(real, ipc=10).config()
    assert cfg["outer_loop"] == 10 and cfg["inner_loop"] == 50 and cfg["lr_net"] == 0.01
    assert cfg["momentum_net"] == 0.5 and cfg["batch_real"] == 256 and cfg["dsa"] is True
    assert GradientMatching.default_iterations == 1000
    assert learned_eval_lr(_algo(real)) is None and GradientMatching.regime == "gradient"
