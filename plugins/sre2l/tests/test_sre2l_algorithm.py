"""The sre2l algorithm: its loss against a direct computation, no state left on the teacher,
option errors, and end-to-end runs with every parameterization on the tiny dataset."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from splatdd.plugin_api import check_plugin_class
from splatdd.testing import (TINY_SPEC, TinyPixels, init_from_real_samples, make_tiny_real,
                             parameterization_class)
from splatdd_sre2l.algorithm import SRe2L, class_batches
from splatdd_sre2l.augment import apply_crops, expand_groups, sample_crops
from splatdd_sre2l.teacher import TeacherError


def _algo(teacher_dir, **opts):
    return SRe2L(make_tiny_real(), ipc=2, generator=torch.Generator().manual_seed(1),
                 teacher=teacher_dir, **opts)


def test_contract():
    check_plugin_class(SRe2L, "algorithm")
    assert SRe2L.regime == "recover" and SRe2L.lr_schedule == "cosine"


def test_class_batches_one_image_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert [b.tolist() for b in class_batches(labels, 3)] == [[0, 2, 4], [1, 3, 5]]
    assert [b.tolist() for b in class_batches(torch.tensor([1, 0, 1]), 3)] == [[1, 0], [2]]


def test_loss_equals_direct_computation(tiny_teacher):
    """CE + r_bn * BN over class batches, recomputed here without hooks (BN inputs captured by a
    plain module walk) from the same crops."""
    algo = _algo(tiny_teacher, r_bn=0.5, first_bn_multiplier=3.0)
    param = TinyPixels.build(TINY_SPEC, 2, generator=torch.Generator().manual_seed(0))
    gen_state = algo.generator.get_state()
    loss = algo.loss(param, 0)

    g = torch.Generator()
    g.set_state(gen_state)
    batches = class_batches(param.labels, 3)
    order = torch.cat(batches)
    crops = expand_groups(sample_crops(len(batches), g), [3, 3])
    x = apply_crops(param.decode()[order], crops)     # decode-all then index: same images
    y = param.labels[order]
    teacher = algo.teacher
    bn_inputs = []
    h = x
    for m in teacher.features:             # ConvNet: features then classifier
        if isinstance(m, nn.BatchNorm2d):
            bn_inputs.append(h)
        h = m(h)
    logits = teacher.classifier(h.flatten(1))
    total = 0.0
    for gi in range(2):
        sl = slice(3 * gi, 3 * gi + 3)
        ce = F.cross_entropy(logits[sl], y[sl])
        bn = 0.0
        for li, (a, m) in enumerate(zip(bn_inputs, [m for m in teacher.modules()
                                                     if isinstance(m, nn.BatchNorm2d)])):
            a = a[sl]
            mean = a.mean((0, 2, 3))
            var = a.var((0, 2, 3), unbiased=False)
            term = (mean - m.running_mean).norm() + (var - m.running_var).norm()
            bn = bn + (3.0 if li == 0 else 1.0) * term
        total = total + ce + 0.5 * bn
    assert loss.item() == pytest.approx(total.item() / 2, rel=1e-5)


def test_step_leaves_no_state_on_the_teacher(tiny_teacher):
    algo = _algo(tiny_teacher)
    teacher = algo.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    attrs = [set(vars(m)) for m in teacher.modules()]
    param = TinyPixels.build(TINY_SPEC, 2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(param.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        algo.loss(param, step).backward()
        opt.step()
        algo.after_step(param)
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0
               for m in teacher.modules())
    assert [set(vars(m)) for m in teacher.modules()] == attrs
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert param.images.grad is not None and param.images.grad.abs().sum() > 0


def test_batches_per_step_and_per_image_aug(tiny_teacher):
    param = TinyPixels.build(TINY_SPEC, 2, generator=torch.Generator().manual_seed(0))
    for opts in ({"batches_per_step": 1}, {"per_image_aug": True}, {"flip": False,
                                                                   "crop_scale": [1.0, 1.0]}):
        assert math.isfinite(_algo(tiny_teacher, **opts).loss(param, 0).item())
    # with the whole image as the crop and no flip the loss is deterministic
    a = _algo(tiny_teacher, flip=False, crop_scale=[1.0, 1.0])
    b = _algo(tiny_teacher, flip=False, crop_scale=[1.0, 1.0])
    b.generator.manual_seed(99)
    assert a.loss(param, 0).item() == pytest.approx(b.loss(param, 0).item(), rel=1e-6)


def test_option_errors(tiny_teacher, tmp_path):
    real = make_tiny_real()
    g = torch.Generator()
    with pytest.raises(TypeError, match="teacher"):
        SRe2L(real, ipc=1, generator=g)
    with pytest.raises(TypeError, match="bogus"):
        SRe2L(real, ipc=1, generator=g, teacher=tiny_teacher, bogus=1)
    for bad in ({"r_bn": -1}, {"crop_scale": [0.5]}, {"crop_scale": [0.0, 1.0]},
                {"batches_per_step": 0}):
        with pytest.raises(ValueError):
            SRe2L(real, ipc=1, generator=g, teacher=tiny_teacher, **bad)
    with pytest.raises(TeacherError, match="no teacher file"):
        SRe2L(real, ipc=1, generator=g, teacher=tmp_path)
    from dataclasses import replace
    other = make_tiny_real()
    other.spec = replace(other.spec, mean=(0.5,))
    with pytest.raises(TeacherError, match="mean"):
        SRe2L(other, ipc=1, generator=g, teacher=tiny_teacher)


# ---- end to end ---------------------------------------------------------------------------------
_BUILD = {"pixel": {}, "idc": {"factor": 2}, "gaussian": {"gpc": 2}, "siren": {"width": 4}}


@pytest.mark.parametrize("name", sorted(_BUILD))
def test_end_to_end_with_every_parameterization(name, tiny_teacher, tmp_path):
    from splatdd.distill import DISTILLED_NAME, distill
    from splatdd.distilled_file import load

    cls = parameterization_class(name)
    real = make_tiny_real()
    param = cls.build(real.spec, 1, generator=torch.Generator().manual_seed(0), **_BUILD[name])
    init_from_real_samples(param, real, steps=3)
    before = param.decode().detach().clone()
    algo = SRe2L(real, ipc=1, generator=torch.Generator().manual_seed(1), teacher=tiny_teacher)
    losses = []
    out = distill(param, algo, iterations=3, out_dir=tmp_path, checkpoint_every=0,
                  progress=False, plot=False,
                  on_step=lambda step, loss, p, a: losses.append(loss))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    after = out.decode().detach()
    assert after.shape == before.shape and not torch.equal(after, before)
    loaded = load(tmp_path / DISTILLED_NAME)
    assert torch.allclose(loaded.param.decode(), after)
    assert all(len(m._forward_hooks) == 0 for m in algo.teacher.modules())


def test_core_loop_applies_the_cosine_schedule(tiny_teacher, tmp_path, monkeypatch):
    """sre2l asks for lr_schedule "cosine": step s runs at base_lr * (1 + cos(pi s / T)) / 2."""
    import splatdd.distill as distill_mod

    seen = []
    orig = distill_mod.run_step

    def recording(param, algo, opt, step):
        seen.append(opt.param_groups[0]["lr"])
        return orig(param, algo, opt, step)
    monkeypatch.setattr(distill_mod, "run_step", recording)
    real = make_tiny_real()
    param = TinyPixels.build(real.spec, 1, generator=torch.Generator().manual_seed(0))
    algo = SRe2L(real, ipc=1, generator=torch.Generator().manual_seed(1), teacher=tiny_teacher)
    distill_mod.distill(param, algo, iterations=4, out_dir=tmp_path, checkpoint_every=0,
                        progress=False, plot=False, save_file=False, lr=0.2)
    expect = [0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert seen == pytest.approx(expect, rel=1e-12)
