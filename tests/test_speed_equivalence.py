"""Issue 15's speed changes keep the maths: chunked / reduced-precision paths against the one-pass
fp32 computation written out here (the pre-issue code), with stated tolerances; precision
detection and its bad input."""
from __future__ import annotations

import warnings

import pytest
import torch

from splatdd.augment import dsa
from splatdd.models import get_network
from splatdd import distributed
from splatdd.plugin_api import DatasetSpec, RealData, draw_seed
from splatdd.precision import BF16_CPU_FLAGS, bf16_native, cpu_flags, resolve_precision

dm_mod = pytest.importorskip("splatdd_dm")
pixel = pytest.importorskip("splatdd_pixel")

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py

SPEC = DatasetSpec("toy", 1, 16, 16, 3, mean=(0.0,), std=(1.0,))


def _real(per_class: int = 40, seed: int = 0) -> RealData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    images = torch.randn(3, 1, 16, 16, generator=g)[labels] + 0.3 * torch.randn(
        len(labels), 1, 16, 16, generator=g)
    return RealData(spec=SPEC, images=images, labels=labels)


def _dm(real: RealData, **opts) -> "dm_mod.DistributionMatching":
    return dm_mod.DistributionMatching(real, ipc=1, generator=torch.Generator().manual_seed(3),
                                       net_width=16, net_depth=2, **opts)


def _one_pass_loss(algo, param) -> torch.Tensor:
    """dm's loss with the pre-issue real path: one pass per real batch, fp32 (same draws)."""
    syn = param.decode()
    labels = param.labels
    embed = algo.make_embedder(algo.draw_seed(), syn.device)
    step_seed = algo.draw_seed()                 # dm's per-class streams (distributed-ready)
    loss = syn.new_zeros(())
    parts, reals = [], []
    for c in range(SPEC.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        g = distributed.item_generator(step_seed, c)
        real = algo.real.sample(c, algo.batch_real, g)
        seed = draw_seed(g)
        with torch.no_grad():
            reals.append(embed(algo.augment(real, seed)).mean(0))
        parts.append((algo.augment(syn[idx], seed), idx.numel()))
    feats = embed(torch.cat([p for p, _ in parts])).split([k for _, k in parts])
    for fr, fs in zip(reals, feats):
        loss = loss + ((fr - fs.mean(0)) ** 2).sum()
    return loss


@pytest.mark.parametrize("n", [1, 16, 37])
def test_dm_real_mean_chunked_equals_one_pass(n):
    real = _real()
    algo = _dm(real)
    net = get_network("ConvNet", 1, 3, 16, width=16, depth=2, seed=4)
    net.requires_grad_(False)
    x = real.images[:n]
    with torch.no_grad():
        expect = net.embed(dsa(x, seed=11)).mean(0)
    got = algo.real_mean(net.embed, x, 11, "fp32")
    assert got.dtype == torch.float32 and got.shape == expect.shape
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_dm_fp32_loss_and_gradient_match_one_pass():
    """Same generator state -> same batches, nets and DSA draws: the fp32 loss and the pixels'
    gradient match the one-pass computation (float rounding only, rtol 1e-5)."""
    real = _real()
    p = pixel.PixelImages.build(SPEC, 1, generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for fn in (lambda a: a.loss(p, 0), lambda a: _one_pass_loss(a, p)):
        algo = _dm(real, batch_real=37)               # not a multiple of the chunk
        p.images.grad = None
        loss = fn(algo)
        loss.backward()
        losses.append(loss.detach())
        grads.append(p.images.grad.clone())
    assert float(losses[1]) > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    # float rounding of different summation orders (chunks, fused norm blocks), relative to the
    # largest gradient element
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5,
                               atol=1e-5 * float(grads[1].abs().max()))


def test_dm_bf16_real_mean_close_to_fp32():
    """bf16 embedding of the real batch (fp32 sums): within 2 % of the fp32 mean (bf16 has an
    8-bit mantissa; measured ~0.1-0.2 % on FashionMNIST, benchmarks/results/speed.md)."""
    real = _real()
    algo = _dm(real)
    net = get_network("ConvNet", 1, 3, 16, width=16, depth=2, seed=4)
    net.requires_grad_(False)
    x = real.images[:50]
    fp32 = algo.real_mean(net.embed, x, 5, "fp32")
    bf16 = algo.real_mean(net.embed, x, 5, "bf16")
    assert bf16.dtype == torch.float32
    rel = float((bf16 - fp32).norm() / fp32.norm())
    assert 0 < rel < 2e-2, rel
    assert next(net.parameters()).dtype == torch.float32     # the caller's net is untouched
    # a plain callable (no module behind it) runs under autocast instead
    rel2 = float((algo.real_mean(lambda t: net.embed(t), x, 5, "bf16") - fp32).norm()
                 / fp32.norm())
    assert rel2 < 2e-2


def test_dm_bf16_loss_copies_the_embedder_once_per_step(monkeypatch):
    """With precision bf16, one bf16 copy of the embedder serves every class of a step (it was
    one copy per class), and the loss equals the per-class real_mean it replaces."""
    import copy
    monkeypatch.setattr("splatdd.precision.bf16_native", lambda device: True)
    real = _real()
    p = pixel.PixelImages.build(SPEC, 1, generator=torch.Generator().manual_seed(0))
    calls = []
    real_deepcopy = copy.deepcopy

    def counting(obj, *a, **k):
        calls.append(type(obj).__name__)
        return real_deepcopy(obj, *a, **k)
    monkeypatch.setattr(copy, "deepcopy", counting)
    got = _dm(real, precision="bf16").loss(p, 0)
    assert calls == ["ConvNet"]                      # 3 classes, one copy
    algo = _dm(real, precision="bf16")               # the same draws, per class by hand
    syn = p.decode()
    embed = algo.make_embedder(algo.draw_seed(), syn.device)
    step_seed = algo.draw_seed()
    want = syn.new_zeros(())
    for c in range(SPEC.num_classes):
        g = distributed.item_generator(step_seed, c)
        batch = algo.real.sample(c, algo.batch_real, g)
        seed = draw_seed(g)
        fr = algo.real_mean(embed, batch, seed, "bf16")
        fs = embed(algo.augment(syn[p.labels == c], seed)).mean(0)
        want = want + ((fr - fs) ** 2).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_dm_bf16_falls_back_to_fp32_without_native_support(monkeypatch):
    real = _real()
    p = pixel.PixelImages.build(SPEC, 1, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("splatdd.precision.bf16_native", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        got = _dm(real, precision="bf16").loss(p, 0)
    ref = _dm(real).loss(p, 0)
    assert torch.equal(got, ref)
    assert _dm(real, precision="bf16").config()["precision"] == "bf16"


def test_precision_bad_input():
    with pytest.raises(ValueError, match="precision"):
        _dm(_real(), precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        resolve_precision("half", "cpu", who="x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("fp32", "cpu", who="x") == "fp32"
        assert resolve_precision("bf16", "cpu", who="x", native=True) == "bf16"
    with pytest.warns(RuntimeWarning, match="x: precision='bf16'"):
        assert resolve_precision("bf16", "cpu", who="x", native=False) == "fp32"


def test_cpu_flag_detection(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 avx512f\n")
    assert cpu_flags.__wrapped__(str(f)) == {"fpu", "avx2", "amx_bf16", "avx512f"}
    f.write_text("processor\t: 0\n")
    assert cpu_flags.__wrapped__(str(f)) == frozenset()
    assert cpu_flags.__wrapped__(str(tmp_path / "missing")) == frozenset()
    # the live answer agrees with the flags this machine reports
    assert bf16_native("cpu") == any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    assert bf16_native("meta") is False


# ---- dc: the real-batch gradient in passes -------------------------------------------------------
dc_mod = pytest.importorskip("splatdd_dc")


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_dc_real_gradient_chunked_equals_one_pass(norm):
    """Oracle: autograd of the batch-mean cross-entropy in one pass (the pre-issue code)."""
    real = _real()
    algo = dc_mod.GradientMatching(real, ipc=1, generator=torch.Generator().manual_seed(0),
                                   net_width=16, net_depth=2, net_norm=norm)
    algo._new_network()
    algo._freeze_batchnorm()
    net, weights = algo._net, algo._weights()
    x, y = real.images[:37], real.labels[:37]                 # not a multiple of the chunk
    expect = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), weights)
    got = algo.real_gradient(net, weights, x, y)
    assert len(got) == len(expect) and not any(g.requires_grad for g in got)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
