"""The student unroll of trajectory matching, over one flat parameter vector, and its memory cost.

The student starts from an expert's flattened parameters ``theta_0`` and takes ``N`` SGD steps on
minibatches of synthetic images with a learnable learning rate::

    theta_{i+1} = theta_i - lr * d CE(f(aug(x_i); theta_i), y_i) / d theta_i

Each step calls the network through :func:`torch.func.functional_call` with ``theta_i`` split into
the network's parameter shapes, and keeps the graph (``create_graph=True``), so ``theta_N`` is
differentiable in the images and in ``lr``. The loss is MTT's normalised parameter distance
``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call
from splatdd.memory import proc_status_kb, reset_peak_rss

__all__ = ["flatten_params", "unflatten", "student_unroll", "tm_loss", "activation_bytes",
           "estimate_unroll_bytes", "measure_peak_bytes", "param_layout"]


def param_layout(net: torch.nn.Module) -> tuple[list[str], list[tuple[int, ...]]]:
    """Names and shapes of ``net``'s parameters, in ``named_parameters()`` order (the order of the
    flat vectors in an expert buffer)."""
    names, shapes = [], []
    for name, p in net.named_parameters():
        names.append(name)
        shapes.append(tuple(p.shape))
    return names, shapes


def flatten_params(net: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``net`` as one detached flat vector (``named_parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def unflatten(flat: torch.Tensor, names: Sequence[str], shapes: Sequence[Sequence[int]]
              ) -> dict[str, torch.Tensor]:
    """Split a flat vector into ``{name: view of the right shape}`` (differentiable)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat parameter vector has {flat.numel()} values, the network "
                         f"{sum(sizes)}")
    return {n: t.view(tuple(s)) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}


def student_unroll(net: torch.nn.Module, names: Sequence[str], shapes: Sequence[Sequence[int]],
                   theta0: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   lr: torch.Tensor, batches: Sequence[torch.Tensor],
                   augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """``theta_N`` after ``len(batches)`` differentiable SGD steps from ``theta0`` (a constant).

    ``batches[i]`` are row indices into ``images``/``labels`` for step ``i``; ``augment(x, i)``, if
    given, is applied to each minibatch (differentiably). The result's graph reaches ``images`` and
    ``lr``.
    """
    theta = theta0.detach().requires_grad_(True)
    for i, b in enumerate(batches):
        x = images.index_select(0, b)
        y = labels.index_select(0, b)
        if augment is not None:
            x = augment(x, i)
        out = functional_call(net, unflatten(theta, names, shapes), (x,))
        ce = F.cross_entropy(out, y)
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - lr * grad
    return theta


def tm_loss(theta_student: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor,
            eps: float = 1e-12) -> torch.Tensor:
    """``||theta_student - target||^2 / ||start - target||^2`` (the denominator is a constant)."""
    num = (theta_student - theta_target).pow(2).sum()
    den = (theta_start.detach() - theta_target.detach()).pow(2).sum().clamp_min(eps)
    return num / den


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def activation_bytes(net: torch.nn.Module, input_shape: Sequence[int],
                     dtype: torch.dtype = torch.float32) -> int:
    """Bytes of every leaf module's output for one forward pass on ``input_shape`` (shapes only:
    run on a copy of the network on the ``meta`` device, so nothing is computed)."""
    import copy

    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor):
                total += o.numel() * o.element_size()

    try:
        meta = copy.deepcopy(net).to("meta")
        x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    except Exception:  # noqa: BLE001 - fall back to a real forward on the CPU
        meta = copy.deepcopy(net).cpu()
        x = torch.zeros(tuple(input_shape), dtype=dtype)
    handles = [m.register_forward_hook(hook) for m in meta.modules()
               if len(list(m.children())) == 0]
    try:
        with torch.no_grad():
            meta(x)
    finally:
        for h in handles:
            h.remove()
    return int(total)


#: Saved tensors per student step, in units of one forward pass's leaf-module outputs: the
#: forward's saved inputs/outputs plus the first backward's saved tensors for the double backward.
#: Calibrated on ConvNet-3 / FashionMNIST (measured 1.34-1.45 with torch.profiler, see docs/tm.md).
ACTIVATION_FACTOR = 1.5


def estimate_unroll_bytes(num_params: int, syn_steps: int, act_bytes_per_step: int,
                          param_bytes: int = 4) -> dict[str, int]:
    """Estimate of what the student unroll keeps alive until the backward pass.

    Per step the graph holds ``theta_i`` and ``grad_i`` (2 flat vectors) and the tensors saved for
    the double backward through ``create_graph=True``: about :data:`ACTIVATION_FACTOR` times the
    leaf-module outputs of one forward pass (``act_bytes_per_step``). Total
    ``syn_steps * (2 * num_params * param_bytes + ACTIVATION_FACTOR * act_bytes_per_step)``.
    """
    params = syn_steps * 2 * num_params * param_bytes
    acts = int(syn_steps * ACTIVATION_FACTOR * act_bytes_per_step)
    return {"params_bytes": int(params), "activation_bytes": int(acts),
            "total_bytes": int(params + acts)}


def measure_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu"
                       ) -> dict[str, object]:
    """Run ``fn()`` once and report the peak of memory it used on top of what was live before.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor bytes
      held by torch's caching allocator; ``method = "cuda.max_memory_allocated"``).
    * CPU: the running sum of the allocation/free events recorded by ``torch.profiler`` with
      ``profile_memory=True`` (bytes of tensors torch allocates while ``fn`` runs, its peak;
      ``method = "torch.profiler"``). If those events are unavailable, the growth of the process's
      peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
      ``method = "rss"``), which also counts allocator caching and anything else the process does.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device) - base),
                "method": "cuda.max_memory_allocated"}
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            if str(e.device_type()).endswith("CPU"):
                cur += int(e.nbytes())
                peak = max(peak, cur)
        if events:
            return {"peak_bytes": int(peak), "method": "torch.profiler"}
    except Exception:  # noqa: BLE001 - private profiler API; fall back to RSS
        pass
    if reset_peak_rss():
        before = proc_status_kb("VmRSS") * 1024
        fn()
        return {"peak_bytes": int(max(proc_status_kb("VmHWM") * 1024 - before, 0)), "method": "rss"}
    fn()
    return {"peak_bytes": None, "method": "unavailable"}
