"""Speed where users wait (issue 15): every figure a ratio against the code before the issue.

The baseline is a git revision (default ``d888e79``, the parent of the issue's work) checked out
into a temporary worktree; its measurements run in subprocesses whose ``PYTHONPATH`` puts that
tree's ``src/`` and ``plugins/*/src`` first (the editable install's import redirect is switched
off there). The compiled renderer: ``--base-compiled`` names a build of the base revision's
``cpp/`` (default: the installed module, right as long as ``cpp/`` did not change). Every case
runs in a fresh process per side and round, the sides interleaved (base, new, base, new, ...);
each figure is the minimum over rounds. One torch thread everywhere unless ``--threads``.

Cases (FashionMNIST, 28 px, ConvNet-D3 width 128, as the README's main job):

* ``dm_pixel`` / ``dm_gaussian``: one dm iteration (loss + backward), IPC 1, batch_real 256;
  the new side in fp32 (default) and with ``precision="bf16"`` (where the CPU has native bf16);
  minor page faults per iteration counted (``getrusage``);
* ``eval_epoch``: one evaluation training epoch on 110 images (the Gaussian IPC-1 set's size);
* ``test_pass``: the evaluation's test pass over ``--test-images`` real test images;
* ``gauss_init``: gaussian ``init_from_real`` at IPC 1 (110 Gaussian images) with each side's
  defaults: seconds, steps and final MSE;
* ``fit``: ``splatdd fit``'s per-step seconds of gaussian and siren at equal storage (963 fp32
  floats per image, 128 px, 4 images), and their ratio on each side;
* ``accuracy`` (``--accuracy``): the dm main job in small: pixel IPC 1, ``--acc-iters`` dm
  iterations, then the paper's evaluation with ``--acc-epochs`` epochs x ``--acc-runs`` nets;
  base fp32, new fp32 and new bf16, same seeds.

The renderer's own figures come from ``benchmarks/results/render_speed.json`` (written by the
renderer's benchmark) when it exists.

    heavy python benchmarks/speed.py --base-compiled /path/to/base/_C.so --accuracy
    python benchmarks/speed.py --quick --out /tmp/speed       # a short look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TARGETS = {"dm_pixel": 3.0, "dm_gaussian": 3.0, "eval_epoch": 5.0, "test_pass": 5.0,
           "gauss_init": 3.0, "fit_ratio": 5.0, "render_128": 2.0, "render_32": 1.0}


# ---- worker side (runs inside the measured tree) --------------------------------------------------
def _bootstrap(side: str) -> None:
    """In a base worker: drop the editable install's redirect so PYTHONPATH's tree is imported."""
    if side == "base":
        sys.meta_path[:] = [f for f in sys.meta_path
                            if type(f).__name__ != "ScikitBuildRedirectingFinder"]


def _fashion(n_test: int | None = None):
    from splatdd.data import load_dataset
    train, test = load_dataset("fashion_mnist", progress=False)
    return train, test


def _first_per_class(real, k: int):
    import torch
    idx = torch.cat([torch.nonzero(real.labels == c).flatten()[:k]
                     for c in range(real.spec.num_classes)])
    return real.images[idx], real.labels[idx]


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _case_dm(param_name: str, iters: int, precision: str) -> dict:
    import torch
    from splatdd_dm import DistributionMatching
    train, _ = _fashion()
    g = torch.Generator().manual_seed(0)
    if param_name == "pixel":
        from splatdd_pixel import PixelImages
        param = PixelImages.build(train.spec, 1, generator=g)
    else:
        from splatdd_gaussian import GaussianImages
        param = GaussianImages.build(train.spec, 1, generator=g, init="random")
    opts = {"batch_real": 256}
    if precision != "fp32":
        opts["precision"] = precision
    algo = DistributionMatching(train, ipc=1, generator=torch.Generator().manual_seed(1), **opts)
    times, faults = [], []
    for it in range(iters + 1):                    # the first is a warm-up
        f0, t0 = _minflt(), time.perf_counter()
        loss = algo.loss(param, it)
        loss.backward()
        dt, df = time.perf_counter() - t0, _minflt() - f0
        param.zero_grad(set_to_none=True)
        if it:
            times.append(dt)
            faults.append(df)
    return {"seconds": min(times), "page_faults": min(faults), "loss": float(loss)}


def _case_eval_epoch(epochs: int) -> dict:
    from splatdd.evaluate import train_network
    from splatdd.models import get_network
    train, _ = _fashion()
    x, y = _first_per_class(train, 11)             # 110 images
    net = get_network("ConvNet", 1, 10, (28, 28), seed=0)
    train_network(net, x, y, epochs=1, seed=0)    # warm-up
    times = []
    for e in range(epochs):
        f0, t0 = _minflt(), time.perf_counter()
        train_network(net, x, y, epochs=1, seed=e + 1)
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "page_faults": _minflt() - f0}


def _case_test_pass(n: int, precision: str = "fp32") -> dict:
    from splatdd.evaluate import test_accuracy
    from splatdd.models import get_network
    from splatdd.plugin_api import RealData
    _, test = _fashion()
    sub = RealData(spec=test.spec, images=test.images[:n], labels=test.labels[:n])
    net = get_network("ConvNet", 1, 10, (28, 28), seed=0)
    warm = RealData(spec=test.spec, images=test.images[:64], labels=test.labels[:64])
    kw = {} if precision == "fp32" else {"precision": precision}
    test_accuracy(net, warm, **kw)
    f0, t0 = _minflt(), time.perf_counter()
    acc = test_accuracy(net, sub, **kw)
    return {"seconds": time.perf_counter() - t0, "page_faults": _minflt() - f0, "acc": acc}


def _conv_seconds(prof) -> float:
    """Self CPU seconds of the convolution ops (forward and backward) in a torch.profiler run."""
    return sum(e.self_cpu_time_total for e in prof.key_averages()
               if "convolution" in e.key) / 1e6


def _case_conv_floor(iters: int, n_test: int) -> dict:
    """Seconds spent inside the convolutions (oneDNN's kernels, forward and backward products;
    torch.profiler's self CPU time) in one new-side fp32 dm iteration (pixel, IPC 1, batch_real
    256), one evaluation epoch (110 images) and the test pass (``n_test`` images): what no fp32
    change outside the convolutions can remove from those steps (minimum over ``iters``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from splatdd.evaluate import test_accuracy, train_network
    from splatdd.models import get_network
    from splatdd.plugin_api import RealData
    from splatdd_dm import DistributionMatching
    from splatdd_pixel import PixelImages
    train, test = _fashion()
    param = PixelImages.build(train.spec, 1, generator=torch.Generator().manual_seed(0))
    algo = DistributionMatching(train, ipc=1, generator=torch.Generator().manual_seed(1),
                                batch_real=256)
    x, y = _first_per_class(train, 11)
    net = get_network("ConvNet", 1, 10, (28, 28), seed=0)
    sub = RealData(spec=test.spec, images=test.images[:n_test], labels=test.labels[:n_test])

    def dm_step() -> None:
        loss = algo.loss(param, 0)
        loss.backward()
        param.zero_grad(set_to_none=True)

    steps = {"dm_embed_conv_s": dm_step,
             "eval_epoch_conv_s": lambda: train_network(net, x, y, epochs=1, seed=1),
             "test_pass_conv_s": lambda: test_accuracy(net, sub)}
    out = {}
    for name, fn in steps.items():
        fn()                                          # warm-up
        best = float("inf")
        for _ in range(max(1, iters)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            best = min(best, _conv_seconds(prof))
        out[name] = best
    out["seconds"] = out["dm_embed_conv_s"]
    return out


def _case_gauss_init() -> dict:
    import torch
    import torch.nn.functional as F
    from splatdd_gaussian import GaussianImages
    train, _ = _fashion()
    param = GaussianImages.build(train.spec, 1, generator=torch.Generator().manual_seed(0))
    x, y = _first_per_class(train, param.gpc)
    t0 = time.perf_counter()
    out = param.init_from_real(x, param.labels)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        mse = float(F.mse_loss(param.decode(), x))
    return {"seconds": seconds, "steps": float(out.get("steps", float("nan"))), "mse": mse,
            "points": param.points, "images": param.num_images}


def _case_fit(steps: int, new_side: bool) -> dict:
    try:
        from splatdd.fit import fit_method, load_images
    except ImportError:                            # the base revision kept it in the plugin
        from splatdd_gaussian.fitting import fit_method, load_images
    images, source = load_images("auto", 4, 128, seed=0)
    out = {}
    for method in ("gaussian", "siren"):
        # per step: the new gaussian's pursuit start would count as step time, so the grid start
        opts = {"init_geometry": "grid"} if method == "gaussian" and new_side else {}
        fit_method(method, images, budget_bytes=963 * 4, steps=2, seed=0, options=opts)  # warm-up
        res = fit_method(method, images, budget_bytes=963 * 4, steps=steps, seed=0, options=opts)
        out[method] = res.seconds_per_step
    out["ratio"] = out["siren"] / out["gaussian"]
    out["source"] = source[:80]
    return out


def _case_tm(steps: int, batch: int, norm: str) -> dict:
    """One tm student unroll (``steps`` differentiable SGD steps on ``batch`` images, ConvNet-D3
    width 128, 28 px) and the backward of its loss: seconds of each part."""
    import torch
    from splatdd.models import get_network
    from splatdd_tm.unroll import flatten_params, param_layout, student_unroll, tm_loss
    train, _ = _fashion()
    x, y = _first_per_class(train, max(1, -(-batch // 10)))
    x, y = x[:batch].clone().requires_grad_(True), y[:batch]
    net = get_network("ConvNet", 1, 10, (28, 28), seed=0, norm=norm)
    names, shapes = param_layout(net)
    theta0 = flatten_params(net)
    target = theta0 + 0.01 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(0))
    lr = torch.tensor(0.01, requires_grad=True)
    best = None
    for _ in range(2):                               # the first is a warm-up
        t0 = time.perf_counter()
        theta = student_unroll(net, names, shapes, theta0, x, y, lr,
                               [torch.arange(batch)] * steps)
        loss = tm_loss(theta, theta0, target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        best = (t1 - t0, t2 - t1)
    return {"seconds": best[0] + best[1], "unroll_s": best[0], "backward_s": best[1],
            "steps": steps, "batch": batch, "norm": norm}


def _case_accuracy(iters: int, epochs: int, runs: int, precision: str,
                   test_precision: str = "fp32") -> dict:
    import torch
    from splatdd.evaluate import evaluate
    from splatdd_dm import DistributionMatching
    from splatdd_pixel import PixelImages
    train, test = _fashion()
    param = PixelImages.build(train.spec, 1, generator=torch.Generator().manual_seed(0))
    x, y = _first_per_class(train, 1)
    param.init_from_real(x, param.labels)
    opts = {"batch_real": 256}
    if precision != "fp32":
        opts["precision"] = precision
    algo = DistributionMatching(train, ipc=1, generator=torch.Generator().manual_seed(1), **opts)
    opt = torch.optim.SGD(param.parameters(), lr=1.0, momentum=0.5)   # DM's pixel setting
    t0 = time.perf_counter()
    losses = []
    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = algo.loss(param, it)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    t_distill = time.perf_counter() - t0
    with torch.no_grad():
        images = param.decode().detach()
    kw = {} if test_precision == "fp32" else {"test_precision": test_precision}
    res = evaluate(images, param.labels, test, runs=runs, epochs=epochs, seed=0, progress=False,
                   **kw)
    return {"mean": res.mean, "std": res.std, "accs": res.accs, "distill_seconds": t_distill,
            "train_seconds": res.train_seconds, "test_seconds": res.test_seconds,
            "final_loss": losses[-1] if losses else float("nan")}


def worker(case: str, args: dict) -> dict:
    import torch
    torch.set_num_threads(int(args.get("threads", 1)))
    if case in ("dm_pixel", "dm_gaussian"):
        return _case_dm(case.split("_")[1], int(args["iters"]), args.get("precision", "fp32"))
    if case == "eval_epoch":
        return _case_eval_epoch(int(args["epochs"]))
    if case == "test_pass":
        return _case_test_pass(int(args["n"]), args.get("precision", "fp32"))
    if case == "conv_floor":
        return _case_conv_floor(int(args.get("iters", 3)), int(args.get("n", 10000)))
    if case == "gauss_init":
        return _case_gauss_init()
    if case == "fit":
        return _case_fit(int(args["steps"]), args.get("side") == "new")
    if case == "tm":
        return _case_tm(int(args["steps"]), int(args["batch"]), args.get("norm", "instancenorm"))
    if case == "accuracy":
        return _case_accuracy(int(args["iters"]), int(args["epochs"]), int(args["runs"]),
                              args.get("precision", "fp32"), args.get("test_precision", "fp32"))
    raise ValueError(f"unknown case {case!r}")


# ---- driver side ----------------------------------------------------------------------------------
def _sh(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _base_tree(rev: str, where: Path | None, compiled: Path | None) -> Path:
    """A worktree of ``rev`` (created when missing) with the compiled module in its ``src``."""
    import shutil
    import splatdd._C as C
    path = where or Path(tempfile.gettempdir()) / f"splatdd-speed-base-{rev}"
    if not (path / "src" / "splatdd").is_dir():
        _sh(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT)
    head = _sh(["git", "rev-parse", "HEAD"], cwd=path)
    want = _sh(["git", "rev-parse", rev], cwd=ROOT)
    if head != want:
        raise SystemExit(f"speed.py: error: {path} is at {head[:9]}, not {rev} ({want[:9]})")
    src = Path(compiled) if compiled else Path(C.__file__)
    dst = path / "src" / "splatdd" / Path(C.__file__).name
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)
    return path


def _env(side: str, base: Path) -> dict:
    env = dict(os.environ)
    if side == "base":
        paths = [str(base / "src")] + sorted(str(p) for p in (base / "plugins").glob("*/src"))
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(case: str, side: str, base: Path, args: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--side", side,
           "--worker-args", json.dumps({**args, "side": side})]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(side, base), capture_output=True, text=True,
                       timeout=timeout, cwd=tempfile.gettempdir())
    if p.returncode != 0:
        raise RuntimeError(f"{case} ({side}) failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["load"] = os.getloadavg()[0]
    out["wall"] = time.perf_counter() - t0
    print(f"  {case:12s} {side:10s} {json.dumps(out)[:160]}", flush=True)
    return out


def _machine(threads: int) -> dict:
    import torch
    model = platform.processor() or ""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model.strip(" x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return {"cpu": model, "logical_cpus": os.cpu_count(), "flags": shown,
            "torch": torch.__version__, "threads": threads, "python": platform.python_version()}


def _min_by(rows: list[dict], key: str = "seconds") -> dict:
    return min(rows, key=lambda r: r[key])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--side", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--base-rev", default="d888e79")
    ap.add_argument("--base-tree", type=Path, help="worktree of --base-rev (made when missing)")
    ap.add_argument("--base-compiled", type=Path,
                    help="splatdd._C built from the base revision's cpp/ (default: installed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dm-iters", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--fit-steps", type=int, default=20)
    ap.add_argument("--cases",
                    default="dm_pixel,dm_gaussian,eval_epoch,test_pass,gauss_init,fit,conv_floor")
    ap.add_argument("--accuracy", action="store_true", help="also the small dm main job")
    ap.add_argument("--tm", action="store_true",
                    help="also tm's unroll: base vs new, and the new side's cost-model grid")
    ap.add_argument("--acc-iters", type=int, default=20)
    ap.add_argument("--acc-epochs", type=int, default=300)
    ap.add_argument("--acc-runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 1 dm iteration, 1 epoch, 1000 test images, 5 fit steps")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--merge", action="store_true",
                    help="keep --out/speed.json's other figures, accuracy and tm; replace only "
                         "the figures of --cases (noted in the report with their load and time)")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render speed.md from --out/speed.json (and the renderer's JSON)")
    a = ap.parse_args(argv)
    if a.worker:
        _bootstrap(a.side)
        print(json.dumps(worker(a.worker, json.loads(a.worker_args))))
        return 0
    if a.report_only:
        from splatdd.io_utils import atomic_write_text
        result = json.loads((a.out / "speed.json").read_text())
        result["merged"] = _prune_notes(result.get("merged", []))
        render_json = HERE / "results" / "render_speed.json"
        if render_json.exists():
            result["render"] = json.loads(render_json.read_text())
        atomic_write_text(a.out / "speed.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(a.out / "speed.md", _markdown(result))
        return 0
    if a.quick:
        a.rounds, a.dm_iters, a.epochs, a.test_images, a.fit_steps = 1, 1, 1, 1000, 5
        a.acc_iters, a.acc_epochs, a.acc_runs = 2, 10, 1
    for name in ("rounds", "threads", "dm_iters", "epochs", "test_images", "fit_steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    from splatdd.precision import bf16_native
    base = _base_tree(a.base_rev, a.base_tree, a.base_compiled)
    cases = [c for c in a.cases.split(",") if c]
    unknown = set(cases) - {"dm_pixel", "dm_gaussian", "eval_epoch", "test_pass", "gauss_init",
                            "fit", "conv_floor"}
    if unknown:
        ap.error(f"--cases: unknown {sorted(unknown)}")
    bf16 = bf16_native("cpu")
    t_start = time.time()
    load_start = os.getloadavg()
    jobs: list[tuple[str, str, dict, str]] = []          # (case, side, args, label)
    for case in cases:
        if case.startswith("dm_"):
            base_args = {"iters": a.dm_iters}
            jobs += [(case, "base", base_args, "base"), (case, "new", base_args, "new")]
            if bf16:
                jobs.append((case, "new", {**base_args, "precision": "bf16"}, "new_bf16"))
        elif case == "eval_epoch":
            jobs += [(case, s, {"epochs": a.epochs}, s) for s in ("base", "new")]
        elif case == "test_pass":
            jobs += [(case, s, {"n": a.test_images}, s) for s in ("base", "new")]
            if bf16:
                jobs.append((case, "new", {"n": a.test_images, "precision": "bf16"}, "new_bf16"))
        elif case == "conv_floor":
            jobs.append((case, "new", {"iters": 3, "n": a.test_images}, "new"))
        elif case == "gauss_init":
            jobs += [(case, s, {}, s) for s in ("base", "new")]
        elif case == "fit":
            jobs += [(case, s, {"steps": a.fit_steps}, s) for s in ("base", "new")]
    rows: dict[tuple[str, str], list[dict]] = {}
    acc: dict = {}
    tm: dict = {}

    def write(stage: str) -> None:
        """Write what is measured so far (a long run stopped early still leaves its figures)."""
        result = _summarise(a, rows, acc, base, bf16, t_start, load_start)
        result["stage"] = stage
        old_json = a.out / "speed.json"
        if a.merge and old_json.exists():
            merged = json.loads(old_json.read_text())
            merged["figures"].update(result["figures"])
            merged["render"] = result["render"]
            if acc:                                   # a re-measured main job replaces the old
                merged["accuracy"] = result["accuracy"]
                merged["settings"]["accuracy"] = result["settings"]["accuracy"]
            note = {"cases": cases + (["accuracy"] if acc else []), "stage": stage, "load_start": list(load_start),
                    "load_end": list(os.getloadavg()), "rounds": a.rounds,
                    "epochs": a.epochs, "dm_iters": a.dm_iters,
                    "new": result["new"], "finished": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                    time.gmtime())}
            merged["merged"] = _prune_notes(merged.get("merged", []) + [note])
            result = merged
        if tm.get("grid"):
            result["tm"] = _tm_summary(tm)
        a.out.mkdir(parents=True, exist_ok=True)
        from splatdd.io_utils import atomic_write_text
        atomic_write_text(a.out / "speed.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(a.out / "speed.md", _markdown(result))

    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        for case, side, args, label in jobs:
            if case == "gauss_init" and r >= 2:
                continue                                   # long: at most two rounds
            res = _run(case, side, base, {**args, "threads": a.threads}, a.timeout)
            rows.setdefault((case, label), []).append(res)
        write(f"round {r + 1} of {a.rounds}")
    if a.tm:
        print("tm", flush=True)
        for r in range(a.rounds):
            for side in ("base", "new"):
                tm.setdefault(side, []).append(_run("tm", side, base, {
                    "steps": 10, "batch": 10, "threads": a.threads}, a.timeout))
        tm["norm_none"] = [_run("tm", "new", base, {"steps": 10, "batch": 10, "norm": "none",
                                                    "threads": a.threads}, a.timeout)]
        tm["grid"] = [_run("tm", "new", base, {"steps": st, "batch": bs, "threads": a.threads},
                           a.timeout) for st in (2, 5, 10) for bs in (10, 20)]
        write("tm")
    if a.accuracy:
        print("accuracy", flush=True)
        acc_args = {"iters": a.acc_iters, "epochs": a.acc_epochs, "runs": a.acc_runs,
                    "threads": a.threads}
        acc["base"] = _run("accuracy", "base", base, acc_args, a.timeout * 3)
        write("accuracy (base)")
        acc["new"] = _run("accuracy", "new", base, acc_args, a.timeout * 3)
        write("accuracy (new fp32)")
        if bf16:
            acc["new_bf16"] = _run("accuracy", "new", base, {**acc_args, "precision": "bf16"},
                                   a.timeout * 3)
            write("accuracy (new bf16)")
            acc["new_test_bf16"] = _run("accuracy", "new", base,
                                        {**acc_args, "test_precision": "bf16"}, a.timeout * 3)
        write("accuracy")
    write("complete")
    print((a.out / "speed.md").read_text())
    return 0


def _prune_notes(notes: list[dict]) -> list[dict]:
    """The ``--merge`` notes without those a later note supersedes (its cases cover theirs)."""
    kept = []
    for i, m in enumerate(notes):
        if not any(set(m.get("cases", ())) <= set(later.get("cases", ()))
                   for later in notes[i + 1:]):
            kept.append(m)
    return kept


def _summarise(a, rows, acc, base: Path, bf16: bool, t_start: float, load_start) -> dict:
    import hashlib

    import splatdd._C as C
    figures: dict[str, dict] = {}

    def ratio(case: str, label: str = "new", key: str = "seconds") -> dict | None:
        if (case, "base") not in rows or (case, label) not in rows:
            return None
        b, n = _min_by(rows[(case, "base")], key), _min_by(rows[(case, label)], key)
        return {"base_s": b[key], "new_s": n[key], "ratio": b[key] / n[key],
                "base": b, "new": n, "rounds": len(rows[(case, label)])}

    for case in ("dm_pixel", "dm_gaussian"):
        for label in ("new", "new_bf16"):
            r = ratio(case, label)
            if r:
                figures[f"{case}{'_bf16' if label == 'new_bf16' else ''}"] = r
    for case in ("eval_epoch", "test_pass", "gauss_init"):
        r = ratio(case)
        if r:
            figures[case] = r
    r = ratio("test_pass", "new_bf16")
    if r:
        figures["test_pass_bf16"] = r
    if ("conv_floor", "new") in rows:
        cf = rows[("conv_floor", "new")]
        figures["conv_floor"] = {k: min(x[k] for x in cf)
                                 for k in ("dm_embed_conv_s", "eval_epoch_conv_s",
                                           "test_pass_conv_s")}
    if ("fit", "base") in rows and ("fit", "new") in rows:
        side = {}
        for label in ("base", "new"):          # each method's minimum over rounds, then the ratio
            rs = rows[("fit", label)]
            g, sr = min(x["gaussian"] for x in rs), min(x["siren"] for x in rs)
            side[label] = {"gaussian": g, "siren": sr, "ratio": sr / g, "load": rs[-1]["load"]}
        figures["fit_ratio"] = {"base_ratio": side["base"]["ratio"],
                                "new_ratio": side["new"]["ratio"], **side}
    render_json = HERE / "results" / "render_speed.json"
    render = json.loads(render_json.read_text()) if render_json.exists() else None

    def md5(path) -> str:
        return hashlib.md5(Path(path).read_bytes()).hexdigest()

    return {
        "machine": _machine(a.threads),
        "load_start": list(load_start), "load_end": list(os.getloadavg()),
        "seconds": time.time() - t_start,
        "base": {"rev": a.base_rev, "tree": str(base),
                 "compiled_md5": md5(base / "src" / "splatdd" / Path(C.__file__).name)},
        "new": {"rev": _sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT),
                "dirty": bool(_sh(["git", "status", "--porcelain", "--untracked-files=no"],
                                  cwd=ROOT)),
                "compiled_md5": md5(C.__file__)},
        "settings": {"rounds": a.rounds, "threads": a.threads, "dm_iters": a.dm_iters,
                     "epochs": a.epochs, "test_images": a.test_images,
                     "fit_steps": a.fit_steps, "bf16_native": bf16,
                     "accuracy": {"iters": a.acc_iters, "epochs": a.acc_epochs,
                                  "runs": a.acc_runs} if a.accuracy else None},
        "figures": figures, "accuracy": acc, "render": render, "targets": TARGETS,
    }


def _tm_summary(tm: dict) -> dict:
    """Ratio at (10 steps, 10 images) and a least-squares fit seconds = a + b * steps * batch."""
    import torch
    b, n = _min_by(tm["base"]), _min_by(tm["new"])
    grid = tm["grid"]
    X = torch.tensor([[1.0, g["steps"] * g["batch"]] for g in grid], dtype=torch.float64)
    Y = torch.tensor([g["seconds"] for g in grid], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, Y[:, None]).solution[:, 0]
    pred = X @ coef
    return {"base": b, "new": n, "ratio": b["seconds"] / n["seconds"],
            "norm_none": tm["norm_none"][0], "grid": grid,
            "fit": {"a_s": float(coef[0]), "b_s_per_image_step": float(coef[1]),
                    "max_rel_residual": float(((pred - Y).abs() / Y).max())}}


def _mark(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return f"{'met' if value >= target else 'missed'} ({value:.2f}x; target >= {target:g}x)"


def _markdown(r: dict) -> str:
    m, f, s = r["machine"], r["figures"], r["settings"]
    L = ["# Speed where users wait (issue 15)", "",
         f"Generated by `python benchmarks/speed.py` in {r['seconds'] / 60:.1f} min on: {m['cpu']}, "
         f"{m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['threads']} torch thread(s) "
         f"in every measured process. CPU flags: {' '.join(m['flags'])}. Load average (1 min) "
         f"{r['load_start'][0]:.2f} at the start, {r['load_end'][0]:.2f} at the end; the machine "
         "is shared, so absolute times are noisy and only same-run ratios are quoted.", "",
         f"Baseline: revision `{r['base']['rev']}` (worktree `{r['base']['tree']}`, its own Python "
         f"code, compiled module md5 `{r['base']['compiled_md5'][:12]}`); new: `{r['new']['rev']}`"
         f"{' plus uncommitted changes' if r['new']['dirty'] else ''} (compiled module md5 "
         f"`{r['new']['compiled_md5'][:12]}`). Every case runs in a fresh process per side and "
         f"round, sides interleaved; each figure is the minimum over {s['rounds']} rounds "
         "(gaussian initialisation: at most 2)."
         + ("" if r.get("stage", "complete") == "complete"
            else f" **Partial result, written after {r['stage']}.**"), "",
         "## Targets", "", "| target | figure | verdict |", "|---|---|---|"]

    def row(name: str, key: str, target_key: str, extra: str = "") -> None:
        x = f.get(key)
        val = None if x is None else x["ratio"]
        fig = "-" if x is None else f"{x['base_s']:.3f} s -> {x['new_s']:.3f} s{extra}"
        L.append(f"| {name} | {fig} | {_mark(val, TARGETS[target_key])} |")

    for case, label in (("dm_pixel", "dm iteration, pixel, IPC 1, batch_real 256"),
                        ("dm_gaussian", "dm iteration, gaussian, IPC 1, batch_real 256")):
        row(f"{label} (fp32)", case, case)
        if f"{case}_bf16" in f:
            row(f"{label} (precision bf16)", f"{case}_bf16", case)
    row("evaluation epoch, 110 images", "eval_epoch", "eval_epoch")
    row(f"test pass, {s['test_images']} images", "test_pass", "test_pass")
    if "test_pass_bf16" in f:
        row(f"test pass, {s['test_images']} images (test_precision bf16, opt-in)",
            "test_pass_bf16", "test_pass")
    gi = f.get("gauss_init")
    extra = "" if gi is None else (f"; steps {gi['base']['steps']:.0f} -> {gi['new']['steps']:.0f}, "
                                   f"MSE {gi['base']['mse']:.5f} -> {gi['new']['mse']:.5f}")
    row("gaussian initialisation (IPC 1, 110 images)", "gauss_init", "gauss_init", extra)
    fr = f.get("fit_ratio")
    if fr:
        L.append(f"| `splatdd fit` per step, gaussian vs siren at equal storage | base "
                 f"{fr['base_ratio']:.2f}x, new {fr['new_ratio']:.2f}x (gaussian "
                 f"{fr['base']['gaussian']:.4f} -> {fr['new']['gaussian']:.4f} s/step, siren "
                 f"{fr['base']['siren']:.4f} -> {fr['new']['siren']:.4f}) | "
                 f"{_mark(fr['new_ratio'], TARGETS['fit_ratio'])} |")
    ren = r.get("render")
    if ren:
        for c in ren.get("configs", []):
            tgt = TARGETS["render_32"] if int(c["res"]) <= 32 else TARGETS["render_128"]
            L.append(f"| renderer fwd+bwd B {c['B']}, N {c['N']}, {c['res']} px | "
                     f"{c['base_s']:.4f} s -> {c['new_s']:.4f} s | "
                     f"{_mark(c['fwd_bwd_ratio_vs_baseline'], tgt)} |")
        frac = ren.get("fraction_of_peak")
        per = ", ".join(f"B {c['B']}: {100 * c['fraction_of_peak']:.0f} %"
                        for c in ren.get("configs", []) if "fraction_of_peak" in c)
        L.append(f"| renderer: fraction of the measured FMA peak "
                 f"({ren.get('fma_peak_gflops', float('nan')):.1f} GFLOP/s, "
                 f"benchmarks/results/render_speed.json) | "
                 f"{'-' if frac is None else f'{100 * frac:.0f} %'} ({per}) | reported |")
    else:
        L.append("| renderer (B 64/1000/256) | benchmarks/results/render_speed.json not there "
                 "when this ran | not measured here |")
    cf = f.get("conv_floor")
    if cf:
        L += ["", "## The fp32 floor: time inside the convolutions", "",
              "`conv_floor`: torch.profiler's self CPU time of the convolution ops that still run "
              "in oneDNN (forward and backward products) inside one new-side fp32 step of each "
              "case (minimum over 3 profiled steps; the profiler adds a little time of its own). "
              "oneDNN's fp32 direct convolutions run near this core's AVX-512 FMA peak, so no "
              "change outside them can make the step faster than this; where the target needs "
              "less, it is out of reach without a cheaper convolution algorithm. The fused first "
              "block and Winograd (below) are such algorithms, and their time is not in this "
              "column: none of the three steps uses a oneDNN convolution any more (the graph-free "
              "paths since the fused first block and Winograd; a training step inside "
              "`first_order` since the filters' gradient runs by Winograd as well), so the "
              "column is zero and the remaining time is the Winograd GEMMs, the transforms, "
              "the fused blocks and the step's fixed costs.", "",
              "| case | base s | new s | inside oneDNN convolutions s | new s minus those | "
              "time the target needs | target below the floor? |", "|---|---|---|---|---|---|---|"]
        for case, key, tkey in (("dm_pixel", "dm_embed_conv_s", "dm_pixel"),
                                ("eval_epoch", "eval_epoch_conv_s", "eval_epoch"),
                                ("test_pass", "test_pass_conv_s", "test_pass")):
            x = f.get(case)
            if x is None or key not in cf:
                continue
            need = x["base_s"] / TARGETS[tkey]
            L.append(f"| {case} (fp32) | {x['base_s']:.3f} | {x['new_s']:.3f} | {cf[key]:.3f} | "
                     f"{x['new_s'] - cf[key]:.3f} | {need:.3f} | "
                     f"{'yes: unreachable in fp32' if need < cf[key] else 'no'} |")
    acc = r.get("accuracy") or {}
    if acc:
        a = s["accuracy"]
        L += ["", f"## dm main job, small (pixel IPC 1, {a['iters']} dm iterations, batch_real "
              f"256, then {a['runs']} nets x {a['epochs']} epochs of the papers' evaluation, "
              "seed 0; same seeds on every side)", "",
              "The base revision's dm drew every class's real batch and DSA seed from one "
              "generator; since commit 74c5b5f (dm on K processes) each class has its own stream, "
              "so the two sides distil different images from the same seeds and only "
              "statistical agreement is expected; the evaluation's random stream is unchanged. "
              "The fp32 speed changes are tested equal to the one-pass maths "
              "(tests/test_speed_equivalence.py, tests/test_evaluate.py).", "",
              "Sides: `base` (the revision before the issue), `new` (fp32 throughout), "
              "`new_bf16` (dm's real-batch embedding in bf16, evaluation fp32), `new_test_bf16` "
              "(fp32 distillation and training, the test pass in bf16: the same distilled images "
              "and trained nets as `new`, so any difference is the bf16 test pass's).", "",
              "| side | accuracy % | per run | distill s | eval train s | eval test s | final dm loss |",
              "|---|---|---|---|---|---|---|"]
        for k, v in acc.items():
            L.append(f"| {k} | {v['mean']:.2f} +- {v['std']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v['accs'])} | {v['distill_seconds']:.1f} | "
                     f"{v['train_seconds']:.1f} | {v['test_seconds']:.1f} | "
                     f"{v.get('final_loss', float('nan')):.4f} |")
    tm = r.get("tm")
    if tm:
        fit = tm["fit"]
        L += ["", "## tm student unroll (ConvNet-D3 width 128, 28 px, 1 channel)", "",
              f"Base vs new at syn_steps 10, batch_syn 10: {tm['base']['seconds']:.2f} s -> "
              f"{tm['new']['seconds']:.2f} s ({tm['ratio']:.2f}x; unroll "
              f"{tm['new']['unroll_s']:.2f} s + backward {tm['new']['backward_s']:.2f} s). "
              f"A ConvNet without normalisation layers: {tm['norm_none']['seconds']:.2f} s "
              f"({tm['new']['seconds'] / tm['norm_none']['seconds']:.2f}x less).", "",
              f"Cost model fitted on the grid below: seconds = {fit['a_s']:.3f} + "
              f"{fit['b_s_per_image_step'] * 1e3:.2f} ms x syn_steps x batch_syn (largest "
              f"relative residual {fit['max_rel_residual']:.0%}).", "",
              "| syn_steps | batch_syn | unroll s | backward s | total s | load |",
              "|---|---|---|---|---|---|"]
        for g in tm["grid"]:
            L.append(f"| {g['steps']} | {g['batch']} | {g['unroll_s']:.2f} | "
                     f"{g['backward_s']:.2f} | {g['seconds']:.2f} | {g['load']:.1f} |")
    L += ["", "## What changed, and where the time goes now", "",
          "* ConvNet's block after each convolution (instance norm with its affine, ReLU, 2x2 "
          "average pool) runs as one compiled CPU op (`splatdd.norm_act_pool`, in `splatdd._C`): "
          "two reads of each plane for its statistics and one for the output, instead of three "
          "PyTorch ops of which the NCHW average pool alone cost about as much as the convolution "
          "before it. Its backward is first-order, so ConvNets use it without a graph (dm's "
          "real batches, the test pass) and, under a graph, only inside "
          "`splatdd.models.first_order` (evaluation training, dm's embedder); dc and tm, which "
          "differentiate twice, keep the modules. Tested against the float64 PyTorch twin "
          "(tests/test_norm_act_pool.py).",
          "* The convolutions of the graph-free paths (dm's real batches, the test pass): the "
          "first block's 3x3 convolution on the image's 1-4 channels runs inside the fused block "
          "(`splatdd.norm_act_pool.conv_instance_norm_act_pool`: each output plane is computed "
          "into scratch, normalised, activated and pooled, never stored; oneDNN's convolution "
          "there was bound by writing its N x 128 x 32 x 32 output), and the 128 -> 128 "
          "convolutions by Winograd F(4x4, 3x3) (`splatdd.winograd`: 36 instead of 144 "
          "multiplies per 4x4 output tile and channel pair; compiled transforms and a batched "
          "GEMM; its float32 error, a few times a direct convolution's, is bounded in "
          "tests/test_winograd.py and measured in benchmarks/results/winograd_speed.md). "
          "Under a graph inside `first_order` (evaluation training, dm's synthetic images) the "
          "forward, the input's gradient and the filters' gradient run by Winograd too "
          "(`splatdd.winograd_train`; the filters' gradient through the output transform's "
          "adjoint and the forward's kept input transform; the transforms' buffers kept per "
          "layer in a `WinogradWorkspace`); outside it (dc, tm) the modules run as before.",
          "* dm: the real batches (10 x 256 images per iteration) are augmented and embedded in "
          "passes of 16 images and their embeddings summed: the same mean up to "
          "rounding (tests/test_speed_equivalence.py), and no per-call mapping of ~100 MB "
          "activation buffers (page-fault counts below). `precision=\"bf16\"` embeds the "
          "real batches with a bf16 copy of the frozen network (AMX/AVX512-BF16 here; used only "
          "where the CPU or GPU has native bf16, else fp32 with a warning); the synthetic "
          "images' path and gradient stay fp32.",
          "* evaluation: each SGD step runs forward+backward in passes of 16 images with the "
          "gradient accumulated (same random stream, same gradient up to rounding; batch-norm "
          "nets keep one pass) through the fused blocks; the test pass runs passes of 16 under "
          "inference_mode. The training epoch's time is now mostly the Winograd GEMMs (forward, "
          "input and filters' gradients; benchmarks/results/winograd_speed.md times them "
          "alone), then the transforms, the fused blocks and the step's fixed costs. The "
          "opt-in protocol option "
          "`test_precision = \"bf16\"` runs the test pass with a bf16 copy of each trained net "
          "(its accuracy effect: the `new_test_bf16` row); the papers' protocol stays fp32. "
          "channels_last was measured slower here with instance norm, so it is not used. "
          "Evaluation nets are not run in parallel within one process: the 2 cores are shared "
          "and a second thread did not help (the issue's profile); `torchrun` spreads them over "
          "processes (benchmarks/results/distributed.md).",
          "* gaussian initialisation: the fit starts from a matching pursuit of each image "
          "(splatdd_gaussian.pursuit) and runs 250 Adam steps instead of 1000 from a jittered "
          "grid; the MSE column shows it ends lower. Both sides pay the same one-time costs "
          "(first Adam construction imports torch's compiler stack, several seconds).",
          "* `splatdd fit` ratio and renderer rows: the ratio is measured here with the grid "
          "start on the new side (per-step cost only); the renderer rows come from "
          "benchmarks/results/render_speed.json (benchmarks/render.py)."]
    for mnote in r.get("merged", []):
        L += ["", f"Re-measured later with `--merge` ({mnote['finished']}, load "
              f"{mnote['load_start'][0]:.2f} -> {mnote['load_end'][0]:.2f}, new `"
              f"{mnote['new']['rev']}`): {', '.join(mnote['cases'])}"
              + (f" ({mnote['rounds']} rounds" + (f", {mnote['epochs']} epochs and "
                 f"{mnote['dm_iters']} dm iterations per round" if "epochs" in mnote else "")
                 + ")" if "rounds" in mnote else "")
              + "; the other figures are from the run described at the top."]
    L += ["", "## Detail (minimum over rounds)", "",
          "| case | base s | new s | ratio | page faults base -> new | load (base, new) |",
          "|---|---|---|---|---|---|"]
    for k, x in f.items():
        if "ratio" not in x:
            continue
        pf = (f"{x['base'].get('page_faults', '-')} -> {x['new'].get('page_faults', '-')}")
        L.append(f"| {k} | {x['base_s']:.3f} | {x['new_s']:.3f} | {x['ratio']:.2f} | {pf} | "
                 f"{x['base']['load']:.1f}, {x['new']['load']:.1f} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
