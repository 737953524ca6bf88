"""Every bad input raises the documented exception, naming the offending argument, and never
crashes the process -- both through splatdd.render and directly through splatdd._C."""
from __future__ import annotations

import pytest
import torch

import splatdd
from splatdd import _C, reference


def good(B=2, N=3, C=3, dtype=torch.float32):
    p = torch.zeros(B, N, 6 + C, dtype=dtype)
    p[..., 2] = 0.2
    p[..., 4] = 0.2
    p[..., 5:] = 0.5
    return p


def nan_params():
    p = good()
    p[1, 2, 0] = float("nan")
    return p


def inf_params():
    p = good()
    p[0, 0, 6] = float("inf")
    return p


CASES = [
    # (description, kwargs for render, exception, substring of the message)
    ("params not a tensor", dict(params=[[0.0] * 9]), TypeError, "params"),
    ("int params", dict(params=torch.zeros(2, 3, 9, dtype=torch.int64)), TypeError, "params"),
    ("fp16 params", dict(params=torch.zeros(2, 3, 9, dtype=torch.float16)), TypeError, "params"),
    ("params rank 1", dict(params=torch.zeros(9)), ValueError, "params"),
    ("params rank 4", dict(params=torch.zeros(1, 2, 3, 9)), ValueError, "params"),
    ("C = 0", dict(params=torch.zeros(2, 3, 6)), ValueError, "params"),
    ("C = 9", dict(params=torch.zeros(2, 3, 15)), ValueError, "params"),
    ("last dim 5", dict(params=torch.zeros(2, 3, 5)), ValueError, "params"),
    ("NaN params", dict(params=nan_params()), ValueError, "params"),
    ("inf params", dict(params=inf_params()), ValueError, "params"),
    ("H = 0", dict(H=0), ValueError, "H"),
    ("W < 0", dict(W=-3), ValueError, "W"),
    ("H too large", dict(H=8193), ValueError, "H"),
    ("W too large", dict(W=10**9), ValueError, "W"),
    ("H float", dict(H=8.0), TypeError, "H"),
    ("W bool", dict(W=True), TypeError, "W"),
    ("W str", dict(W="8"), TypeError, "W"),
    ("too many samples", dict(H=8192, W=8192, ssaa=2), ValueError, "H * W * ssaa"),
    ("ssaa 3", dict(ssaa=3), ValueError, "ssaa"),
    ("ssaa 0", dict(ssaa=0), ValueError, "ssaa"),
    ("ssaa 8", dict(ssaa=8), ValueError, "ssaa"),
    ("ssaa float", dict(ssaa=2.0), TypeError, "ssaa"),
    ("prefilter not bool", dict(prefilter="yes"), TypeError, "prefilter"),
    ("prefilter int", dict(prefilter=1), TypeError, "prefilter"),
    ("unknown backend", dict(backend="gpu"), ValueError, "backend"),
    ("backend not str", dict(backend=None), ValueError, "backend"),
    ("counts with 3-D params", dict(counts=[3, 3]), ValueError, "counts"),
    ("counts sum too small", dict(params=torch.zeros(6, 9), counts=[2, 3]), ValueError, "counts"),
    ("counts sum too large", dict(params=torch.zeros(6, 9), counts=[4, 3]), ValueError, "counts"),
    ("negative count", dict(params=torch.zeros(6, 9), counts=[7, -1]), ValueError, "counts[1]"),
    ("float count", dict(params=torch.zeros(6, 9), counts=[3.0, 3]), TypeError, "counts[0]"),
    ("bool count", dict(params=torch.zeros(6, 9), counts=[True, 5]), TypeError, "counts[0]"),
    ("counts scalar", dict(params=torch.zeros(6, 9), counts=6), TypeError, "counts"),
    ("counts float tensor", dict(params=torch.zeros(6, 9), counts=torch.tensor([3.0, 3.0])), TypeError, "counts"),
    ("counts 2-D tensor", dict(params=torch.zeros(6, 9), counts=torch.tensor([[3, 3]])), ValueError, "counts"),
    ("counts negative tensor", dict(params=torch.zeros(6, 9), counts=torch.tensor([8, -2])), ValueError, "counts[1]"),
    ("counts on another device", dict(params=torch.zeros(6, 9), counts=torch.tensor([3, 3], device="meta")),
     ValueError, "counts"),
    ("params on an unsupported device", dict(params=torch.zeros(2, 3, 9, device="meta")), ValueError, "device"),
]


def _call(fn, kw):
    args = dict(params=good(), H=8, W=8)
    args.update(kw)
    params, H, W = args.pop("params"), args.pop("H"), args.pop("W")
    return fn(params, H, W, **args)


@pytest.mark.parametrize("desc,kw,exc,needle", CASES, ids=[c[0] for c in CASES])
def test_render_rejects(desc, kw, exc, needle):
    with pytest.raises(exc) as info:
        _call(splatdd.render, kw)
    assert needle in str(info.value), f"{desc}: message {str(info.value)!r} does not name {needle!r}"


# the reference has no backend argument and runs on any torch device
REF_CASES = [c for c in CASES if "backend" not in c[1] and "unsupported device" not in c[0]]


@pytest.mark.parametrize("desc,kw,exc,needle", REF_CASES, ids=[c[0] for c in REF_CASES])
def test_reference_rejects_the_same(desc, kw, exc, needle):
    with pytest.raises(exc) as info:
        _call(reference.render, kw)
    assert needle in str(info.value)


def test_cuda_backend_unavailable_or_wrong_device():
    p = good()
    if "cuda" not in _C.backends():
        with pytest.raises(RuntimeError, match="CUDA"):
            splatdd.render(p, 8, 8, backend="cuda")
    else:
        with pytest.raises(ValueError, match="params"):
            splatdd.render(p, 8, 8, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_backend_with_cuda_params():
    with pytest.raises(ValueError, match="params"):
        splatdd.render(good().cuda(), 8, 8, backend="cpu")
    with pytest.raises(ValueError, match="counts"):
        splatdd.render(torch.zeros(6, 9), 8, 8, counts=torch.tensor([3, 3], device="cuda"))


def test_backends_lists_cpu():
    assert splatdd.backends()[0] == "cpu"
    assert set(splatdd.backends()) <= {"cpu", "cuda"}
    assert isinstance(_C.cuda_device_count(), int)
    if "cuda" not in _C.backends():
        assert _C.cuda_device_count() == 0


# ----------------------------------------------------------------------------------------------
# the raw _C entry points validate their integers too (ValueError, never a crash)


def _raw_args(**over):
    B, N, C, H, W = 2, 3, 3, 8, 8
    params = good(B, N, C).reshape(B * N, 6 + C).contiguous()
    offsets = torch.tensor([0, N, 2 * N], dtype=torch.int64)
    out = torch.empty(B, C, H, W)
    a = dict(device="cpu", params=params.data_ptr(), dtype=0, offsets=offsets.data_ptr(), B=B, total=B * N,
             C=C, H=H, W=W, ssaa=2, prefilter=True, out=out.data_ptr(), num_threads=1, stream=0)
    a.update(over)
    return a, (params, offsets, out)  # keep the buffers alive


RAW_CASES = [
    (dict(C=0), "C"), (dict(C=9), "C"), (dict(ssaa=3), "ssaa"), (dict(H=0), "H"), (dict(W=-1), "W"),
    (dict(H=1 << 20), "H"), (dict(dtype=7), "dtype"), (dict(device="tpu"), "device"),
    (dict(B=-1), "B"), (dict(total=-5), "total"), (dict(offsets=0), "offsets"), (dict(params=0), "params"),
    (dict(out=0), "out"), (dict(num_threads=-2), "num_threads"), (dict(total=7), "offsets"),
]


@pytest.mark.parametrize("over,needle", RAW_CASES, ids=[str(c[0]) for c in RAW_CASES])
def test_raw_render_batch_rejects(over, needle):
    a, keep = _raw_args(**over)
    with pytest.raises(ValueError, match=needle):
        _C.render_batch(**a)
    del keep


def test_raw_offsets_must_be_monotone():
    a, keep = _raw_args()
    bad = torch.tensor([0, 5, 6], dtype=torch.int64)
    a["offsets"] = bad.data_ptr()
    _C.render_batch(**a)  # fine: 0 <= 5 <= 6 = total
    bad2 = torch.tensor([0, 7, 6], dtype=torch.int64)
    a["offsets"] = bad2.data_ptr()
    with pytest.raises(ValueError, match="offsets"):
        _C.render_batch(**a)
    del keep


def test_raw_backward_rejects_and_cuda_without_backend():
    a, keep = _raw_args()
    out = a.pop("out")
    grad = torch.zeros(6, 9)
    with pytest.raises(ValueError, match="grad_out"):
        _C.render_batch_backward(**a, grad_out=0, grad_params=grad.data_ptr())
    with pytest.raises(ValueError, match="grad_params"):
        _C.render_batch_backward(**a, grad_out=out, grad_params=0)
    with pytest.raises(ValueError, match="ssaa"):
        _C.render_batch_backward(**dict(a, ssaa=5), grad_out=out, grad_params=grad.data_ptr())
    if "cuda" not in _C.backends():
        with pytest.raises(RuntimeError, match="without the CUDA backend"):
            _C.render_batch(**dict(a, device="cuda", out=out))
    del keep
