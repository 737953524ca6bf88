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
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "parse_kv", "CLIError"]

DEFAULT_EVAL_LR = 0.01


class CLIError(Exception):
    """A user error: printed as ``splatdd: error: ...`` with exit status 2."""


# ---- helpers -------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """``k=v`` values: JSON if it parses (numbers, true/false, null, lists), else the string."""
    low = text.strip()
    if low in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[low]
    try:
        return json.loads(low)
    except json.JSONDecodeError:
        return text


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


def _resolution(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        hw = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be R or HxW, got {text!r}") from None
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise argparse.ArgumentTypeError(f"resolution must be R or HxW, got {text!r}")
    return hw  # type: ignore[return-value]


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available in this torch build/machine")
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device: {exc}") from None
    return name


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


def _load_data(dataset: str, root: str | None, resolution, zca: bool, device: str,
               progress: bool):
    from splatdd.data import load_dataset
    try:
        return load_dataset(dataset, root, resolution=resolution, zca=zca, device=device,
                            progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"cannot load dataset {dataset!r}: {exc}") from None


def _print(msg: str) -> None:
    print(msg, flush=True)


def _eval_result_dict(res, *, runs: int, epochs: int, model: str, lr: float) -> dict[str, Any]:
    return {"model": model, "runs": runs, "epochs": epochs, "lr": lr, "mean": res.mean,
            "std": res.std, "accs": list(res.accs),
            "train_seconds": getattr(res, "train_seconds", None)}


def _format_acc(res) -> str:
    return f"test accuracy: {res.mean:.2f} +- {res.std:.2f} %"


# ---- plugins -------------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    from splatdd.registry import KINDS, PluginLoadError
    reg = _registry()
    rows = []
    errors: list[PluginLoadError] = []
    for kind in KINDS:
        for info in reg.list_plugins(kind):
            status = "ok"
            if not info.active:
                status = f"shadowed by {info.shadowed_by}"
            elif not args.no_load:
                try:
                    reg.get(kind, info.name)
                except PluginLoadError as exc:
                    status = f"ERROR: {type(exc.original).__name__}: {exc.original}"
                    errors.append(exc)
            else:
                status = "not loaded"
            rows.append((kind, info.name, info.distribution or "-", info.version or "-",
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
def _default_out(args: argparse.Namespace) -> Path:
    return Path("runs") / f"{args.dataset}_{args.param}_{args.algo}_ipc{args.ipc}"


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from splatdd import distill as distill_mod
    from splatdd.budget import BudgetError, check_budget
    from splatdd.plugin_api import learned_eval_lr

    param_opts = parse_kv(args.param_opt, "--param-opt")
    algo_opts = parse_kv(args.algo_opt, "--algo-opt")
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    pcls = _plugin_class("parameterization", args.param)
    acls = _plugin_class("algorithm", args.algo)
    iterations = args.iterations if args.iterations is not None else int(acls.default_iterations)
    out = Path(args.out) if args.out else _default_out(args)
    if not args.resume and distill_mod.has_checkpoint(out) and not args.overwrite:
        raise CLIError(f"{out} already holds a run; pass --resume to continue it or --overwrite "
                       f"to start again")
    progress = not args.no_progress

    train, test = _load_data(args.dataset, args.data_root, args.resolution, args.zca, device,
                             progress)
    spec = train.spec
    _print(f"dataset {spec.name}: {len(train.labels)} train / {len(test.labels)} test images, "
           f"{spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes")

    init_gen = torch.Generator().manual_seed(args.seed)
    try:
        param = pcls.build(spec, args.ipc, generator=init_gen, **param_opts)
    except TypeError as exc:
        raise CLIError(f"--param-opt for {args.param!r}: {exc}") from None
    except ValueError as exc:
        raise CLIError(f"cannot build {args.param!r}: {exc}") from None
    try:
        report = check_budget(param, spec, args.ipc)
    except BudgetError as exc:
        raise CLIError(str(exc)) from None
    _print(f"{args.param}: {report}")

    resuming = args.resume and distill_mod.has_checkpoint(out)
    if not resuming and args.init == "real":
        labels = param.labels.cpu()
        images = torch.empty((len(labels), spec.channels, spec.height, spec.width))
        for c in range(spec.num_classes):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx):
                images[idx] = train.sample(c, len(idx), init_gen).cpu()
        diag = param.init_from_real(images, labels, steps=args.init_steps, progress=progress)
        if diag:
            _print("init from real images: " + ", ".join(f"{k}={v:.4g}" for k, v in diag.items()))
    param = param.to(device)

    algo_gen = torch.Generator().manual_seed(args.seed)
    try:
        algo = acls(train, ipc=args.ipc, generator=algo_gen, **algo_opts)
    except TypeError as exc:
        raise CLIError(f"--algo-opt for {args.algo!r}: {exc}") from None
    except ValueError as exc:
        raise CLIError(f"cannot build {args.algo!r}: {exc}") from None

    eval_fn = None
    if args.eval_every and args.eval_runs > 0:
        def eval_fn(p, step):
            res = _evaluate(p, test, args, learned_eval_lr(algo), progress=False)
            _print(f"\n[step {step}] {_format_acc(res)}")
            return {"mean": res.mean, "std": res.std, "accs": list(res.accs)}

    _print(f"distilling {iterations} iterations of {args.param} + {args.algo}, ipc {args.ipc}, into {out}"
           + (" (resuming)" if resuming else ""))
    t0 = time.perf_counter()
    try:
        distill_mod.distill(param, algo, iterations=iterations, out_dir=out,
                            checkpoint_every=args.checkpoint_every, resume=args.resume,
                            seed=args.seed, eval_every=args.eval_every, eval_fn=eval_fn,
                            progress=progress, lr=args.lr,
                            config={"dataset_root": args.data_root, "init": args.init,
                                    "param_opts": param_opts, "algo_opts": algo_opts})
    except distill_mod.CheckpointMismatch as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with the same command plus --resume (checkpoint in "
              f"{out})", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    file = out / distill_mod.DISTILLED_NAME
    _print(f"wrote {file} ({file.stat().st_size:,} bytes) in {seconds:.1f} s")
    history = json.loads((out / distill_mod.HISTORY_NAME).read_text())
    curve = history.get("evals", [])

    results: dict[str, Any] = {
        "dataset": spec.name, "parameterization": args.param, "algorithm": args.algo,
        "ipc": args.ipc, "iterations": iterations, "seed": args.seed, "device": device,
        "param_opts": param_opts, "algo_opts": algo_opts, "lr": args.lr,
        "file": str(file), "distill_seconds_this_session": seconds,
        "final_loss": history["losses"][-1] if history.get("losses") else None,
        "eval_curve": curve, "eval": None,
    }
    if args.eval_runs > 0:
        res = _evaluate(param, test, args, learned_eval_lr(algo), progress=progress)
        results["eval"] = _eval_result_dict(res, runs=args.eval_runs, epochs=args.eval_epochs,
                                            model=args.eval_model,
                                            lr=_eval_lr(args, learned_eval_lr(algo)))
        _print(f"{_format_acc(res)} ({args.eval_runs} x {args.eval_model}, "
               f"{args.eval_epochs} epochs)")
    from splatdd.io_utils import atomic_write_json
    atomic_write_json(out / "results.json", results)
    _print(f"results: {out / 'results.json'}")
    return 0


def _eval_lr(args: argparse.Namespace, learned: float | None) -> float:
    if getattr(args, "eval_lr", None) is not None:
        return float(args.eval_lr)
    return float(learned) if learned is not None else DEFAULT_EVAL_LR


def _evaluate(param, test, args: argparse.Namespace, learned_lr: float | None, *, progress: bool):
    import torch

    from splatdd.evaluate import evaluate
    with torch.no_grad():
        images = param.decode(None, resolution=(test.spec.height, test.spec.width)).detach()
    return evaluate(images.float(), param.labels.detach(), test, model=args.eval_model,
                    runs=args.eval_runs, epochs=args.eval_epochs,
                    lr=_eval_lr(args, learned_lr), seed=args.seed, progress=progress)


# ---- eval / render / export ------------------------------------------------------------------------
def _load_file(path: str, device: str = "cpu"):
    from splatdd import distilled_file
    from splatdd.registry import PluginLoadError, UnknownPluginError
    if not Path(path).is_file():
        raise CLIError(f"no such file: {path}")
    try:
        return distilled_file.load(path, registry=_registry(), device=device)
    except ValueError as exc:
        raise CLIError(f"invalid distilled file: {exc}") from None
    except (UnknownPluginError, PluginLoadError) as exc:
        notes = "; ".join(getattr(exc, "__notes__", []))
        raise CLIError(f"{exc}" + (f" ({notes})" if notes else "")) from None


def cmd_eval(args: argparse.Namespace) -> int:
    device = _device(args.device)
    d = _load_file(args.file, device)
    spec = d.spec
    root = args.data_root or (d.meta.get("extra") or {}).get("dataset_root")
    res_hw = args.resolution or (spec.height, spec.width)
    _, test = _load_data(spec.name, root, res_hw, spec.zca, device, not args.no_progress)
    lr = args.lr if args.lr is not None else (d.learned_lr if d.learned_lr is not None
                                              else DEFAULT_EVAL_LR)
    from splatdd.evaluate import evaluate
    images = d.images(resolution=tuple(res_hw))
    _print(f"{args.file}: {d.param.name} ({d.algorithm or '?'}), {len(d.labels)} images, "
           f"ipc {d.ipc}, {spec.name}; evaluating at {res_hw[0]}x{res_hw[1]} with lr {lr:g}"
           + (" (learned)" if args.lr is None and d.learned_lr is not None else ""))
    res = evaluate(images, d.labels, test, model=args.model, runs=args.runs, epochs=args.epochs,
                   lr=lr, seed=args.seed, progress=not args.no_progress)
    _print(f"{_format_acc(res)} ({args.runs} x {args.model}, {args.epochs} epochs)")
    if args.json:
        from splatdd.io_utils import atomic_write_json
        atomic_write_json(args.json, {"file": args.file, "dataset": spec.name,
                                      "resolution": list(res_hw), **_eval_result_dict(
                                          res, runs=args.runs, epochs=args.epochs,
                                          model=args.model, lr=lr)})
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    d = _load_file(args.file)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must end in .png (use `splatdd export` for tensors), got {out}")
    d.export_png(out, nrow=args.nrow, resolution=args.resolution, scale=args.scale)
    _print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    d = _load_file(args.file)
    d.export_tensor(args.out, resolution=args.resolution)
    _print(f"wrote {args.out} (images normalised; mean/std inside)")
    return 0


# ---- parser --------------------------------------------------------------------------------------
def build_parser(*, plugin_commands: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splatdd", description="Dataset distillation with 2D "
                                "Gaussians and other parameterizations.")
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

    sp = sub.add_parser("distill", help="distil a dataset (resumable)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = sp.add_argument_group("what")
    g.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist | mnist | cifar10 | cifar100 | imagefolder")
    g.add_argument("--data-root", default=None, help="dataset folder (FashionMNIST: default "
                   "$SPLATDD_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    g.add_argument("--resolution", type=_resolution, default=None, help="resize to R or HxW")
    g.add_argument("--zca", action="store_true", help="ZCA-whiten the data (CIFAR protocol)")
    g.add_argument("--param", default="pixel", help="parameterization plugin")
    g.add_argument("--algo", default="dm", help="algorithm plugin")
    g.add_argument("--ipc", type=_positive_int, required=True, help="images per class (budget)")
    g.add_argument("--param-opt", action="append", metavar="K=V", help="parameterization option "
                   "(repeatable), e.g. gpc=30")
    g.add_argument("--algo-opt", action="append", metavar="K=V", help="algorithm option "
                   "(repeatable), e.g. batch_real=128")
    g.add_argument("--init", choices=("real", "noise"), default="real",
                   help="initialise from random real images or keep the plugin's own init")
    g.add_argument("--init-steps", type=_nonneg_int, default=None,
                   help="steps for plugins whose init_from_real fits (gaussian, siren)")
    g = sp.add_argument_group("how")
    g.add_argument("--iterations", type=_nonneg_int, default=None,
                   help="outer iterations (default: the algorithm's paper default, e.g. DM 20000)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate of the parameterization (default: plugin's paper default)")
    g.add_argument("--out", default=None, help="run folder (default runs/DATASET_PARAM_ALGO_ipcN)")
    g.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start again in a used run folder")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=100,
                   help="iterations between checkpoints (0: only at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    g.add_argument("--threads", type=_nonneg_int, default=0, help="torch CPU threads (0: default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = sp.add_argument_group("evaluation (at the end)")
    g.add_argument("--eval-runs", type=_nonneg_int, default=3, help="networks to train (0: skip)")
    g.add_argument("--eval-epochs", type=_positive_int, default=1000)
    g.add_argument("--eval-model", default="ConvNet")
    g.add_argument("--eval-lr", type=_positive_float, default=None,
                   help="evaluation lr (default: learned lr if the algorithm has one, else 0.01)")
    g.add_argument("--eval-every", type=_nonneg_int, default=0,
                   help="also evaluate every N iterations (0: only at the end)")
    sp.set_defaults(func=cmd_distill)

    sp = sub.add_parser("eval", help="evaluate a distilled file",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("file")
    sp.add_argument("--model", default="ConvNet")
    sp.add_argument("--runs", type=_positive_int, default=3)
    sp.add_argument("--epochs", type=_positive_int, default=1000)
    sp.add_argument("--lr", type=_positive_float, default=None,
                    help="default: the file's learned lr, else 0.01")
    sp.add_argument("--resolution", type=_resolution, default=None,
                    help="decode and test at R or HxW (default: the file's)")
    sp.add_argument("--data-root", default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("render", help="write a distilled file's images as a PNG grid")
    sp.add_argument("file")
    sp.add_argument("--out", required=True, help="output .png")
    sp.add_argument("--resolution", type=_resolution, default=None)
    sp.add_argument("--nrow", type=_positive_int, default=None,
                    help="images per row (default: one column per class)")
    sp.add_argument("--scale", type=_positive_int, default=1, help="pixel-replication zoom")
    sp.set_defaults(func=cmd_render)

    sp = sub.add_parser("export", help="write decoded images + labels as a torch .pt file")
    sp.add_argument("file")
    sp.add_argument("--out", required=True, help="output .pt")
    sp.add_argument("--resolution", type=_resolution, default=None)
    sp.set_defaults(func=cmd_export)

    from splatdd import fit
    fit.register(sub)

    if plugin_commands:
        _add_plugin_commands(sub)
    return p


def _add_plugin_commands(sub) -> None:
    from splatdd.registry import PluginLoadError
    reg = _registry()
    for info in reg.list_plugins("command"):
        if not info.active:
            continue
        try:
            register = reg.get("command", info.name)
            register(sub)
        except PluginLoadError as exc:
            print(f"splatdd: warning: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            print(f"splatdd: warning: command plugin {info.name!r} failed to register: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # only load command plugins when the subcommand is not a built-in one (keeps startup fast)
    builtin = {"plugins", "distill", "eval", "render", "export", "fit"}
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(plugin_commands=first not in builtin)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
    except CLIError as exc:
        print(f"splatdd: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
