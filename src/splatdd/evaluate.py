"""The field's evaluation protocol for a distilled dataset.

For each of ``runs`` runs: build a fresh network (seeded ``seed + run``), train it on the distilled
images for ``epochs`` epochs -- SGD, momentum 0.9, weight decay 5e-4, learning rate ``lr`` (0.01,
or the learned lr from trajectory matching) multiplied by 0.1 at ``epochs // 2``, cross-entropy,
mini-batches of ``batch_size``, DSA on every batch -- then measure accuracy on the whole real
test set. Report mean and (population, ``np.std``-style) standard deviation over the runs, in %.

As in DSA's ``evaluate_synset``, the SGD optimiser is rebuilt (momentum reset) at the lr drop, and
training-time DSA draws its random parameters per sample. Every random choice derives from
``(seed, run)``: the shuffling and the per-step DSA seeds come from one private generator per run,
so the same arguments give the same accuracies (up to the backend's own nondeterminism on GPU).

On K processes (``torchrun``, :mod:`splatdd.distributed`) :func:`evaluate` spreads the runs over
the ranks (run ``r`` on rank ``r mod K``) and gathers their accuracies in run order: every rank
must call it (it is a collective) and every rank gets the whole result. Run ``r``'s seed is
:func:`run_seed` ``(seed, r)`` whichever rank trains it, so K processes report the accuracies one
process reports.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import convnet_step, distributed
from .augment import DEFAULT_STRATEGY, DSAParams, dsa as dsa_fn
from .checks import positive_int
from .models import first_order, get_network
from .plugin_api import DatasetSpec, RealData

__all__ = ["evaluate", "train_and_test", "train_network", "test_accuracy", "EvalResult", "run_seed",
           "default_chunk", "CPU_TRAIN_CHUNK", "CPU_TEST_CHUNK"]

#: Images per forward+backward pass when training on the CPU (gradients accumulate over the
#: passes of one SGD step; benchmarks/speed.py measured the choice).
CPU_TRAIN_CHUNK = 16
#: Images per forward pass of the CPU test pass (16: the widest activation, 2 MB, stays in
#: cache and ConvNet reuses its buffers; 7 % faster than 8 with the fused first block and
#: Winograd, benchmarks/speed.py).
CPU_TEST_CHUNK = 16


@dataclass
class EvalResult:
    mean: float                          # mean test accuracy, %
    std: float                           # population std over runs, %
    accs: list[float] = field(default_factory=list)   # per-run test accuracy, %
    train_seconds: float = 0.0           # wall-clock training time summed over runs
    test_seconds: float = 0.0            # wall-clock testing time summed over runs
    model: str = ""
    epochs: int = 0
    lr: float = 0.0

    def __str__(self) -> str:
        return (f"{self.model}: {self.mean:.2f} +- {self.std:.2f} % over {len(self.accs)} runs "
                f"({self.epochs} epochs, lr {self.lr:g}, train {self.train_seconds:.1f} s)")


def run_seed(seed: int, run: int) -> int:
    """Seed of run ``run`` (network init and the run's generator)."""
    return (int(seed) + int(run)) & 0x7FFF_FFFF_FFFF_FFFF


def _has_batch_statistics(net: nn.Module) -> bool:
    """True when ``net`` normalises with batch statistics (its outputs couple the samples)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def default_chunk(net: nn.Module, device: torch.device, *, training: bool) -> int | None:
    """Images per forward (and backward) pass: :data:`CPU_TRAIN_CHUNK` / :data:`CPU_TEST_CHUNK`
    on the CPU, ``None`` (the whole batch) on accelerators and, in training, for nets with batch
    statistics, whose output for one image depends on the others in its batch.

    >>> from splatdd.models import get_network
    >>> default_chunk(get_network("ConvNet", 1, 10, 28), torch.device("cpu"), training=True)
    16
    """
    if device.type != "cpu":
        return None
    if training:
        return None if _has_batch_statistics(net) else CPU_TRAIN_CHUNK
    return CPU_TEST_CHUNK


def test_accuracy(net: nn.Module, test: RealData, *, batch_size: int = 1000,
                  device: torch.device | str | None = None,
                  chunk: int | None | str = "auto", precision: str = "fp32") -> float:
    """Accuracy (%) of ``net`` on every image of ``test`` (batched, no grad, eval mode).

    ``batch_size`` images are moved to ``device`` at a time and run through ``net`` in passes
    of ``chunk`` images (``"auto"``: :func:`default_chunk`; ``None``: the whole batch). In eval
    mode every net here is per-sample, so the chunking changes no prediction beyond float
    rounding; on the CPU small passes keep the activations in cache instead of mapping and
    unmapping ~100 MB buffers per batch. ``precision="bf16"`` (opt-in) runs a bfloat16 copy of
    ``net`` where ``device`` has native bf16 (else fp32, with a warning:
    :func:`splatdd.precision.resolve_precision`): several times faster on CPUs with AMX/AVX512-BF16,
    with a few predictions changed by the rounding (benchmarks/results/speed.md measures it).

    >>> from splatdd.testing import make_tiny_real
    >>> from splatdd.models import get_network
    >>> real = make_tiny_real()
    >>> net = get_network("ConvNet", 1, 3, 8, width=8, seed=0)
    >>> 0.0 <= test_accuracy(net, real) <= 100.0
    True
    """
    device = torch.device(device) if device is not None else test.device
    if chunk == "auto":
        chunk = default_chunk(net, device, training=False)
    positive_int("chunk", chunk, allow_none=True)
    positive_int("batch_size", batch_size)
    from .precision import resolve_precision
    precision = resolve_precision(precision, device, who="test pass")
    was_training = net.training
    net.eval()
    run, dtype = net, torch.float32
    if precision == "bf16":
        import copy
        run, dtype = copy.deepcopy(net).to(torch.bfloat16), torch.bfloat16
    correct, n = 0, len(test.labels)
    try:
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                x = test.images[i:i + batch_size].to(device, dtype=dtype, non_blocking=True)
                y = test.labels[i:i + batch_size].to(device, non_blocking=True)
                step = x.shape[0] if chunk is None else chunk
                for j in range(0, x.shape[0], step):
                    correct += int((run(x[j:j + step]).argmax(1) == y[j:j + step]).sum())
    finally:
        net.train(was_training)
    return 100.0 * correct / max(n, 1)


test_accuracy.__test__ = False      # not a pytest test, whatever module imports it


def train_network(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  epochs: int = 1000, lr: float = 0.01, batch_size: int = 256, dsa: bool = True,
                  dsa_strategy: str = DEFAULT_STRATEGY, dsa_params: DSAParams = DSAParams(),
                  seed: int = 0, momentum: float = 0.9, weight_decay: float = 5e-4,
                  device: torch.device | str = "cpu", progress: bool = False,
                  desc: str = "train", optimizer: str = "sgd",
                  schedule: str = "step", chunk: int | None | str = "auto",
                  compiled: bool = True) -> nn.Module:
    """Train ``net`` in place on ``(images, labels)`` with the protocol above; returns ``net``.

    ``seed`` drives the shuffling and the DSA parameters (not the net's init: build ``net``
    seeded). ``labels`` are int class indices ``(n,)``. ``optimizer`` ``"sgd"`` (momentum,
    weight decay) or ``"adam"`` (weight decay); ``schedule`` ``"step"`` (x0.1 at half, new
    optimiser, as DSA) or ``"cosine"`` (annealed per epoch to 0, GSDD appendix B.2).

    Each SGD step runs forward and backward in passes of ``chunk`` images and accumulates the
    gradient of the batch-mean loss (``"auto"``: :func:`default_chunk`; ``None``: one pass). For
    per-sample nets (no batch statistics) this is the same gradient up to float rounding; the
    random stream (shuffling, DSA seeds and parameters) does not depend on ``chunk``. Where
    :func:`splatdd.convnet_step.applies` (ConvNets with instance norm on the CPU) each step's
    passes run in one compiled call, the same gradient up to float rounding; ``compiled=False``
    keeps autograd for every step (to compare, or to see module hooks fire).

    >>> from splatdd.models import get_network
    >>> x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> net = get_network("ConvNet", 1, 3, 8, width=8, seed=0)
    >>> train_network(net, x, y, epochs=2, seed=0) is net
    True
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if schedule not in ("step", "cosine"):
        raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
    device = torch.device(device)
    if any(t.device != device for t in itertools.chain(net.parameters(), net.buffers())):
        net = net.to(device)
    if chunk == "auto":
        chunk = default_chunk(net, device, training=True)
    positive_int("chunk", chunk, allow_none=True)
    if chunk is not None and _has_batch_statistics(net):
        raise ValueError(f"chunk={chunk} would split each batch of a net with batch norm (its "
                         "statistics couple the samples); use chunk=None")
    x_all = images.detach().to(device=device, dtype=torch.float32)
    y_all = labels.detach().to(device=device, dtype=torch.long)
    if x_all.shape[0] != y_all.shape[0] or x_all.shape[0] == 0:
        raise ValueError(f"need as many labels as images (>0), got {x_all.shape[0]} images and "
                         f"{y_all.shape[0]} labels")
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    n = x_all.shape[0]

    # torch's fused SGD where it has one for these tensors (one kernel for all of them: half the
    # step's time on the CPU here; the same update up to float rounding). It changes weights
    # without bumping their version counters: ConvNet's filter cache compares values, not versions.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                for p in net.parameters())

    def make_opt(lr_now: float) -> torch.optim.Optimizer:
        if optimizer == "adam":
            return torch.optim.Adam(net.parameters(), lr=lr_now, weight_decay=weight_decay)
        return torch.optim.SGD(net.parameters(), lr=lr_now, momentum=momentum,
                               weight_decay=weight_decay, fused=fused or None)

    opt = make_opt(lr)
    bar = None
    if progress:
        from .progress import progress_bar
        bar = progress_bar(total=epochs, desc=desc, unit="ep", leave=False)
    net.train()
    try:
        for ep in range(epochs):
            if schedule == "step" and epochs > 1 and ep == epochs // 2:
                opt = make_opt(lr * 0.1)          # as DSA: new optimiser, momentum reset
            elif schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * ep / epochs))
            perm = torch.randperm(n, generator=g).to(device)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                xb, yb = x_all[idx], y_all[idx]
                if dsa:
                    step_seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
                    xb = dsa_fn(xb, dsa_strategy, seed=step_seed, params=dsa_params,
                                per_sample=True)
                opt.zero_grad(set_to_none=True)
                with first_order(net):     # one derivative per step: fused ConvNet blocks
                    _loss_backward(net, xb, yb, chunk, compiled=compiled)
                opt.step()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return net


def _loss_backward(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                   chunk: int | None, *, compiled: bool = True) -> None:
    """Backpropagate the batch-mean cross-entropy, in passes of ``chunk`` images: in one compiled
    call where :func:`splatdd.convnet_step.applies` (unless ``compiled`` is False), else through
    autograd."""
    if compiled and convnet_step.applies(net, xb):
        convnet_step.loss_backward(net, xb, yb, chunk=chunk, _checked=True)
        return
    b = xb.shape[0]
    if chunk is None or b <= chunk:
        F.cross_entropy(net(xb), yb).backward()
        return
    for j in range(0, b, chunk):
        part = F.cross_entropy(net(xb[j:j + chunk]), yb[j:j + chunk], reduction="sum")
        (part / b).backward()


def train_and_test(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, test: RealData, *,
                   epochs: int = 1000, lr: float = 0.01, batch_size: int = 256, dsa: bool = True,
                   dsa_strategy: str = DEFAULT_STRATEGY, dsa_params: DSAParams = DSAParams(),
                   seed: int = 0, momentum: float = 0.9, weight_decay: float = 5e-4,
                   device: torch.device | str | None = None, test_batch_size: int = 1000,
                   progress: bool = False) -> float:
    """Train ``net`` (:func:`train_network`) then return its test accuracy (%) on ``test``."""
    device = torch.device(device) if device is not None else test.device
    train_network(net, images, labels, epochs=epochs, lr=lr, batch_size=batch_size, dsa=dsa,
                  dsa_strategy=dsa_strategy, dsa_params=dsa_params, seed=seed,
                  momentum=momentum, weight_decay=weight_decay, device=device,
                  progress=progress)
    return test_accuracy(net, test, batch_size=test_batch_size, device=device)


train_and_test.__test__ = False


def evaluate(images: torch.Tensor, labels: torch.Tensor, test: RealData, *,
             model: str = "ConvNet", runs: int = 3, epochs: int = 1000, lr: float = 0.01,
             batch_size: int = 256, dsa: bool = True, dsa_strategy: str = DEFAULT_STRATEGY,
             dsa_params: DSAParams = DSAParams(), seed: int = 0, progress: bool = True,
             device: torch.device | str | None = None, spec: DatasetSpec | None = None,
             test_batch_size: int = 1000, optimizer: str = "sgd", schedule: str = "step",
             test_precision: str = "fp32", **net_kwargs) -> EvalResult:
    """Evaluate distilled ``images`` ``(n, C, H, W)`` (normalised like ``test``) with ``labels``
    ``(n,)`` by training ``runs`` fresh ``model`` nets and testing them on ``test``.

    ``spec`` (default ``test.spec``) gives channels / classes; the resolution is the images'.
    Extra keyword arguments go to :func:`splatdd.models.get_network` (e.g. ``width``, ``norm``);
    ``optimizer``/``schedule`` as in :func:`train_network`; ``test_precision`` as
    :func:`test_accuracy`'s ``precision``.

    Under torchrun the runs are spread over the ranks and gathered (every rank must call it; only
    rank 0 shows a progress bar); ``train_seconds``/``test_seconds`` stay sums over all runs.

    Example::

        res = evaluate(images, labels, test, runs=2, epochs=300, progress=False)
        print(res.mean, res.accs)     # the same on 1 or K processes
    """
    spec = spec or test.spec
    device = torch.device(device) if device is not None else test.device
    if images.dim() != 4:
        raise ValueError(f"images must be (n, C, H, W), got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != tuple(test.images.shape[-2:]):
        raise ValueError(f"distilled images are {tuple(images.shape[-2:])} but the test images "
                         f"are {tuple(test.images.shape[-2:])}; decode at the test resolution")
    im_size = tuple(images.shape[-2:])
    mine = distributed.owned(range(runs))          # all runs in one process
    done: dict[int, tuple[float, float, float]] = {}     # run -> (accuracy, train s, test s)
    outer = None
    if progress and distributed.is_main():
        from .progress import progress_bar
        outer = progress_bar(total=len(mine), desc=f"eval {model}", unit="run")
    try:
        for r in mine:
            s = run_seed(seed, r)
            net = get_network(model, spec.channels, spec.num_classes, im_size, seed=s,
                              device=device, **net_kwargs)
            t0 = time.perf_counter()
            train_network(net, images, labels, epochs=epochs, lr=lr, batch_size=batch_size,
                          dsa=dsa, dsa_strategy=dsa_strategy, dsa_params=dsa_params, seed=s,
                          device=device, progress=outer is not None,
                          desc=f"run {r + 1}/{runs}", optimizer=optimizer, schedule=schedule)
            t1 = time.perf_counter()
            acc = test_accuracy(net, test, batch_size=test_batch_size, device=device,
                                precision=test_precision)
            done[r] = (acc, t1 - t0, time.perf_counter() - t1)
            if outer is not None:
                outer.update(1)
                outer.set_postfix(acc=f"{acc:.2f}")
    finally:
        if outer is not None:
            outer.close()
    if distributed.world_size() > 1:
        distributed.wait_for_all()                 # a rank may have had one net more
        for part in distributed.gather(done):
            done.update(part)
    accs = [done[r][0] for r in range(runs)]
    t_train = sum(done[r][1] for r in range(runs))
    t_test = sum(done[r][2] for r in range(runs))
    t = torch.tensor(accs, dtype=torch.float64)
    mean = float(t.mean()) if accs else float("nan")
    std = float(t.std(unbiased=False)) if accs else float("nan")
    return EvalResult(mean=mean, std=std, accs=accs, train_seconds=t_train, test_seconds=t_test,
                      model=model, epochs=epochs, lr=float(lr))
