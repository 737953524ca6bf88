"""Multi-process runs on torch.distributed: launched by ``torchrun``, the same results as one process.

``torchrun --nproc_per_node=K -m splatdd distill --config ...`` starts K processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`init_from_env` (called by the CLI) initialises the
process group from them: NCCL when the processes use CUDA devices (each on ``cuda:LOCAL_RANK``),
gloo on the CPU. Without those variables nothing changes: one process, no process group.

The state lives in torch.distributed itself (no module globals here): every helper asks
``torch.distributed`` for the rank and world size, so code that never initialises a group sees
rank 0 of 1.

What is split and what is replicated (docs/distributed.md):

* every rank holds the whole synthetic set and the same optimiser state;
* an algorithm whose loss is a sum of per-class terms (``dm``, ``dc``) computes only the classes
  :func:`owned` gives its rank; the parameterization's gradients are summed over ranks
  (:func:`reduce_gradients`) before the optimiser step, so every rank takes the same step, the step
  one process would take (up to floating-point summation order);
* an algorithm that averages independent replicas (``tm``: one expert segment per rank) has its
  gradients averaged instead (``Algorithm.distributed = "replicas"``);
* evaluation nets and experts are spread over ranks and gathered (:func:`owned`, :func:`gather`);
* only rank 0 writes files (:func:`is_main`); every rank loads the checkpoint on resume.

Example (a per-class loss)::

    from splatdd import distributed
    for c in distributed.owned(range(num_classes)):
        loss = loss + class_term(c)
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, TypeVar

import torch

__all__ = ["Context", "env_requests_distributed", "init_from_env", "shutdown", "rank",
           "world_size", "is_main", "owned", "item_generator", "reduce_gradients", "all_reduce_sum", "gather",
           "broadcast_object", "barrier", "wait_for_all", "DEFAULT_TIMEOUT_S", "DEFAULT_WAIT_S",
           "GRADIENT_REDUCTIONS"]

T = TypeVar("T")

#: Seconds a collective waits for a rank before it fails (a rank that crashed or hangs makes the
#: others stop with an error instead of waiting forever). ``SPLATDD_DIST_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT_S = 120
#: Seconds :func:`wait_for_all` lets ranks wait for each other after unevenly long work (evaluation
#: nets, experts: one rank may train one more net than another). ``SPLATDD_DIST_WAIT`` overrides it.
DEFAULT_WAIT_S = 24 * 3600
#: How an algorithm's gradients combine over ranks: ``"sum"`` of per-class parts, ``"mean"`` of
#: independent replicas.
GRADIENT_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and ``backend``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_requests_distributed(env: dict[str, str] | None = None) -> bool:
    """Whether ``torchrun`` (or another launcher) set ``RANK`` and ``WORLD_SIZE``."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def _timeout(var: str = "SPLATDD_DIST_TIMEOUT", default: float = DEFAULT_TIMEOUT_S
             ) -> datetime.timedelta:
    text = os.environ.get(var, str(default))
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{var} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"{var} must be positive, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: str = "cpu") -> Context:
    """Initialise the process group from torchrun's environment (no-op without it) and return the
    :class:`Context`. ``device`` ``"cuda"`` (or ``"cuda:N"``) selects NCCL and ``cuda:LOCAL_RANK``;
    anything else gloo. Calling it again returns the existing group's context."""
    import torch.distributed as dist
    if not env_requests_distributed():
        return Context(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r}: CUDA is not available on rank "
                               f"{os.environ.get('RANK')}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=_timeout())
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=local_rank, backend=dist.get_backend(), device=device)


def shutdown(sync: bool = True) -> None:
    """Leave the process group, if any (the CLI calls it on exit).

    With ``sync`` (a rank that finished its work) every rank first waits for the others through
    the store (:func:`wait_for_all`), so no rank tears its connections down while another still
    finishes (rank 0 writes the run's files after the last collective) or still has messages in
    flight: gloo can abort a process whose peers vanish under it. Once every rank is there, every
    collective has returned on every rank; a collective here (a barrier) would only put new
    messages in flight just before the destroy. A rank that leaves
    because of an error passes ``sync=False``: the others may never arrive, and torchrun ends
    the job.

    Example (a script run by ``torchrun --nproc_per_node=K script.py``)::

        ctx = distributed.init_from_env("cpu")
        finished = False
        try:
            work(ctx)
            finished = True
        finally:
            distributed.shutdown(sync=finished)
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if sync:
        wait_for_all()
    dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    import torch.distributed as dist
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints results (rank 0)."""
    return rank() == 0


def owned(items: Iterable[T]) -> list[T]:
    """The items this rank handles: item ``i`` goes to rank ``i % world_size`` (all of them in
    one process). Used for per-class loss terms, evaluation nets and experts."""
    k, r = world_size(), rank()
    return [x for i, x in enumerate(items) if i % k == r]


def item_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for item ``index`` (e.g. a class) of a step whose shared seed is ``seed``:
    the same stream on whichever rank handles the item, so K processes draw exactly what one
    process draws (real batches, augmentation seeds) however the items are split."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def reduce_gradients(params: Iterable[torch.Tensor], op: str = "sum") -> int:
    """All-reduce the ``.grad`` of ``params`` over ranks (``op`` ``"sum"`` or ``"mean"``), in one
    flattened buffer; a parameter without a gradient counts as zeros. Returns the bytes reduced per
    rank (0 in one process)."""
    if op not in GRADIENT_REDUCTIONS:
        raise ValueError(f"op must be one of {GRADIENT_REDUCTIONS}, got {op!r}")
    if not _active() or world_size() == 1:
        return 0
    import torch.distributed as dist
    params = [p for p in params if p.requires_grad]
    if not params:
        return 0
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if op == "mean":
        flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
    return flat.numel() * flat.element_size()


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over ranks (the value itself in one process)."""
    if not _active() or world_size() == 1:
        return float(value)
    import torch.distributed as dist
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not _active() or world_size() == 1:
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active() or world_size() == 1:
        return obj
    import torch.distributed as dist
    box: Sequence[Any] = [obj]
    dist.broadcast_object_list(box, src=src)   # type: ignore[arg-type]
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if _active() and world_size() > 1:
        import torch.distributed as dist
        dist.barrier()


def wait_for_all() -> None:
    """Wait for every rank after work of uneven length (the evaluation nets or experts
    :func:`owned` gave each rank), up to ``SPLATDD_DIST_WAIT`` seconds (:data:`DEFAULT_WAIT_S`)
    instead of the short collective timeout; nothing in one process. A rank that died ends the job
    through torchrun before that. Call it on every rank (the same number of times), then
    gather.

    Example::

        mine = {r: train_and_test(r) for r in distributed.owned(range(runs))}
        distributed.wait_for_all()
        parts = distributed.gather(mine)
    """
    if not _active() or world_size() == 1:
        return
    from torch.distributed import distributed_c10d
    # Through the process group's own key-value store (torchrun's rendezvous store): a collective
    # would fail after the short timeout on the rank that waits (gloo's send times out even in a
    # monitored barrier). Each rank counts its waits in the store, so the n-th wait of every rank
    # uses the same keys.
    store = distributed_c10d._get_default_store()
    r, k = rank(), world_size()
    n = store.add(f"splatdd/wait_count/{r}", 1)
    store.set(f"splatdd/wait/{n}/{r}", "1")
    store.wait([f"splatdd/wait/{n}/{i}" for i in range(k)],
               _timeout("SPLATDD_DIST_WAIT", DEFAULT_WAIT_S))
