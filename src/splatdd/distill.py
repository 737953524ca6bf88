"""The distillation loop: optimiser, progress bar, atomic checkpoints, bit-exact resume.

Per step (see :class:`splatdd.plugin_api.Algorithm`)::

    loss = algo.loss(param, step) (+ param.regularization())
    opt.zero_grad(); loss.backward(); opt.step(); algo.after_step(param); param.post_step()

Checkpoints (``out_dir/checkpoint.pt``, written atomically every ``checkpoint_every`` steps and at
the end) hold the parameterization's ``state_dict``, the optimiser state, ``algo.state_dict()``, the
state of ``algo.generator`` and of torch's global RNGs (CPU and CUDA) and of ``random``/``numpy``,
the step, the loss history and the run config. ``resume=True`` restores all of it, so an
interrupted and resumed run ends in exactly the same state as an uninterrupted one, provided the
plugins draw all their randomness from ``algo.generator`` (or, as a fallback, torch's global RNG).

At the end the loop writes ``out_dir/distilled.safetensors`` (:mod:`splatdd.distilled_file`),
``out_dir/history.json`` (losses and any evaluations) and ``out_dir/loss.png``.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from splatdd import distributed
from splatdd.budget import check_budget
from splatdd.io_utils import atomic_save_with, atomic_torch_save, atomic_write_json
from splatdd.plugin_api import Algorithm, Parameterization, learned_eval_lr
from splatdd.run_folder import translate_write_errors

__all__ = ["distill", "run_step", "Interrupted", "CHECKPOINT_NAME", "DISTILLED_NAME", "checkpoint_path", "has_checkpoint",
           "load_checkpoint", "CheckpointError", "CheckpointMismatch", "CorruptCheckpoint",
           "check_resume", "RESUME_MAY_CHANGE", "plot_losses"]

CHECKPOINT_NAME = "checkpoint.pt"
DISTILLED_NAME = "distilled.safetensors"
HISTORY_NAME = "history.json"
LOSS_PLOT_NAME = "loss.png"
CHECKPOINT_FORMAT = 1


#: Run settings that may differ between a run and its resumption (where the data lives).
RESUME_MAY_CHANGE = frozenset({"dataset_root"})
_CHECKPOINT_KEYS = ("step", "identity", "config", "param", "optimizer", "algo", "rng", "losses")


class CheckpointError(ValueError):
    """The checkpoint in ``out_dir`` cannot be used to resume; the message says why."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint in ``out_dir`` belongs to a different run (other plugins, ipc, seed, lr...)."""


class CorruptCheckpoint(CheckpointError):
    """The checkpoint file is empty, truncated, garbage, not a file, or lacks required parts."""


def checkpoint_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT_NAME


def has_checkpoint(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` has anything at the checkpoint's path (a directory or FIFO there counts:
    :func:`load_checkpoint` then refuses it, rather than a resume silently starting afresh)."""
    return os.path.lexists(checkpoint_path(out_dir))


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``out_dir/checkpoint.pt``; :class:`CorruptCheckpoint` says what is wrong and
    what to do (an empty or truncated file is what a write killed mid-way by an older splatdd
    left, since writes are atomic now)::

        ckpt = load_checkpoint("runs/fmnist"); ckpt["step"]
    """
    import stat as _stat

    path = checkpoint_path(out_dir)
    fix = f"delete {path} to start afresh (or restore it), or use another --out"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CorruptCheckpoint(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not _stat.S_ISREG(st.st_mode):
        kind = "a directory" if _stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise CorruptCheckpoint(f"checkpoint {path} is {kind}; {fix}")
    if st.st_size == 0:
        raise CorruptCheckpoint(f"checkpoint {path} is empty (0 bytes); {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch/pickle raise many types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                                f"{first}); {fix}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CorruptCheckpoint(f"{path} is not a splatdd checkpoint (format "
                                f"{CHECKPOINT_FORMAT}); {fix}")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} lacks {', '.join(missing)}; {fix}")
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CorruptCheckpoint(f"checkpoint {path}: step must be an int >= 0, got {step!r}; {fix}")
    losses = ckpt["losses"]
    if not isinstance(losses, list) or len(losses) != step:
        got = len(losses) if isinstance(losses, list) else "no"
        raise CorruptCheckpoint(f"checkpoint {path}: {got} losses for step {step}; {fix}")
    if not isinstance(ckpt["identity"], dict) or not isinstance(ckpt["config"], dict):
        raise CorruptCheckpoint(f"checkpoint {path}: identity/config are not dicts; {fix}")
    return ckpt


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every differing (nested) key, sorted."""
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {repr(a)[:40]} -> {repr(b)[:40]}")
    return out


def check_resume(ckpt: Mapping[str, Any], identity: Mapping[str, Any],
                 run_config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume ``ckpt`` with another run's identity or changed settings (seed, lr,
    options...; keys in :data:`RESUME_MAY_CHANGE` excepted): :class:`CheckpointMismatch` names
    each differing key with its old and new value::

        check_resume(load_checkpoint(out), identity, run_config, checkpoint_path(out))
    """
    diff = _differences(ckpt["identity"], identity)
    if diff:
        raise CheckpointMismatch(
            f"{path} is from a different run ({'; '.join(diff)}); use another --out directory or "
            f"delete the checkpoint")
    old = {k: v for k, v in ckpt["config"].items() if k not in RESUME_MAY_CHANGE}
    new = {k: v for k, v in run_config.items() if k not in RESUME_MAY_CHANGE}
    diff = _differences(old, new)
    if diff:
        raise CheckpointMismatch(
            f"cannot resume {path} with changed settings ({'; '.join(diff)}): the checkpoint's "
            f"tensors follow the old ones; rerun with the original settings, or use another --out")


# ---- RNG state --------------------------------------------------------------------------------------
def _rng_state(algo: Algorithm) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    gen = getattr(algo, "generator", None)
    if isinstance(gen, torch.Generator):
        state["algo_generator"] = gen.get_state()
        state["algo_generator_device"] = str(gen.device)
    return state


def _set_rng_state(algo: Algorithm, state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    gen = getattr(algo, "generator", None)
    if "algo_generator" in state:
        if not isinstance(gen, torch.Generator):
            raise CheckpointMismatch("checkpoint has a generator state but the algorithm has no "
                                     "torch.Generator")
        gen.set_state(state["algo_generator"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# ---- plots -----------------------------------------------------------------------------------------
def plot_losses(losses: list[float], path: str | os.PathLike, *, title: str = "") -> Path:
    """Loss curve (raw and smoothed) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 50)
        sm = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
              for i in range(len(losses))]
        ax.plot(steps, sm, lw=1.5, label=f"moving mean ({k})")
    if losses and min(losses) > 0 and max(losses) / max(min(losses), 1e-30) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    atomic_save_with(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


# ---- the loop --------------------------------------------------------------------------------------
def _identity(param: Parameterization, algo: Algorithm, ipc: int) -> dict[str, Any]:
    spec = algo.real.spec
    return {"parameterization": param.name, "algorithm": algo.name, "ipc": int(ipc),
            "dataset": spec.name, "resolution": [spec.height, spec.width],
            "num_classes": spec.num_classes, "param_config": param.config(),
            "algo_config": algo.config()}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`distill`. ``step`` steps are done; ``checkpoint`` is the checkpoint
    holding them (``None``: nothing of this run was saved, a new run starts from scratch)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint


class _GracefulInterrupt:
    """The first SIGINT asks the loop to stop after the current step (which is then checkpointed);
    a second one interrupts at once. Installed only in the main thread; restored afterwards."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nsplatdd: interrupt: finishing the current step, then saving a checkpoint "
              "(Ctrl-C again to stop at once, keeping the last checkpoint)", file=sys.stderr,
              flush=True)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def run_step(param: Parameterization, algo: Algorithm, opt: torch.optim.Optimizer,
             step: int) -> float:
    """One outer step, the only copy (the loop below and :mod:`splatdd.testing` call it)::

        total = algo.loss(param, step) (+ param.regularization())
        opt.zero_grad(); total.backward(); opt.step(); algo.after_step(param); param.post_step()

    Returns the loss value; raises ``FloatingPointError`` on a non-finite loss (nothing stepped).
    """
    k = distributed.world_size()
    op = algo.gradient_reduction or "sum"
    loss = algo.loss(param, step)
    # with summed per-rank parts, the regularisation is added once (rank 0); replicas all add it
    reg = param.regularization() if (op == "mean" or distributed.is_main()) else None
    total = loss if reg is None else loss + reg
    value = float(total.detach())
    if k > 1:                              # every rank sees the same loss and stops together
        value = distributed.all_reduce_sum(value) / (k if op == "mean" else 1)
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} at step {step}; try a smaller --lr")
    opt.zero_grad(set_to_none=True)
    total.backward()
    if k > 1:
        distributed.reduce_gradients([*param.parameters(), *algo.extra_parameters()], op=op)
    opt.step()
    algo.after_step(param)
    param.post_step()
    return value


def distill(param: Parameterization, algo: Algorithm, *, iterations: int,
            out_dir: str | os.PathLike, lock: bool = True, **kwargs: Any) -> Parameterization:
    """Run ``iterations`` outer steps of ``algo`` on ``param`` in the run folder ``out_dir``; see
    :func:`_distill_body` for the other arguments. ``lock``: check that ``out_dir`` is writable,
    take its exclusive lock (a second writer gets :class:`splatdd.run_folder.RunFolderBusy`) and
    remove temporary files a killed write left; :func:`splatdd.experiment.run` holds the lock
    already and passes ``False``. Only rank 0 of a multi-process run writes (and locks)."""
    from splatdd.run_folder import RunLock, check_writable, clean_stale_temps
    if not lock or not distributed.is_main():
        return _distill_body(param, algo, iterations=iterations, out_dir=out_dir, **kwargs)
    check_writable(out_dir)
    with RunLock(out_dir) as held:
        clean_stale_temps(out_dir, lock=held)
        return _distill_body(param, algo, iterations=iterations, out_dir=out_dir, **kwargs)


def _distill_body(param: Parameterization, algo: Algorithm, *, iterations: int,
                  out_dir: str | os.PathLike, checkpoint_every: int | None = 500,
                  resume: bool = False, seed: int | None = 0, eval_every: int | None = None,
                  eval_fn: Callable[[Parameterization, int], Mapping[str, Any]] | None = None,
                  progress: bool = True, on_step: Callable[..., Any] | None = None,
                  lr: float | None = None, config: Mapping[str, Any] | None = None,
                  save_file: bool = True, plot: bool = True, budget_tolerance: float = 0.0,
                  registry: Any = None) -> Parameterization:
    """The loop of :func:`distill`; returns ``param`` (trained, in place).

    ``out_dir``        where checkpoints, the distilled file, history and loss plot go.
    ``checkpoint_every`` steps between checkpoints (``None``/0: only at the end).
    ``resume``         continue from ``out_dir/checkpoint.pt`` if it exists (else start fresh);
                       ``iterations`` may be larger than in the interrupted run.
    ``seed``           seeds torch's global RNG (and ``random``, numpy) at the start of a fresh run,
                       as a safety net for plugins that use it; plugins should use ``algo.generator``
                       (the caller creates and seeds it).
    ``eval_every``/``eval_fn``  call ``eval_fn(param, step)`` every ``eval_every`` steps (its result
                       dict goes to the history); it runs under a forked RNG so it cannot change
                       the run's randomness.
    ``on_step``        ``on_step(step, loss, param, algo)`` after every step (``step`` 1-based).
    ``lr``             overrides the parameterization's default learning rate.
    ``config``         extra JSON-able run settings recorded in the checkpoint and distilled file.
    ``save_file``/``plot``  write ``distilled.safetensors`` / ``loss.png`` at the end.
    The run refuses to start if ``param`` exceeds the budget of ``algo.ipc`` images per class.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if eval_every and eval_fn is None:
        raise ValueError("eval_every needs eval_fn")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = algo.real.spec
    ipc = int(algo.ipc)
    budget = check_budget(param, spec, ipc, tolerance=budget_tolerance)

    identity = _identity(param, algo, ipc)
    run_config = {**identity, "seed": seed, "lr": lr, **dict(config or {})}

    opt = param.optimizer_spec(algo.regime, lr).build()
    base_lrs = [float(g["lr"]) for g in opt.param_groups]     # before a resume overwrites them
    losses: list[float] = []
    evals: list[dict[str, Any]] = []
    start = 0
    if resume and has_checkpoint(out_dir):
        ckpt = load_checkpoint(out_dir)
        check_resume(ckpt, identity, run_config, checkpoint_path(out_dir))
        param.load_state_dict(ckpt["param"])
        opt.load_state_dict(ckpt["optimizer"])
        algo.load_state_dict(ckpt["algo"])
        _set_rng_state(algo, ckpt["rng"])
        start = int(ckpt["step"])
        losses = list(ckpt["losses"])
        evals = list(ckpt.get("evals", []))
    elif seed is not None:
        _seed_everything(int(seed))

    saved_step = [start if resume and start else None]

    def save_checkpoint(step: int) -> None:
        if not distributed.is_main():            # only rank 0 writes; the others load on resume
            saved_step[0] = step
            return
        prev = saved_step[0]
        kept = (f"the previous checkpoint {checkpoint_path(out_dir)} (step {prev})"
                if prev is not None else "nothing (no earlier checkpoint of this run)")
        with translate_write_errors(f"checkpoint {checkpoint_path(out_dir)} (step {step})",
                                    kept=kept, hint="free space or fix the folder's permissions, "
                                    "then rerun the same command with --resume"):
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "step": step, "identity": identity,
                "config": run_config, "param": param.state_dict(), "optimizer": opt.state_dict(),
                "algo": algo.state_dict(), "rng": _rng_state(algo), "losses": losses,
                "evals": evals, "time": time.time(), "world_size": distributed.world_size(),
            }, checkpoint_path(out_dir))
        saved_step[0] = step

    bar = None
    if progress and iterations > start and distributed.is_main():
        from splatdd.progress import progress_bar
        bar = progress_bar(total=iterations, initial=start, desc=f"{param.name}+{algo.name}",
                           unit="it")
    t0 = time.perf_counter()
    stop = _GracefulInterrupt()
    try:
        stop.install()
        for step in range(start, iterations):
            if stop.requested:
                save_checkpoint(step)
                raise Interrupted(step, checkpoint_path(out_dir))
            if algo.lr_schedule == "cosine":       # Algorithm.lr_schedule: cosine to 0 over the run
                scale = 0.5 * (1.0 + math.cos(math.pi * step / max(iterations, 1)))
                for group, base in zip(opt.param_groups, base_lrs):
                    group["lr"] = base * scale
            value = run_step(param, algo, opt, step)
            losses.append(value)
            done = step + 1
            if eval_fn is not None and eval_every and done % eval_every == 0 and done < iterations:
                with torch.random.fork_rng(devices=[]):
                    res = dict(eval_fn(param, done))
                evals.append({"step": done, **res})
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                bar.update(1)
            if checkpoint_every and done % checkpoint_every == 0 and done < iterations:
                save_checkpoint(done)
            if on_step is not None:
                on_step(done, value, param, algo)
        if stop.requested and iterations > start:   # Ctrl-C in the last step: stop, as promised
            save_checkpoint(iterations)
            raise Interrupted(iterations, checkpoint_path(out_dir))
    except KeyboardInterrupt as exc:           # a second Ctrl-C, mid-step: keep what was saved
        if isinstance(exc, Interrupted):
            raise
        saved = saved_step[0]
        raise Interrupted(saved or 0, checkpoint_path(out_dir) if saved else None) from None
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    final_step = max(start, iterations)
    if eval_fn is not None and eval_every and (not evals or evals[-1]["step"] != final_step):
        with torch.random.fork_rng(devices=[]):
            evals.append({"step": final_step, **dict(eval_fn(param, final_step))})
    save_checkpoint(final_step)

    if not distributed.is_main():
        return param
    history = {"identity": identity, "config": run_config, "losses": losses, "evals": evals,
               "steps": final_step, "seconds_this_session": elapsed,
               "budget": {"used": budget.used, "allowed": budget.allowed}}
    with translate_write_errors(f"{out_dir / HISTORY_NAME} and {out_dir / LOSS_PLOT_NAME}",
                                kept=f"the final checkpoint {checkpoint_path(out_dir)}",
                                hint="free space or fix the folder, then rerun the same command "
                                     "with --resume"):
        atomic_write_json(out_dir / HISTORY_NAME, _finite(history))
        if plot and losses:
            plot_losses(losses, out_dir / LOSS_PLOT_NAME,
                        title=f"{param.name} + {algo.name}, {spec.name}, ipc {ipc}")
    if save_file:
        from splatdd import distilled_file
        tail = losses[-min(len(losses), 50):]
        distilled_file.save(
            out_dir / DISTILLED_NAME, param, spec=spec, ipc=ipc, algorithm=algo.name,
            algo_config=algo.config(), learned_lr=learned_eval_lr(algo), registry=registry,
            extra_meta={"iterations": final_step, "seed": seed, "lr": lr,
                        "final_loss_mean50": (sum(tail) / len(tail)) if tail else None,
                        **{k: v for k, v in dict(config or {}).items()}})
    return param


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: map them to None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
