"""The ``splatdd`` command line.

::

    splatdd plugins                                   # installed plugins, versions, load errors
    splatdd distill --param pixel --algo dm --ipc 1 --iterations 200 --out runs/fm_dm_ipc1
    splatdd eval runs/fm_dm_ipc1/distilled.safetensors --runs 3 --epochs 1000
    splatdd render runs/fm_dm_ipc1/distilled.safetensors --out grid.png
    splatdd export runs/fm_dm_ipc1/distilled.safetensors --out images.pt

Plugins can add subcommands through the ``splatdd.commands`` entry-point group (a callable
``register(subparsers)``; each subparser should ``set_defaults(func=handler)`` where
``handler(args) -> int | None``). See docs/cli.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from splatdd.experiment.config import parse_value

__all__ = ["main", "build_parser", "parse_kv", "CLIError", "HelpFormatter", "command_names"]

class CLIError(Exception):
    """A user error: printed as ``splatdd: error: ...`` with exit status 2."""


# ---- helpers -------------------------------------------------------------------------------------
def parse_kv(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CLIError(f"{what} expects key=value, got {item!r}")
        out[key] = parse_value(value)
    return out


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool],
             what: str) -> Callable[[str], Any]:
    """An argparse ``type=`` function: ``convert`` the text, then require ``ok`` of the value."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    parse.__name__ = what.replace(" ", "_")  # argparse names the type in its messages
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")

#: Public argparse ``type=`` helpers for plugins that add commands (``splatdd.commands``).
positive_int, nonneg_int, positive_float = _positive_int, _nonneg_int, _positive_float


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default shown once: as its help text states it, or else
    appended as ``(default: X)``; never for a default of None or False (required options, flags).
    For plugins' commands: ``subparsers.add_parser(..., formatter_class=HelpFormatter)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text.lower() or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or action.required):
            return text
        return super()._get_help_string(action)


def parse_resolution(text: str | None, option: str = "--resolution") -> tuple[int, int] | None:
    """``"R"`` or ``"HxW"`` -> ``(H, W)`` (``None`` stays ``None``); a bad value is a
    :class:`CLIError` naming ``option``. For plugin commands that parse it after argparse."""
    if text is None:
        return None
    try:
        return _resolution(text)
    except argparse.ArgumentTypeError as exc:
        raise CLIError(f"{option}: {exc}") from None


def _resolution(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    what = f"R or HxW with whole numbers of pixels >= 1 (e.g. 32 or 64x48), got {text!r}"
    try:
        hw = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}") from None
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise argparse.ArgumentTypeError(f"expected {what}")
    return hw  # type: ignore[return-value]


def resolve_device(name: str, option: str = "--device") -> str:
    """The device a command runs on (``auto`` resolved); ``CLIError`` naming ``option``.

    Shared by the core commands and the plugins' (``splatdd buffer``, ``splatdd teacher``)."""
    from splatdd.runtime import resolve_device as _resolve
    try:
        dev = _resolve(name, what=option)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return name if name != "auto" else str(dev)


def set_threads(n: int | None, option: str = "--threads") -> None:
    """Apply a command's ``--threads`` (0/None: torch's default); ``CLIError`` when out of range."""
    from splatdd.runtime import set_threads as _set
    try:
        _set(n or 0, what=option)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _registry():
    from splatdd import registry
    return registry.default_registry()


def _plugin_class(kind: str, name: str):
    from splatdd.registry import PluginLoadError, UnknownPluginError
    try:
        return _registry().get(kind, name)
    except UnknownPluginError as exc:
        raise CLIError(str(exc)) from None
    except PluginLoadError as exc:
        raise CLIError(f"{exc}\n(run `splatdd plugins -v` for the traceback)") from None


def load_data(dataset: str, root: str | None, resolution, zca: bool, device: str,
              progress: bool):
    """``load_dataset`` for a command: a missing or bad dataset becomes a ``CLIError``."""
    from splatdd.data import load_dataset
    try:
        return load_dataset(dataset, root, resolution=resolution, zca=zca, device=device,
                            progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"cannot load dataset {dataset!r}: {exc}") from None


def _print(msg: str) -> None:
    print(msg, flush=True)


# ---- plugins -------------------------------------------------------------------------------------
class _CommandRecorder:
    """Stands in for argparse's subparsers object while a ``splatdd.commands`` plugin registers:
    records the command names it adds and tags each one's help with the providing plugin."""

    def __init__(self, subparsers: Any, tag: str | None) -> None:
        self._sub, self._tag = subparsers, tag
        self.names: list[str] = []

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        self.names.append(name)
        if self._tag:
            kw["help"] = f"{kw['help']} [{self._tag}]" if kw.get("help") else f"[{self._tag}]"
        return self._sub.add_parser(name, **kw)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._sub, attr)


def command_names(register: Callable[[Any], Any]) -> list[str]:
    """The command names a ``splatdd.commands`` plugin's ``register(subparsers)`` adds, found by
    registering it on a scratch parser (``splatdd plugins`` lists commands by these names)::

        command_names(registry.get("command", "tm"))      # ['buffer', 'teacher', ...]
    """
    rec = _CommandRecorder(argparse.ArgumentParser(add_help=False).add_subparsers(), None)
    register(rec)
    return rec.names


def cmd_plugins(args: argparse.Namespace) -> int:
    from splatdd.registry import KINDS, PluginLoadError
    reg = _registry()
    rows = []
    errors: list[PluginLoadError] = []
    for kind in KINDS:
        for info in reg.list_plugins(kind):
            status = "ok"
            names = [info.name]
            if not info.active:
                status = f"shadowed by {info.shadowed_by}"
            elif not args.no_load:
                try:
                    obj = reg.get(kind, info.name)
                    if kind == "command":            # listed by the commands it adds
                        names = command_names(obj) or names
                except PluginLoadError as exc:
                    status = f"ERROR: {type(exc.original).__name__}: {exc.original}"
                    errors.append(exc)
                except Exception as exc:  # noqa: BLE001 - a broken register() is reported
                    status = f"ERROR: register failed: {type(exc).__name__}: {exc}"
            else:
                status = "not loaded"
            for name in names:
                rows.append((kind, name, info.distribution or "-", info.version or "-",
                             info.value, status))
    if args.json:
        _print(json.dumps([dict(zip(("kind", "name", "distribution", "version", "value",
                                     "status"), r)) for r in rows], indent=2))
    elif not rows:
        _print("no splatdd plugins installed (pip install plugins/pixel plugins/dm ...)")
    else:
        head = ("kind", "name", "distribution", "version", "entry point", "status")
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        _print(fmt.format(*head))
        for r in rows:
            _print(fmt.format(*r))
    if args.verbose:
        for exc in errors:
            print(f"\n--- {exc.kind} {exc.name!r} ---\n{exc.format_original()}", file=sys.stderr)
    return 1 if errors and args.strict else 0


# ---- distill -------------------------------------------------------------------------------------
#: Shorthand flag -> dotted config key (flags given on the command line override the config).
_SHORTHANDS: dict[str, str] = {
    "dataset": "dataset.name", "data_root": "dataset.root", "resolution": "dataset.resolution",
    "param": "parameterization", "algo": "algorithm", "ipc": "ipc", "init": "init",
    "init_steps": "init_steps", "iterations": "iterations", "lr": "lr", "out": "out",
    "checkpoint_every": "checkpoint_every", "seed": "seed", "device": "device",
    "threads": "threads", "eval_runs": "eval.runs", "eval_epochs": "eval.options.epochs",
    "eval_lr": "eval.options.lr", "eval_every": "eval.every", "eval_protocol": "eval.protocol",
}


def experiment_config(args: argparse.Namespace):
    """The :class:`~splatdd.experiment.ExperimentConfig` that ``splatdd distill`` runs: ``--config``
    (a preset name or a TOML file; default: the built-in defaults), then the shorthand flags, then
    ``--set key=value`` overrides, in that order."""
    from splatdd.experiment import ConfigError, ExperimentConfig, load_config
    try:
        cfg = load_config(args.config) if args.config else ExperimentConfig()
        if not args.config and args.ipc is None:
            raise CLIError("--ipc is required without --config (images per class, e.g. --ipc 1)")
        overrides: dict[str, Any] = {}
        for flag, key in _SHORTHANDS.items():
            value = getattr(args, flag, None)
            if value is not None:
                overrides[key] = list(value) if isinstance(value, tuple) else value
        if args.zca:
            overrides["dataset.zca"] = True
        if args.eval_before:
            overrides["eval.before"] = True
        if args.eval_model:
            overrides["eval.models"] = [m.strip() for m in args.eval_model.split(",") if m.strip()]
        for k, v in parse_kv(args.param_opt, "--param-opt").items():
            overrides[f"param_options.{k}"] = v
        for k, v in parse_kv(args.algo_opt, "--algo-opt").items():
            overrides[f"algo_options.{k}"] = v
        cfg = cfg.with_overrides(overrides) if overrides else cfg
        return cfg.with_overrides(args.set) if args.set else cfg
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


def launch_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """``--nproc K``: run this command under torchrun's elastic launcher on this machine
    (``python -m torch.distributed.run --standalone --nproc_per_node K -m splatdd ...``)."""
    import subprocess
    rest = list(argv)
    i = rest.index("--nproc")
    del rest[i:i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "splatdd", *rest]
    _print("launching: " + " ".join(cmd[1:]))
    return subprocess.call(cmd)


def cmd_distill(args: argparse.Namespace) -> int:
    from splatdd.budget import BudgetError
    from splatdd.distill import CheckpointError
    from splatdd.distilled_file import DistilledFileError
    from splatdd.experiment import ConfigError, run
    from splatdd.experiment.run import RunInterrupted
    from splatdd.run_folder import RunFolderError
    cfg = experiment_config(args)
    if args.print_config:
        _print(cfg.to_toml().rstrip())
        return 0
    from splatdd import distributed
    if args.nproc:
        return launch_torchrun(args.nproc, args.argv)
    try:
        ctx = distributed.init_from_env(cfg.device)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"cannot join the torchrun process group: {exc}") from None
    if ctx.distributed:
        cfg = cfg.replace(device=ctx.device)
    main_rank = distributed.is_main()
    if main_rank:
        for req in cfg.requires:
            _print(f"note: this experiment needs, first: {req}")
        if ctx.distributed:
            _print(f"torch.distributed: {ctx.world_size} processes, backend {ctx.backend}")
    finished = False
    try:
        result = run(cfg, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.no_progress and main_rank,
                     log=_print if main_rank else (lambda _: None))
        finished = True
    except (ConfigError, BudgetError, RunFolderError, CheckpointError,
            DistilledFileError) as exc:
        raise CLIError(str(exc)) from None
    except RunInterrupted as exc:
        _ignore_further_interrupts()
        print(f"\nsplatdd: {exc.message}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(sync=finished)
    if main_rank and not result.after:
        _print("no evaluation (eval.runs = 0)")
    if main_rank:
        _run_pictures(Path(result.out_dir), Path(result.distilled_file))
    return 0


#: The grid picture ``splatdd distill`` writes into the run folder beside ``loss.png``.
GRID_NAME = "grid.png"


def _run_pictures(out_dir: Path, file: Path) -> None:
    """Write the run's grid picture and print the paths of its pictures."""
    from splatdd.distill import LOSS_PLOT_NAME
    from splatdd.run_folder import RunFolderError
    shown = []
    try:
        shown.append(_write_grid(_load_file(str(file)), out_dir / GRID_NAME)
                     + " (the distilled images)")
    except (CLIError, RunFolderError, OSError) as exc:
        _print(f"note: no {out_dir / GRID_NAME}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a picture must not fail a finished run
        _print(f"note: no {out_dir / GRID_NAME} ({type(exc).__name__}: {exc}); draw it with "
               f"`splatdd render {file} --out {out_dir / GRID_NAME}`")
    if (out_dir / LOSS_PLOT_NAME).is_file():
        shown.append(f"{out_dir / LOSS_PLOT_NAME} (the loss curve)")
    for line in shown:
        _print(f"picture: {line}")


def cmd_config(args: argparse.Namespace) -> int:
    from splatdd.experiment import ConfigError, list_presets, load_config
    try:
        if args.action == "list":
            rows = list_presets()
            width = max(len(p.name) for p in rows)
            for p in rows:
                _print(f"{p.name:<{width}}  {p.source}")
            _print(f"{len(rows)} presets; `splatdd config show NAME` prints one as TOML")
            return 0
        if not args.name:
            raise CLIError(f"splatdd config {args.action} needs a preset name or a TOML file")
        cfg = load_config(args.name)
        if args.action == "show":
            _print(cfg.to_toml().rstrip())
        else:
            _print(f"{args.name}: valid ({cfg.parameterization} + {cfg.algorithm}, ipc {cfg.ipc}, "
                   f"{cfg.dataset.name})")
        return 0
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


# ---- eval / render / export ------------------------------------------------------------------------
def _load_file(path: str, device: str = "cpu"):
    from splatdd import distilled_file
    from splatdd.registry import PluginLoadError, UnknownPluginError
    if not Path(path).exists():
        raise CLIError(f"no such file: {path}")
    try:
        return distilled_file.load(path, registry=_registry(), device=device)
    except ValueError as exc:
        raise CLIError(f"invalid distilled file: {exc}") from None
    except (UnknownPluginError, PluginLoadError) as exc:
        notes = "; ".join(getattr(exc, "__notes__", []))
        raise CLIError(f"{exc}" + (f" ({notes})" if notes else "")) from None


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join torchrun's process group when the command was launched by it (a ``CLIError`` when
    that fails) and yield the device this rank uses; leave the group on exit. Without torchrun's
    variables it yields ``device`` unchanged. Shared by ``eval`` and the plugins' commands::

        with process_group(resolve_device(args.device)) as device:
            ...
    """
    from splatdd import distributed
    try:
        ctx = distributed.init_from_env(str(device))
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"cannot join the torchrun process group: {exc}") from None
    finished = False
    try:
        yield resolve_device(ctx.device) if ctx.distributed else device
        finished = True
    finally:
        distributed.shutdown(sync=finished)


def cmd_eval(args: argparse.Namespace) -> int:
    """Under torchrun the evaluation nets are spread over the ranks (docs/distributed.md); rank 0
    prints and writes ``--json``."""
    from splatdd import distributed
    with process_group(resolve_device(args.device)) as device:
        return _eval(args, device, distributed.is_main())


def _eval(args: argparse.Namespace, device: Any, main: bool) -> int:
    from splatdd.experiment.run import evaluate_rows
    say = _print if main else (lambda _: None)
    progress = not args.no_progress and main
    reg = _registry()
    try:
        options = parse_kv(args.protocol_opt, "--protocol-opt")
        for key in ("epochs", "lr", "teacher"):
            if getattr(args, key, None) is not None:
                options[key] = getattr(args, key)
        protocol = reg.get("protocol", args.protocol)(**options)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--protocol {args.protocol}: {exc}") from None
    except LookupError as exc:
        raise CLIError(str(exc)) from None
    d = _load_file(args.file, device)
    spec = d.spec
    root = args.data_root or (d.meta.get("extra") or {}).get("dataset_root")
    res_hw = args.resolution or (spec.height, spec.width)
    train, test = load_data(spec.name, root, res_hw, spec.zca, device, progress)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models:
        raise CLIError(f"--model expects NAME[,NAME...], got {args.model!r}")
    images = d.images(resolution=tuple(res_hw))
    gpc = len(d.labels) / spec.num_classes
    say(f"{args.file}: {d.param.name} ({d.algorithm or '?'}), {len(d.labels)} images "
        f"(GPC {gpc:g}) in the budget of IPC {d.ipc}, {spec.name}; evaluating at "
        f"{res_hw[0]}x{res_hw[1]}, "
        f"{protocol.describe()}"
        + (f", learned lr {d.learned_lr:g}" if d.learned_lr is not None else ""))
    try:
        rows = evaluate_rows(protocol, images, d.labels, test, models=models, runs=args.runs,
                             seed=args.seed, learned_lr=d.learned_lr,
                             progress=progress, train=train, log=say)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.json and main:
        from splatdd.io_utils import atomic_write_json
        atomic_write_json(args.json, {"file": args.file, "dataset": spec.name,
                                      "resolution": list(res_hw), "rows": rows})
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must end in .png (use `splatdd export` for tensors), got {out}")
    d = _load_file(args.file)
    _print("wrote " + _write_grid(d, out, nrow=args.nrow, resolution=args.resolution,
                                  scale=args.scale, title=args.title, bare=args.bare))
    return 0


def _write_grid(d: Any, out: Path, *, nrow: int | None = None, resolution: Any = None,
                scale: int | None = None, title: str | None = None, bare: bool = False) -> str:
    """Write ``d``'s grid PNG; returns ``"PATH (W x H px): TITLE"`` for the messages."""
    from PIL import Image

    from splatdd.distilled_file import grid_title
    if not bare and title is None:
        images = d.images(resolution=resolution)
        title = grid_title(d, images, d.spec, d.labels)
    d.export_png(out, nrow=nrow, resolution=resolution, scale=scale, annotate=not bare,
                 title=title)
    with Image.open(out) as img:
        w, h = img.size
    return f"{out} ({w}x{h} px)" + (f": {title}" if title and not bare else "")


def cmd_export(args: argparse.Namespace) -> int:
    d = _load_file(args.file)
    d.export_tensor(args.out, resolution=args.resolution)
    _print(f"wrote {args.out} (images normalised; mean/std inside)")
    return 0


# ---- parser --------------------------------------------------------------------------------------
def build_parser(*, plugin_commands: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splatdd", description="Dataset distillation with 2D "
                                "Gaussians and other parameterizations.",
                                epilog="Commands marked [plugin DIST] come from the installed "
                                "plugin distribution DIST (`splatdd plugins` lists them); the "
                                "others are splatdd's own.")
    try:
        import importlib.metadata as md
        version = md.version("splatdd")
    except Exception:  # noqa: BLE001
        version = "unknown"
    p.add_argument("--version", action="version", version=f"splatdd {version}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sp = sub.add_parser("plugins", help="list installed plugins and load errors")
    sp.add_argument("--no-load", action="store_true", help="list only; do not import plugins")
    sp.add_argument("-v", "--verbose", action="store_true", help="print load-error tracebacks")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--strict", action="store_true", help="exit 1 if any plugin fails to load")
    sp.set_defaults(func=cmd_plugins)

    sp = sub.add_parser(
        "distill", help="distil a dataset from a preset, a TOML config or flags (resumable)",
        description="Distil a dataset. The run is an experiment config (see `splatdd config "
        "list`): --config names a preset or a TOML file, the flags below override its keys, and "
        "--set KEY=VALUE overrides any key (e.g. --set eval.runs=0). The run folder gets "
        "config.toml (re-run with --config FOLDER/config.toml) and results.json.")
    sp.add_argument("--config", metavar="PRESET|FILE", default=None,
                    help="a preset name (`splatdd config list`) or a TOML file; default: pixel + "
                    "dm on fashion_mnist with the papers' evaluation")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                    help="override a config key, dotted (repeatable): iterations=5, "
                    "eval.runs=0, param_options.gpc=30, dataset.resolution=[64,64]")
    sp.add_argument("--print-config", action="store_true",
                    help="print the resulting config as TOML and exit")
    sp.add_argument("--nproc", type=_positive_int, default=None, metavar="K",
                    help="run on K processes of this machine under torchrun (docs/distributed.md)")
    g = sp.add_argument_group("what (shorthands for config keys)")
    g.add_argument("--dataset", default=None,
                   help="fashion_mnist | mnist | cifar10 | cifar100 | imagefolder "
                   "(default fashion_mnist)")
    g.add_argument("--data-root", default=None, help="dataset folder (FashionMNIST default: "
                   "$SPLATDD_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    g.add_argument("--resolution", type=_resolution, default=None,
                   help="resize to R or HxW (default: the dataset's)")
    g.add_argument("--zca", action="store_true", help="ZCA-whiten the data (CIFAR protocol)")
    g.add_argument("--param", default=None, help="parameterization plugin (default pixel)")
    g.add_argument("--algo", default=None, help="algorithm plugin (default dm)")
    g.add_argument("--ipc", type=_positive_int, default=None,
                   help="images per class: the storage budget (required without --config)")
    g.add_argument("--param-opt", action="append", metavar="K=V",
                   help="parameterization option (repeatable), e.g. gpc=30")
    g.add_argument("--algo-opt", action="append", metavar="K=V",
                   help="algorithm option (repeatable), e.g. batch_real=128")
    g.add_argument("--init", choices=("real", "noise"), default=None,
                   help="start from random real images or the plugin's own init (default real)")
    g.add_argument("--init-steps", type=_nonneg_int, default=None,
                   help="fitting steps of init_from_real (gaussian, siren; default: the plugin's)")
    g = sp.add_argument_group("how")
    g.add_argument("--iterations", type=_nonneg_int, default=None,
                   help="outer iterations (default: the algorithm's paper default, DM 20000)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="lr of the parameterization (default: its paper lr for the algorithm)")
    g.add_argument("--out", default=None,
                   help="run folder (default runs/PRESET or runs/DATASET_PARAM_ALGO_ipcN)")
    g.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start again in a used run folder")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=None,
                   help="iterations between checkpoints (0: only at the end; default 100)")
    g.add_argument("--seed", type=_nonneg_int, default=None,
                   help="seed of the init and the algorithm's randomness (default 0)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default cpu)")
    g.add_argument("--threads", type=_nonneg_int, default=None,
                   help="torch CPU threads, at most the machine's CPUs (default 0: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = sp.add_argument_group("evaluation (shorthands for eval.* keys)")
    g.add_argument("--eval-protocol", default=None,
                   help="paper | cross-arch | quick | an installed protocol (default paper)")
    g.add_argument("--eval-runs", type=_nonneg_int, default=None,
                   help="networks trained per model (0: no evaluation; default 3)")
    g.add_argument("--eval-epochs", type=_positive_int, default=None,
                   help="training epochs per network (default: the protocol's, paper 1000)")
    g.add_argument("--eval-model", default=None, metavar="M1,M2",
                   help="architectures, comma-separated (default ConvNet)")
    g.add_argument("--eval-lr", type=_positive_float, default=None,
                   help="evaluation lr (default: the learned lr if the algorithm has one, else "
                   "the protocol's)")
    g.add_argument("--eval-every", type=_nonneg_int, default=None,
                   help="also evaluate every N iterations (default 0: only at the end)")
    g.add_argument("--eval-before", action="store_true",
                   help="also evaluate the initialised set before distillation")
    sp.set_defaults(func=cmd_distill)

    sp = sub.add_parser("config", help="list, show or check experiment presets and configs")
    sp.add_argument("action", choices=("list", "show", "check"),
                    help="list the presets | show one as TOML | check a TOML file")
    sp.add_argument("name", nargs="?", default=None, help="preset name or TOML file")
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("eval", help="evaluate a distilled file under a protocol, one row per "
                        "model")
    sp.add_argument("file", help="a distilled .safetensors file")
    sp.add_argument("--protocol", default="paper",
                    help="paper | cross-arch | quick | an installed protocol (default paper)")
    sp.add_argument("--model", default="ConvNet", metavar="M1,M2",
                    help="architectures, comma-separated (default ConvNet)")
    sp.add_argument("--runs", type=_positive_int, default=3,
                    help="networks trained per model (default 3)")
    sp.add_argument("--epochs", type=_positive_int, default=None,
                    help="training epochs (default: the protocol's; paper 1000)")
    sp.add_argument("--lr", type=_positive_float, default=None,
                    help="training lr (default: the file's learned lr, else the protocol's)")
    sp.add_argument("--teacher", default=None,
                    help="teacher folder, for protocols that relabel with one (soft-label)")
    sp.add_argument("--protocol-opt", action="append", metavar="K=V",
                    help="other protocol option (repeatable)")
    sp.add_argument("--resolution", type=_resolution, default=None,
                    help="decode and test at R or HxW (default: the file's)")
    sp.add_argument("--data-root", default=None, help="dataset folder (default: the file's)")
    sp.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the networks (default 0)")
    sp.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    sp.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("render", help="write a distilled file's images as a PNG grid",
                        description="Write the decoded images as a PNG grid, one column per "
                        "class under its class name, with a title that says what they are "
                        "(parameterization, algorithm, dataset, budget IPC, GPC = images per "
                        "class, points per image where the parameterization has them, "
                        "resolution).")
    sp.add_argument("file", help="a distilled .safetensors file")
    sp.add_argument("--out", required=True, help="output .png")
    sp.add_argument("--resolution", type=_resolution, default=None,
                    help="decode at R or HxW (default: the file's)")
    sp.add_argument("--nrow", type=_positive_int, default=None,
                    help="images per row, each under its class name (default: one column per "
                    "class)")
    sp.add_argument("--scale", type=_positive_int, default=None,
                    help="pixel-replication zoom (default: images at least 64 px, e.g. 3 for "
                    "28 px; 1 with --bare)")
    sp.add_argument("--title", default=None,
                    help="title text (default: what the images are, as described above)")
    sp.add_argument("--bare", action="store_true", help="images only: no title, no class names")
    sp.set_defaults(func=cmd_render)

    sp = sub.add_parser("export", help="write decoded images + labels as a torch .pt file")
    sp.add_argument("file", help="a distilled .safetensors file")
    sp.add_argument("--out", required=True, help="output .pt")
    sp.add_argument("--resolution", type=_resolution, default=None,
                    help="decode at R or HxW (default: the file's)")
    sp.set_defaults(func=cmd_export)

    from splatdd import fit
    fit.register(sub)

    if plugin_commands:
        _add_plugin_commands(sub)
    return p


def _add_plugin_commands(sub) -> None:
    """Each ``splatdd.commands`` plugin's commands, their help tagged ``[plugin DIST]``."""
    from splatdd.registry import PluginLoadError
    reg = _registry()
    for info in reg.list_plugins("command"):
        if not info.active:
            continue
        try:
            register = reg.get("command", info.name)
            register(_CommandRecorder(sub, f"plugin {info.distribution or info.name}"))
        except PluginLoadError as exc:
            print(f"splatdd: warning: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            print(f"splatdd: warning: command plugin {info.name!r} failed to register: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)


def _ignore_further_interrupts() -> None:
    """While reporting an interrupt and exiting, a repeated Ctrl-C must not end in a traceback."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # only load command plugins when the subcommand is not a built-in one (keeps startup fast)
    builtin = {"plugins", "distill", "config", "eval", "render", "export", "fit"}
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(plugin_commands=first not in builtin)
    args = parser.parse_args(argv)
    args.argv = argv
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from splatdd.run_folder import RunFolderError
    try:
        rc = func(args)
    except RunFolderError as exc:          # e.g. a full disk while render/export write
        print(f"splatdd: error: {exc}", file=sys.stderr)
        return 2
    except CLIError as exc:
        print(f"splatdd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("\nsplatdd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:            # e.g. `splatdd config show X | head`
        sys.stdout = open(os.devnull, "w")   # noqa: SIM115 - silence the flush at exit
        return 0
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
