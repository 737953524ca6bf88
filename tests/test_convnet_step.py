"""splatdd.convnet_step: a ConvNet batch's loss gradient in one compiled call, against its PyTorch
twin (the network's own modules under autograd, F.conv2d, no fused or Winograd path)."""
from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import splatdd.convnet_step as cs
import splatdd.evaluate as ev
import splatdd.winograd as wg
from splatdd.models import get_network

pytestmark = pytest.mark.skipif(not hasattr(cs._C(), "convnet_step"),
                                reason="compiled module without convnet_step")


def _twin_grads(net, x, y, scale, dtype):
    """The network's own modules under autograd in ``dtype`` (a copy): the loss and each
    parameter's gradient."""
    twin = get_network("ConvNet", x.shape[1], net.classifier.out_features,
                       tuple(x.shape[2:]), width=net.feature_shape[0],
                       depth=len([m for m in net.features if isinstance(m, torch.nn.Conv2d)]),
                       pool="none" if net._pool == "none" else "avgpooling")
    twin.load_state_dict(net.state_dict())
    twin = twin.to(dtype)
    loss = F.cross_entropy(twin(x.to(dtype)), y, reduction="sum") * (
        1.0 / x.shape[0] if scale is None else scale)
    loss.backward()
    return loss.item(), {k: p.grad for k, p in twin.named_parameters()}


class Reference(dict):
    """The float64 oracle's gradients (a dict), with the float32 twin's error from them as
    ``fp32_error`` (per parameter, the largest absolute difference)."""

    def __init__(self, grads: dict, fp32_error: dict):
        super().__init__(grads)
        self.fp32_error = fp32_error


def _oracle(net, x, y, scale=None):
    """The loss and gradients of the modules under autograd in float64 (the oracle), with the
    error of the same modules in float32 from them: the yardstick of what float32 can do on this
    input (on some inputs float32 and float64 part ways by far more than rounding, for PyTorch's
    float32 modules as much as for the compiled step: one in about 150 random 12 x 12 batches
    here, measured)."""
    loss, grads64 = _twin_grads(net, x, y, scale, torch.float64)
    _, grads32 = _twin_grads(net, x, y, scale, torch.float32)
    return loss, Reference(grads64, {k: (grads32[k].double() - grads64[k]).abs().max().item()
                                      for k in grads64})


def _assert_close(net, ref, rtol=3e-5):
    """Every gradient within rtol of the largest gradient of its tensor (the convolutions' biases,
    exactly zero in exact arithmetic since the instance norm removes them, within rtol of their
    weight's), or, where PyTorch's own float32 modules are further off on this input, within
    twice their error."""
    for k, p in net.named_parameters():
        g, r = p.grad.double(), ref[k]
        scale = r.abs().max().item()
        if k.startswith("features") and k.endswith("bias") and scale < 1e-6:
            scale = ref[k[:-4] + "weight"].abs().max().item()
        err = (g - r).abs().max().item()
        bound = max(rtol * scale, 2 * ref.fp32_error[k])
        assert err <= bound + 1e-12, (k, err, scale, bound)


# image-like inputs (in [0, 1)): with N(0, 1) noise images the 128-wide net's filter gradients are
# sums that cancel to ~1e-2 of their terms, where Winograd's float32 rounding (the autograd path's
# too) is no longer small next to the result
@settings(max_examples=12, deadline=None, derandomize=True)
@given(channels=st.sampled_from([1, 3]), size=st.sampled_from([(28, 28), (12, 12), (9, 14)]),
       width=st.sampled_from([16, 24]), depth=st.integers(1, 3),
       pool=st.sampled_from(["avgpooling", "none"]), n=st.integers(1, 7),
       chunk=st.sampled_from([None, 1, 2, 3, 16]), blas=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_matches_autograd_float64(channels, size, width, depth, pool, n, chunk, blas, seed):
    h, w = size
    for _ in range(depth):               # skip nets too deep for the image
        h, w = (h // 2, w // 2) if pool != "none" else (h, w)
    if min(h, w) < 1:
        return
    net = get_network("ConvNet", channels, 10, size, width=width, depth=depth, pool=pool,
                      seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, *size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    assert cs.serves(net, x)
    loss = cs.loss_backward(net, x, y, chunk=chunk, blas=blas)
    ref_loss, ref = _oracle(net, x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    _assert_close(net, ref)


def test_readme_network_in_passes_with_kept_chunks():
    """ConvNet-3 width 128 at 28 px (the evaluation's net), 37 images in passes of 16 (a partial
    last pass), Winograd chunks of 64 tiles (several chunks per pass, each kept)."""
    net = get_network("ConvNet", 1, 10, (28, 28), seed=1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(37, 1, 28, 28, generator=g), torch.randint(0, 10, (37,), generator=g)
    cs.loss_backward(net, x, y, chunk=16, tiles_per_chunk=64)
    _assert_close(net, _oracle(net, x, y)[1], rtol=5e-5)


def test_adds_to_existing_gradients_and_scales():
    net = get_network("ConvNet", 1, 10, (12, 12), width=16, depth=2, seed=2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(5, 1, 12, 12, generator=g), torch.tensor([1, 2, 3, 4, 5])
    before = {k: torch.randn(p.shape, generator=g) for k, p in net.named_parameters()}
    for k, p in net.named_parameters():
        p.grad = before[k].clone()
    loss = cs.loss_backward(net, x, y, chunk=2, loss_scale=0.5)
    ref_loss, ref = _oracle(net, x, y, scale=0.5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_close(net, Reference({k: ref[k] + before[k].double() for k in ref}, ref.fp32_error))


def test_train_network_uses_it_and_agrees_with_autograd(monkeypatch):
    """Three epochs of the evaluation protocol (DSA, SGD with momentum) through the compiled step
    and through autograd (compiled=False) end at the same weights up to rounding. The images are
    fixed: training amplifies rounding, and on some random batches (about one in 30) a change of
    1e-7 in the images alone moves the autograd path's own weights by more than this tolerance
    after three epochs (measured), so random images would make this test fail at random."""
    x = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10
    calls = []
    real = cs.loss_backward
    monkeypatch.setattr(cs, "loss_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = ev.train_network(get_network("ConvNet", 1, 10, 28, width=16, seed=3), x, y, epochs=3,
                         batch_size=8, seed=4)
    assert len(calls) == 9                     # 3 epochs x 3 batches, all compiled
    b = ev.train_network(get_network("ConvNet", 1, 10, 28, width=16, seed=3), x, y, epochs=3,
                         batch_size=8, seed=4, compiled=False)
    assert len(calls) == 9
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("make, x", [
    (lambda: get_network("ConvNet", 1, 10, 28, width=16, norm="batchnorm"), None),
    (lambda: get_network("ConvNet", 1, 10, 28, width=16, act="sigmoid"), None),
    (lambda: get_network("ConvNet", 1, 10, 28, width=16, pool="maxpooling"), None),
    (lambda: get_network("ConvNet", 1, 10, 28, width=8), None),          # Winograd needs >= 16
    (lambda: get_network("ConvNet", 8, 10, 28, width=16), torch.zeros(2, 8, 28, 28)),
    (lambda: get_network("AlexNet", 1, 10, 28), None),
])
def test_does_not_apply(make, x):
    x = torch.zeros(2, 1, 28, 28) if x is None else x
    net = make()
    assert not cs.serves(net, x) and not cs.applies(net, x)


def test_does_not_apply_to_hooks_frozen_parameters_inputs_with_grad_or_no_grad_mode():
    net = get_network("ConvNet", 1, 10, 28, width=16)
    x = torch.zeros(2, 1, 28, 28)
    assert cs.serves(net, x)
    assert not cs.serves(net, x.double())
    assert not cs.serves(net, x.clone().requires_grad_())
    with torch.no_grad():
        assert not cs.serves(net, x)
    h = net.features[2].register_forward_hook(lambda *a: None)
    assert not cs.serves(net, x)
    h.remove()
    net.features[1].weight.requires_grad_(False)
    assert not cs.serves(net, x)


def test_train_network_keeps_autograd_without_a_blas(monkeypatch):
    """Where torch's BLAS is not found the step would multiply with its plain loop, slower than
    torch.bmm: train_network keeps autograd there, and loss_backward still gives the gradient."""
    net = get_network("ConvNet", 1, 10, 12, width=16, depth=2, seed=5)
    x = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2])
    monkeypatch.setattr(cs, "sgemm_batch_address", lambda: 0)
    assert cs.serves(net, x) and not cs.applies(net, x)
    calls = []
    monkeypatch.setattr(cs, "loss_backward", lambda *a, **k: calls.append(1))
    ev.train_network(net, x, y, epochs=1, batch_size=3, seed=0)
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setattr(cs, "sgemm_batch_address", lambda: 0)
    net.zero_grad(set_to_none=True)
    cs.loss_backward(net, x, y)
    _assert_close(net, _oracle(net, x, y)[1])


def test_bad_input():
    net = get_network("ConvNet", 1, 10, 12, width=16, depth=2)
    x = torch.randn(3, 1, 12, 12)
    with pytest.raises(ValueError, match="class indices in"):
        cs.loss_backward(net, x, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="class indices in"):
        cs.loss_backward(net, x, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="integer class indices"):
        cs.loss_backward(net, x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="integer class indices"):
        cs.loss_backward(net, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk"):
        cs.loss_backward(net, x, torch.tensor([0, 1, 2]), chunk=0)
    with pytest.raises(ValueError, match="loss_scale"):
        cs.loss_backward(net, x, torch.tensor([0, 1, 2]), loss_scale=float("nan"))
    with pytest.raises(ValueError, match="tiles_per_chunk"):
        cs.loss_backward(net, x, torch.tensor([0, 1, 2]), tiles_per_chunk=0)
    with pytest.raises(ValueError, match="serves"):
        cs.loss_backward(get_network("ConvNet", 1, 10, 12, width=16, norm="batchnorm"), x,
                         torch.tensor([0, 1, 2]))
    assert all(p.grad is None for p in net.parameters())    # nothing was written
    assert cs.loss_backward(net, x[:0], torch.zeros(0, dtype=torch.long)) == 0.0


def test_compiled_call_checks_its_arguments():
    lib = cs._C()
    base = dict(x=0, labels=0, B=1, Cin=1, H=8, W=8, classes=10, loss_scale=1.0, chunk=1,
                tiles_per_chunk=256, width=16, pool=True, layer_ptrs=[1] * 10, layer_eps=[1e-5],
                layer_pad=[1], fc_w=1, fc_b=0, g_fc_w=1, g_fc_b=0, loss=0, workspace=0,
                workspace_floats=0, gemm=0)
    assert lib.convnet_step(**base) > 0                     # the workspace size query
    for bad, match in [(dict(layer_ptrs=[1] * 9), "layer_ptrs"),
                       (dict(layer_eps=[0.0]), "eps"),
                       (dict(layer_pad=[17]), "padding"),
                       (dict(H=1, layer_pad=[0]), "smaller than"),
                       (dict(width=0), "width"),
                       (dict(fc_w=0), "classifier"),
                       (dict(num_threads=-1), "num_threads")]:
        with pytest.raises(ValueError, match=match):
            lib.convnet_step(**{**base, **bad})
    ws, x, lab = torch.empty(8), torch.zeros(64), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="workspace smaller"):
        lib.convnet_step(**{**base, "x": x.data_ptr(), "labels": lab.data_ptr(),
                            "workspace": ws.data_ptr(), "workspace_floats": 8})
    lab[0] = 10
    with pytest.raises(ValueError, match="label is outside"):
        lib.convnet_step(**{**base, "x": x.data_ptr(), "labels": lab.data_ptr(),
                            "workspace": ws.data_ptr(), "workspace_floats": 8})


def test_sgemm_batch_found_where_torch_has_mkl():
    if torch.backends.mkl.is_available():
        assert cs.sgemm_batch_address() != 0


def test_winograd_weight_pair_against_float64():
    w = torch.randn(5, 7, 3, 3, dtype=torch.float64)
    U, Uf = wg.winograd_weight_pair(w.float())
    G = torch.tensor(wg._G, dtype=torch.float64)
    assert torch.allclose(U.double(), torch.einsum("ai,kcij,bj->abkc", G, w, G).reshape(36, 5, 7),
                          atol=1e-6)
    turned = w.flip(2, 3)
    assert torch.allclose(Uf.double(),
                          torch.einsum("ai,kcij,bj->abkc", G, turned, G).reshape(36, 5, 7),
                          atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        wg.winograd_weight_pair(torch.zeros(2, 2, 5, 5))


def test_docstring_examples():
    assert doctest.testmod(cs, raise_on_error=False).failed == 0
    finder = doctest.DocTestFinder()
    for t in finder.find(wg.winograd_weight_pair, "winograd_weight_pair", globs=vars(wg)):
        assert doctest.DocTestRunner().run(t).failed == 0
