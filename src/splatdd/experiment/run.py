"""``run(config)``: one distillation experiment from a declared config, start to finish.

The sequence (the only copy; the CLI's ``distill`` and every benchmark call it):

1. resolve the plugins and the evaluation protocol through the registry (unknown options and names
   fail here, before any data is loaded);
2. take the run folder (writability checked, exclusive lock, stale temporary files removed);
3. load the dataset; build the parameterization for ``ipc`` and check its storage budget;
4. initialise it from random real images (unless resuming) and save it as
   ``initial.safetensors``;
5. distil with :func:`splatdd.distill.distill` (checkpoints, bit-exact resume);
6. evaluate with the protocol, one row per model: the initial set if ``eval.before`` (kept in
   ``before_distillation.json``, so a resumed run does not redo it), then the distilled set;
7. write ``config.toml`` (the config it ran: ``splatdd distill --config out/config.toml`` re-runs
   it) and ``results.json`` into the run folder.

Randomness: the parameterization's construction and initialisation draw from a generator seeded
with ``seed``, the algorithm from a second one seeded with ``seed``; nothing else is random, so the
same config gives the same distilled tensors on the CPU, bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..runtime import resolve_device, set_threads

from splatdd import distributed
from splatdd.experiment.config import ConfigError, ExperimentConfig

__all__ = ["RunResult", "RunInterrupted", "run", "evaluate_rows", "CONFIG_NAME", "RESULTS_NAME", "BEFORE_NAME",
           "INITIAL_NAME"]

CONFIG_NAME = "config.toml"
RESULTS_NAME = "results.json"
BEFORE_NAME = "before_distillation.json"
#: The initialised set (before any distillation step), a distilled file like the final one.
INITIAL_NAME = "initial.safetensors"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`run`; ``message`` says truthfully what was saved and what a rerun
    will redo."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@contextlib.contextmanager
def _phase(what: str, saved: str, rerun: str) -> Iterator[None]:
    """Turn a Ctrl-C during ``what`` into :class:`RunInterrupted` naming what is kept."""
    from splatdd.distill import Interrupted
    try:
        yield
    except RunInterrupted:
        raise
    except Interrupted as exc:
        if exc.checkpoint is None:
            raise RunInterrupted(f"interrupted before the first checkpoint; {saved}; "
                                 f"{rerun}") from None
        raise RunInterrupted(f"interrupted; {exc.step} iterations are saved in "
                             f"{exc.checkpoint}; continue with the same command plus "
                             f"--resume") from None
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted during {what}; {saved}; {rerun}") from None


@dataclass
class RunResult:
    """What :func:`run` measured. ``before``/``after``: one dict per evaluation model with the
    protocol, its label kind and settings, mean/std/accs (%), and seconds."""

    out_dir: Path
    distilled_file: Path
    iterations: int
    distill_seconds: float
    final_loss: float | None
    budget: dict[str, int]
    init: dict[str, float] = field(default_factory=dict)
    before: list[dict[str, Any]] = field(default_factory=list)
    after: list[dict[str, Any]] = field(default_factory=list)
    learned_lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["distilled_file"] = str(self.out_dir), str(self.distilled_file)
        return d


def _resolve(config: ExperimentConfig, registry: Any):
    from splatdd.registry import PluginLoadError, UnknownPluginError
    try:
        pcls = registry.get("parameterization", config.parameterization)
        acls = registry.get("algorithm", config.algorithm)
        protocol = None
        if config.eval.runs > 0:
            protocol = registry.get("protocol", config.eval.protocol)(**config.eval.options)
    except (UnknownPluginError, PluginLoadError) as exc:
        raise ConfigError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"eval.options: {exc}") from None
    return pcls, acls, protocol


def _threads(n: int) -> None:
    try:
        set_threads(n)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def evaluate_rows(protocol: Any, images: torch.Tensor, labels: torch.Tensor, test: Any, *,
                  models: list[str], runs: int, seed: int, learned_lr: float | None,
                  progress: bool, train: Any = None,
                  log: Callable[[str], None] = print, what: str = "") -> list[dict[str, Any]]:
    """One result row per model: ``protocol.evaluate`` on ``(images, labels)``."""
    rows = []
    for model in models:
        t0 = time.perf_counter()
        res = protocol.evaluate(images, labels, test, model=model, runs=runs, seed=seed,
                                learned_lr=learned_lr, progress=progress, train=train)
        row = {"model": model, "protocol": protocol.name, "label_kind": protocol.label_kind,
               "settings": protocol.config(), "runs": runs, "mean": res.mean, "std": res.std,
               "accs": list(res.accs), "lr": getattr(res, "lr", None),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"{what}{model}: test accuracy {res.mean:.2f} +- {res.std:.2f} % over {runs} "
            f"run(s), {protocol.describe()}")
    return rows


def _decoded(param: Any, spec: Any) -> torch.Tensor:
    with torch.no_grad():
        return param.decode(None, resolution=(spec.height, spec.width)).detach().float()


def run(config: ExperimentConfig, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, registry: Any = None,
        log: Callable[[str], None] | None = None) -> RunResult:
    """Run the experiment ``config`` and return its :class:`RunResult`.

    ``resume``: continue from the run folder's checkpoint (the settings must be the same);
    ``overwrite``: start again in a folder that holds a run; ``registry``: where plugins and
    protocols are looked up (default: the installed ones). Raises :class:`ConfigError` for a bad
    config, :class:`splatdd.budget.BudgetError` if the parameterization exceeds the budget.

    Example::

        from splatdd.experiment import load_config, run
        res = run(load_config("fmnist-main").with_overrides({"iterations": 10, "eval.runs": 1}))
        print(res.after[0]["mean"])
    """
    from splatdd import distill as distill_mod
    from splatdd.registry import default_registry
    from splatdd.run_folder import RunLock, check_writable, clean_stale_temps

    say = log if log is not None else (lambda msg: print(msg, flush=True))
    config.validate()
    registry = registry if registry is not None else default_registry()
    pcls, acls, protocol = _resolve(config, registry)
    _threads(config.threads)
    device = _check_device(config.device)
    out = config.out_dir()
    resuming = resume and distill_mod.has_checkpoint(out)
    if not resume and distill_mod.has_checkpoint(out) and not overwrite:
        raise ConfigError(f"{out} already holds a run; resume it or start again with overwrite "
                          f"(CLI: --resume / --overwrite), or choose another out folder")
    iterations = (config.iterations if config.iterations is not None
                  else int(acls.default_iterations))
    kwargs = dict(out=out, device=device, iterations=iterations, resume=resume,
                  resuming=resuming, progress=progress, registry=registry, say=say)
    if distributed.world_size() > 1 and acls.gradient_reduction is None:
        raise ConfigError(f"algorithm {config.algorithm!r} does not support multi-process runs "
                          f"(it declares no gradient_reduction); run it in one process")
    if not distributed.is_main():         # only rank 0 writes (and locks) the run folder
        return _run_locked(config, pcls, acls, protocol, **kwargs)
    check_writable(out)                   # before any expensive work
    with RunLock(out) as lock:            # one writer per run folder
        clean_stale_temps(out, lock=lock)
        return _run_locked(config, pcls, acls, protocol, **kwargs)


def _run_locked(config: ExperimentConfig, pcls: Any, acls: Any, protocol: Any, *, out: Path,
                device: torch.device, iterations: int, resume: bool, resuming: bool,
                progress: bool, registry: Any, say: Callable[[str], None]) -> RunResult:
    from splatdd import distill as distill_mod
    from splatdd import distilled_file
    from splatdd.budget import check_budget
    from splatdd.data import load_dataset
    from splatdd.initialise import init_from_real
    from splatdd.io_utils import atomic_write_json
    from splatdd.plugin_api import learned_eval_lr

    d = config.dataset
    try:
        train, test = load_dataset(d.name, d.root, resolution=d.resolution, zca=d.zca,
                                   device=device, progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"cannot load dataset {d.name!r}: {exc}") from None
    spec = train.spec
    say(f"dataset {spec.name}: {len(train.labels)} train / {len(test.labels)} test images, "
        f"{spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes")

    init_gen = torch.Generator().manual_seed(config.seed)
    try:
        param = pcls.build(spec, config.ipc, generator=init_gen, **config.param_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"param_options for {config.parameterization!r}: {exc}") from None
    report = check_budget(param, spec, config.ipc)
    say(f"{config.parameterization}: {report}")

    init_diag: dict[str, float] = {}
    before: list[dict[str, Any]] = []
    fresh = ("nothing of this run is saved yet",
             "the same command starts it again, initialisation included")
    if not resuming:
        if config.init == "real":
            with _phase("the initialisation from real images", *fresh):
                init_diag = init_from_real(param, train, init_gen, steps=config.init_steps,
                                           progress=progress)
            if init_diag:
                say("init from real images: " + ", ".join(f"{k}={v:.4g}"
                                                          for k, v in init_diag.items()))
        if distributed.is_main():
            # the set before distillation: its accuracy is measured beside the distilled one
            distilled_file.save(out / INITIAL_NAME, param, spec=spec, ipc=config.ipc,
                                registry=registry, extra_meta={"stage": "initialised",
                                                               "seed": config.seed,
                                                               "init": config.init})
            atomic_write_json(out / BEFORE_NAME, {"init": init_diag, "rows": []})
    elif (out / BEFORE_NAME).is_file():
        saved = json.loads((out / BEFORE_NAME).read_text())
        before, init_diag = list(saved.get("rows", [])), dict(saved.get("init", {}))
    param = param.to(device)

    algo_gen = torch.Generator().manual_seed(config.seed)
    try:
        algo = acls(train, ipc=config.ipc, generator=algo_gen, **config.algo_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"algo_options for {config.algorithm!r}: {exc}") from None

    def eval_fn(p: Any, step: int) -> dict[str, Any]:
        rows = evaluate_rows(protocol, _decoded(p, test.spec), p.labels.detach(), test,
                             models=config.eval.models[:1], runs=config.eval.runs,
                             seed=config.seed, learned_lr=learned_eval_lr(algo),
                             progress=False, train=train, log=say, what=f"[step {step}] ")
        return {"mean": rows[0]["mean"], "std": rows[0]["std"], "accs": rows[0]["accs"]}
    every = config.eval.every if protocol is not None else 0

    say(f"distilling {iterations} iterations of {config.parameterization} + {config.algorithm}, "
        f"ipc {config.ipc}, into {out}" + (" (resuming)" if resuming else ""))
    t0 = time.perf_counter()
    with _phase("the distillation", *fresh):
        distill_mod.distill(
            param, algo, iterations=iterations, out_dir=out, lock=False,   # run() holds it
            checkpoint_every=config.checkpoint_every, resume=resume, seed=config.seed,
            eval_every=every or None, eval_fn=eval_fn if every else None, progress=progress,
            lr=config.lr,
            registry=registry,
            config={"dataset_root": d.root, "init": config.init, "init_steps": config.init_steps,
                    "param_opts": config.param_options, "algo_opts": config.algo_options,
                    "experiment": config.name})
    seconds = time.perf_counter() - t0
    file = out / distill_mod.DISTILLED_NAME
    main = distributed.is_main()          # every rank evaluates (nets spread); rank 0 writes
    history = json.loads((out / distill_mod.HISTORY_NAME).read_text()) if main else {}
    losses = history.get("losses") or []
    learned = learned_eval_lr(algo)
    if main:
        say(f"wrote {file} ({file.stat().st_size:,} bytes) in {seconds:.1f} s")

    if distributed.broadcast_object(protocol is not None and config.eval.before and not before):
        with _phase("the evaluation before distillation", f"the distilled set is saved in {file}",
                    f"evaluate the initial set with `splatdd eval {out / INITIAL_NAME}`"):
            init_set = distilled_file.load(out / INITIAL_NAME, registry=registry, device=device)
            before = evaluate_rows(protocol, init_set.images(), init_set.labels, test,
                                   models=config.eval.models, runs=config.eval.runs,
                                   seed=config.seed, learned_lr=None, progress=progress,
                                   train=train, log=say, what="before distillation, ")
        if main:
            atomic_write_json(out / BEFORE_NAME, {"init": init_diag, "rows": before})
    after: list[dict[str, Any]] = []
    if protocol is not None:
        with _phase("the evaluation", f"the distilled set is saved in {file}",
                    f"evaluate it with `splatdd eval {file}`"):
            after = evaluate_rows(protocol, _decoded(param, test.spec), param.labels.detach(),
                                  test, models=config.eval.models, runs=config.eval.runs,
                                  seed=config.seed, learned_lr=learned, progress=progress,
                                  train=train, log=say)
    result = RunResult(out_dir=out, distilled_file=file, iterations=iterations,
                       distill_seconds=seconds, final_loss=losses[-1] if losses else None,
                       budget={"used": report.used, "allowed": report.allowed},
                       init=init_diag, before=before, after=after, learned_lr=learned)
    if not main:
        return result
    ran = config.replace(out=str(out), iterations=iterations)
    ran.save(out / CONFIG_NAME)
    atomic_write_json(out / RESULTS_NAME, {
        "config": ran.to_dict(), **result.to_dict(), "eval_curve": history.get("evals", []),
        "torch": torch.__version__, "device": str(device)})
    say(f"results: {out / RESULTS_NAME} (config: {out / CONFIG_NAME})")
    return result
