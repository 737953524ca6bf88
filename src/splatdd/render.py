"""Differentiable batched 2D Gaussian splatting: :func:`render`.

Contract and maths: docs/renderer.md. The compiled module :mod:`splatdd._C` does not link libtorch;
this file checks every input, allocates the buffers with torch and hands raw addresses to it. A
:class:`torch.autograd.Function` joins the forward and backward entry points.
"""
from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["render", "backends", "MAX_CHANNELS", "MAX_SIDE", "MAX_SAMPLES", "MAX_BYTES", "MAX_BATCH"]

#: Channels per Gaussian: 1 .. MAX_CHANNELS.
MAX_CHANNELS = 8
#: Largest accepted H or W.
MAX_SIDE = 8192
#: Largest accepted number of samples per image, H * W * ssaa**2.
MAX_SAMPLES = 1 << 26
#: Largest accepted number of images B in one call.
MAX_BATCH = (1 << 31) - 1
#: Largest accepted output plus workspace of one call, in bytes; a call is also refused when that
#: exceeds the physical memory of the device (CPU: RAM; CUDA: the GPU's memory). Checked before
#: anything is allocated (see _check_memory).
MAX_BYTES = 1 << 40
#: When True, CUDA parameters are also checked for NaN/inf (costs a host synchronisation per call;
#: CPU parameters are always checked).
CHECK_FINITE_ON_CUDA = False

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}
_BACKENDS = ("auto", "cpu", "cuda")

_ext = None


def _C():
    """The compiled extension, imported on first use (``import splatdd`` works without it)."""
    global _ext
    if _ext is None:
        try:
            from . import _C as ext  # type: ignore[attr-defined]
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise ImportError(
                "splatdd's compiled renderer (splatdd._C) is not available; build it with "
                "`pip install --no-build-isolation -e .` in the repository"
            ) from err
        _ext = ext
    return _ext


def backends() -> list:
    """Backends usable in this process: ``["cpu"]`` or ``["cpu", "cuda"]``.

    ``"cuda"`` is listed when the extension was compiled with the CUDA backend and at least one
    CUDA device is visible (to the extension and to torch).
    """
    ext = _C()
    out = ["cpu"]
    if "cuda" in ext.backends() and ext.cuda_device_count() > 0 and torch.cuda.is_available():
        out.append("cuda")
    return out


# --------------------------------------------------------------------------------------------
# Input checks


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def _check_counts(counts, params: torch.Tensor) -> list:
    """Validate `counts` (sequence of ints or 1-D integer tensor) and return it as a list."""
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1:
            raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
        if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
            raise TypeError(f"counts must hold integers, got dtype {counts.dtype}")
        if counts.device.type != "cpu" and counts.device != params.device:
            raise ValueError(
                f"counts is on {counts.device} but params is on {params.device}; counts must be on "
                "the CPU or on params' device"
            )
        values = [int(c) for c in counts.tolist()]
    elif isinstance(counts, (list, tuple)):
        values = []
        for i, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise TypeError(f"counts[{i}] must be an int, got {type(c).__name__}")
            values.append(int(c))
    else:
        raise TypeError(
            f"counts must be a sequence of ints or a 1-D integer tensor, got {type(counts).__name__}"
        )
    for i, c in enumerate(values):
        if c < 0:
            raise ValueError(f"counts[{i}] must be >= 0, got {c}")
    if sum(values) != params.shape[0]:
        raise ValueError(
            f"counts add up to {sum(values)} but params has {params.shape[0]} Gaussians (rows)"
        )
    return values


def _check_common(params, H, W, ssaa, prefilter, counts):
    """Checks shared by splatdd.render and splatdd.reference.render.

    Returns (B, C, counts_list or None, H, W, ssaa).
    """
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    if params.dtype not in _DTYPE_CODE:
        raise TypeError(
            f"params must be float32, bfloat16 or float64, got {params.dtype}"
        )
    H = _check_int("H", H, 1, MAX_SIDE)
    W = _check_int("W", W, 1, MAX_SIDE)
    ssaa = _check_int("ssaa", ssaa, 1)
    if ssaa not in (1, 2, 4):
        raise ValueError(f"ssaa must be 1, 2 or 4, got {ssaa}")
    if H * W * ssaa * ssaa > MAX_SAMPLES:
        raise ValueError(
            f"H * W * ssaa**2 = {H * W * ssaa * ssaa} samples per image is too large "
            f"(max {MAX_SAMPLES})"
        )
    if isinstance(prefilter, np.bool_):
        prefilter = bool(prefilter)
    if not isinstance(prefilter, bool):
        raise TypeError(f"prefilter must be a bool (True or False), got {type(prefilter).__name__}")
    if counts is None:
        if params.dim() != 3:
            raise ValueError(
                "params must be (B, N, 6+C), or (sum N_i, 6+C) with counts=; got shape "
                f"{tuple(params.shape)}"
            )
    else:
        if params.dim() != 2:
            raise ValueError(
                f"params must be 2-D (sum N_i, 6+C) when counts is given, got shape {tuple(params.shape)}"
            )
    P = params.shape[-1]
    C = P - 6
    if not 1 <= C <= MAX_CHANNELS:
        raise ValueError(
            f"params' last dimension must be 6 + C with C in 1..{MAX_CHANNELS} "
            f"([u, v, l11, l21, l22, c_1..c_C, alpha]), got {P}"
        )
    counts_list = None
    if counts is not None:
        counts_list = _check_counts(counts, params)
        B = len(counts_list)
    else:
        B = params.shape[0]
    return B, C, counts_list, H, W, ssaa


def _device_memory(device: torch.device) -> Optional[int]:
    """Physical memory of `device` in bytes (None when unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):  # pragma: no cover - platform
        return None


def render_bytes(B: int, C: int, H: int, W: int, total: int, dtype: torch.dtype) -> int:
    """Bytes one :func:`render` call allocates beyond its inputs: the (B, C, H, W) output, the
    (B + 1) int64 image offsets and, for the backward, the (total, 6 + C) gradient.

    Example::

        render_bytes(64, 3, 128, 128, 64 * 170, torch.float32)   # 12,656,136
    """
    elem = 8 if dtype == torch.float64 else 4
    return B * C * H * W * elem + (B + 1) * 8 + total * (6 + C) * elem


def _check_memory(B: int, C: int, H: int, W: int, params: torch.Tensor, device: torch.device) -> None:
    """Refuse, before allocating anything, a call whose output plus workspace exceeds MAX_BYTES or
    the device's physical memory (B = 2**31 empty images would otherwise allocate 16 GiB of offsets
    and then fail in the allocator)."""
    if B > MAX_BATCH:
        raise ValueError(f"params/counts describe B = {B} images; at most {MAX_BATCH} per call")
    need = render_bytes(B, C, H, W, params.shape[0] if params.dim() == 2 else
                        params.shape[0] * params.shape[1], params.dtype)
    limit = MAX_BYTES
    mem = _device_memory(device)
    where = f"MAX_BYTES = {MAX_BYTES}"
    if mem is not None and mem < limit:
        limit, where = mem, f"the {mem} bytes of physical memory on {device}"
    if need > limit:
        raise ValueError(
            f"output plus workspace of this call, B * C * H * W = {B} * {C} * {H} * {W} values "
            f"({need} bytes), exceeds {where}; render fewer images (params' first dimension / "
            "counts) or smaller H, W per call"
        )


def _check_finite(params: torch.Tensor) -> None:
    if params.numel() and not bool(torch.isfinite(params).all()):
        raise ValueError("params contains NaN or inf")


# --------------------------------------------------------------------------------------------
# autograd


class _RenderFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params, offsets, B, C, H, W, ssaa, prefilter, device):
        ext = _C()
        total = params.shape[0]
        acc_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
        ctx.meta = (B, C, H, W, ssaa, prefilter, device, acc_dtype)
        ctx.state = None
        if B == 0 or total == 0:
            ctx.save_for_backward(params, offsets)
            return params.new_zeros((B, C, H, W), dtype=acc_dtype)
        if device == "cpu":
            out = torch.empty((B, C, H, W), dtype=acc_dtype, device=params.device)
            ext.render_batch(
                "cpu", params.data_ptr(), _DTYPE_CODE[params.dtype], offsets.data_ptr(), B,
                total, C, H, W, ssaa, prefilter, out.data_ptr(), torch.get_num_threads(), 0,
            )
        else:
            # the CUDA forward writes every pixel (zeros where no Gaussian reaches)
            out = torch.empty((B, C, H, W), dtype=acc_dtype, device=params.device)
            with torch.cuda.device(params.device):
                stream = torch.cuda.current_stream(params.device).cuda_stream
                ctx.state = ext.render_batch(
                    "cuda", params.data_ptr(), _DTYPE_CODE[params.dtype], offsets.data_ptr(), B,
                    total, C, H, W, ssaa, prefilter, out.data_ptr(), 0, stream,
                )
        ctx.save_for_backward(params, offsets)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        params, offsets = ctx.saved_tensors
        B, C, H, W, ssaa, prefilter, device, acc_dtype = ctx.meta
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        total = params.shape[0]
        grad = torch.zeros((total, 6 + C), dtype=acc_dtype, device=params.device)
        if B > 0 and total > 0 and grad_out is not None:
            grad_out = grad_out.to(acc_dtype).resolve_neg().resolve_conj().contiguous()
            ext = _C()
            if device == "cpu":
                ext.render_batch_backward(
                    "cpu", params.data_ptr(), _DTYPE_CODE[params.dtype], offsets.data_ptr(), B,
                    total, C, H, W, ssaa, prefilter, grad_out.data_ptr(), grad.data_ptr(),
                    torch.get_num_threads(), 0, None,
                )
            else:
                with torch.cuda.device(params.device):
                    stream = torch.cuda.current_stream(params.device).cuda_stream
                    ext.render_batch_backward(
                        "cuda", params.data_ptr(), _DTYPE_CODE[params.dtype], offsets.data_ptr(),
                        B, total, C, H, W, ssaa, prefilter, grad_out.data_ptr(), grad.data_ptr(),
                        0, stream, ctx.state,
                    )
        return (grad.to(params.dtype),) + (None,) * 8


def render(
    params: torch.Tensor,
    H: int,
    W: int,
    *,
    ssaa: int = 2,
    prefilter: bool = True,
    counts: Optional[Union[Sequence[int], torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Render batches of 2D Gaussian mixtures to images, differentiably.

    Args:
        params: ``(B, N, 6 + C)`` or, with ``counts``, ragged ``(sum N_i, 6 + C)``; per Gaussian
            ``[u, v, l11, l21, l22, c_1 .. c_C, alpha]`` (see docs/renderer.md). float32, bfloat16
            or float64, on the CPU or a CUDA device.
        H, W: output size in pixels (1 .. 8192 each, H * W * ssaa**2 <= 2**26).
        ssaa: supersampling factor per side, 1, 2 or 4.
        prefilter: add the one-sample box-filter variance 1/12 (sample units) to every covariance.
        counts: Gaussians per image for ragged ``params`` (ints >= 0, may be 0), a sequence or a
            1-D integer tensor on the CPU or on params' device.
        backend: ``"auto"`` (the device of ``params``), ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(B, C, H, W)`` images: float64 for float64 params, float32 otherwise. Gradients flow
        back to ``params`` in its own dtype.

    Raises:
        TypeError: params not a tensor or of an unsupported dtype; a non-int size/ssaa/count.
        ValueError: bad shapes, sizes, ssaa, counts, NaN/inf params, unknown backend name,
            unsupported or mismatched devices.
        RuntimeError: ``backend="cuda"`` when the CUDA backend is not available.
    """
    B, C, counts_list, H, W, ssaa = _check_common(params, H, W, ssaa, prefilter, counts)
    prefilter = bool(prefilter)
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    dev = params.device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"params is on an unsupported device {dev} (supported: cpu, cuda)")
    device = dev.type if backend == "auto" else backend
    if device == "cuda":
        if "cuda" not in _C().backends():
            raise RuntimeError("backend 'cuda' requested but splatdd was built without the CUDA backend")
        if dev.type != "cuda":
            raise ValueError(f"backend='cuda' needs params on a CUDA device, got params on {dev}")
    elif dev.type != "cpu":
        raise ValueError(f"backend='cpu' needs params on the CPU, got params on {dev}")

    _check_memory(B, C, H, W, params, dev if device == "cuda" else torch.device("cpu"))
    # A tensor with the negative (or conjugate) bit set is a lazy view whose raw storage holds the
    # un-negated values: resolve it before handing out its address (issue 14).
    params = params.resolve_neg().resolve_conj()
    if counts_list is None:
        N = params.shape[1]
        flat = params.reshape(B * N, 6 + C)
        offsets_list = None
    else:
        N = None
        flat = params
        offsets_list = [0]
        for c in counts_list:
            offsets_list.append(offsets_list[-1] + c)
    if device == "cpu" or CHECK_FINITE_ON_CUDA:
        _check_finite(flat)
    flat = flat.contiguous()
    # offsets: host memory for the CPU backend, device memory for CUDA (built without a host sync:
    # on the device for equal counts, an asynchronous copy from pinned memory for ragged ones)
    if device == "cpu":
        if offsets_list is None:
            offsets = torch.arange(B + 1, dtype=torch.int64) * N
        else:
            offsets = torch.tensor(offsets_list, dtype=torch.int64)
    elif offsets_list is None:
        offsets = torch.arange(B + 1, dtype=torch.int64, device=dev) * N
    else:
        offsets = torch.tensor(offsets_list, dtype=torch.int64).pin_memory().to(dev, non_blocking=True)
    return _RenderFunction.apply(flat, offsets, B, C, H, W, ssaa, prefilter, device)
