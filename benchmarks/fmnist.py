"""FashionMNIST benchmark: pixel + DM against random real images and the published DM row.

For each IPC it evaluates (same protocol for every row):

* ``random real``: ``ipc`` random real training images per class (seeded) -- this is also the DM
  run's initialisation, i.e. DM at iteration 0;
* ``pixel + DM`` after each iteration count in ``--eval-at`` (the distillation resumes from its
  checkpoint between points, so the points lie on one run);

and compares with the DM (pixels) row of shared/ANCHORS.md (71.5 / 83.6 / 88.2 at IPC 1/10/50,
ConvNet-3, 20,000 DM iterations, 1000 evaluation epochs, unverified recall).

Results go to ``benchmarks/results/fmnist.json`` (every measured point with its settings and
timings), ``fmnist.md`` (the table) and ``fmnist.png`` (accuracy vs iterations). The script resumes
from its JSON: points already measured with the same settings are skipped, and the distillation
continues from ``--work-dir``'s checkpoints. Example (the committed results)::

    python benchmarks/fmnist.py --ipc 1 --eval-at 0,100,200 --batch-real 64 \
        --eval-runs 2 --eval-epochs 300

The paper protocol is ``--ipc 1 10 --iterations 20000 --batch-real 256 --eval-runs 3
--eval-epochs 1000`` (hours on a GPU-less machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
PUBLISHED_DM = {1: 71.5, 10: 83.6, 50: 88.2}
ANCHOR = ("shared/ANCHORS.md, 'FashionMNIST, ConvNet-3, test accuracy (%)', row 'DM (pixels)' "
          "(DM, WACV 2023; unverified recall): 71.5 / 83.6 / 88.2 at IPC 1 / 10 / 50")


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--iterations", type=int, default=200, help="DM iterations (last point)")
    ap.add_argument("--eval-at", default=None,
                    help="comma-separated iteration counts to evaluate at (default 0,N/2,N)")
    ap.add_argument("--batch-real", type=int, default=256, help="DM real images per class/step")
    ap.add_argument("--eval-runs", type=int, default=3)
    ap.add_argument("--eval-epochs", type=int, default=1000)
    ap.add_argument("--eval-model", default="ConvNet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=str(HERE / "results" / "fmnist.json"))
    ap.add_argument("--work-dir", default="runs/bench_fmnist", help="DM checkpoints")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--note", default=None, help="a remark on the machine, kept in the results")
    a = ap.parse_args(argv)
    if a.eval_at is None:
        pts = sorted({0, a.iterations // 2, a.iterations})
    else:
        pts = sorted({int(x) for x in a.eval_at.split(",") if x.strip()})
    if not pts or pts[0] < 0:
        ap.error("--eval-at needs iteration counts >= 0")
    a.points = pts
    return a


def _eval_key(a: argparse.Namespace) -> dict[str, Any]:
    return {"model": a.eval_model, "runs": a.eval_runs, "epochs": a.eval_epochs, "seed": a.seed}


def _load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": "fmnist", "anchor": ANCHOR, "published_dm": PUBLISHED_DM, "entries": []}


def _find(results, **match) -> dict[str, Any] | None:
    for e in results["entries"]:
        if all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def _write_outputs(results: dict[str, Any], json_path: Path) -> None:
    from splatdd.io_utils import atomic_write_json, atomic_write_text
    atomic_write_json(json_path, results)
    atomic_write_text(json_path.with_suffix(".md"), _table(results))
    _plot(results, json_path.with_suffix(".png"))


def _best(results, ipc: int, method: str) -> dict[str, Any] | None:
    es = [e for e in results["entries"] if e["ipc"] == ipc and e["method"] == method]
    # the longest run, and among its evaluations the one closest to the protocol (most epochs, nets)
    return max(es, key=lambda e: (e["iterations"], e["eval"]["epochs"], e["eval"]["runs"])) \
        if es else None


def _table(results: dict[str, Any]) -> str:
    ipcs = sorted({e["ipc"] for e in results["entries"]} | {1, 10})
    lines = ["# FashionMNIST: pixel + DM (splatdd) vs random real images vs published DM", "",
             f"Compared with: {ANCHOR}.", "",
             "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " | settings |",
             "|---|" + "---|" * len(ipcs) + "---|"]

    def cell(e):
        if e is None:
            return "-"
        if len(e["accs"]) == 1:
            return f"{e['mean']:.2f} (1 net)"
        return f"{e['mean']:.2f} +- {e['std']:.2f}"

    for method, label in (("random_real", "random real images"), ("pixel_dm", "pixel + DM (ours)")):
        es = [_best(results, i, method) for i in ipcs]
        per_ipc = []
        for i, e in zip(ipcs, es):
            if e is None:
                continue
            ev = e["eval"]
            txt = f"{ev['runs']} x {ev['model']}, {ev['epochs']} epochs"
            if method == "pixel_dm":
                txt = f"{e['iterations']} DM iterations, batch_real {e['batch_real']}; " + txt
            per_ipc.append((i, txt))
        if len({t for _, t in per_ipc}) <= 1:
            settings = per_ipc[0][1] if per_ipc else ""
        else:
            settings = "; ".join(f"IPC {i}: {t}" for i, t in per_ipc)
        lines.append(f"| {label} | " + " | ".join(cell(e) for e in es) + f" | {settings} |")
    lines.append("| DM (published) | " + " | ".join(str(PUBLISHED_DM.get(i, "-")) for i in ipcs)
                 + " | 20000 iterations, batch_real 256; 1000 epochs |")
    lines += ["", "## All measured points", "",
              "| IPC | method | iterations | accuracy (%) | per-run | evaluation | distill s | eval s |",
              "|---|---|---|---|---|---|---|---|"]
    for e in sorted(results["entries"], key=lambda e: (e["ipc"], e["method"], e["iterations"],
                                                       e["eval"]["epochs"])):
        lines.append(f"| {e['ipc']} | {e['method']} | {e['iterations']} | {cell(e)} | "
                     f"{', '.join(f'{a:.2f}' for a in e['accs'])} | "
                     f"{e['eval']['runs']} x {e['eval']['epochs']} ep | "
                     f"{e.get('distill_seconds', 0):.0f} | {e.get('eval_seconds', 0):.0f} |")
    dev = _deviations(results)
    if dev:
        lines += ["", "**Not the paper protocol** (so not directly comparable with the published "
                      "row): " + "; ".join(dev) + "."]
    env = results.get("environment", {})
    if env:
        lines += ["", f"Machine: {env.get('machine')}; torch {env.get('torch')}. "
                      f"{env.get('note', '')}".rstrip()]
    notes = results.get("notes")
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def _deviations(results: dict[str, Any]) -> list[str]:
    """How the measured points differ from the published protocol (20k iterations, batch_real
    256, 3 nets x 1000 epochs)."""
    out = []
    dm = [e for e in results["entries"] if e["method"] == "pixel_dm"]
    if dm:
        its = max(e["iterations"] for e in dm)
        if its < 20000:
            out.append(f"at most {its} DM iterations instead of 20,000 "
                       f"({100 * its / 20000:.1f}% of the paper's run)")
        brs = sorted({e["batch_real"] for e in dm})
        if brs != [256]:
            out.append(f"DM real batch {', '.join(map(str, brs))} per class instead of 256")
    evs = {(e["eval"]["runs"], e["eval"]["epochs"]) for e in results["entries"]}
    for runs, epochs in sorted(evs):
        if (runs, epochs) != (3, 1000):
            out.append(f"evaluation with {runs} net{'s' if runs != 1 else ''} x {epochs} epochs "
                       f"instead of 3 x 1000")
    ipcs = sorted({e["ipc"] for e in results["entries"]})
    missing = [i for i in (1, 10) if i not in ipcs]
    if missing:
        out.append(f"IPC {', '.join(map(str, missing))} not run")
    return out


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from splatdd.io_utils import atomic_save_with

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k, ipc in enumerate(sorted({e["ipc"] for e in results["entries"]})):
        color = f"C{k}"
        evals = sorted({(e["eval"]["runs"], e["eval"]["epochs"]) for e in results["entries"]
                        if e["ipc"] == ipc})
        for j, (runs, epochs) in enumerate(evals):
            pts = sorted((e["iterations"], e["mean"], e["std"]) for e in results["entries"]
                         if e["ipc"] == ipc and e["method"] in ("pixel_dm", "random_real")
                         and (e["eval"]["runs"], e["eval"]["epochs"]) == (runs, epochs))
            if pts:
                xs, ms, ss = zip(*pts)
                ax.errorbar(xs, ms, yerr=ss, marker="os^"[j % 3], color=color, capsize=3,
                            ls="-" if len(pts) > 1 else "none",
                            label=f"pixel + DM, IPC {ipc}, eval {runs} x {epochs} ep"
                                  + (" (it. 0 = random real)" if xs[0] == 0 else ""))
        if ipc in PUBLISHED_DM:
            ax.axhline(PUBLISHED_DM[ipc], color=color, ls="--", lw=1,
                       label=f"published DM, IPC {ipc} (20k iterations)")
    ax.set_xlabel("DM iterations")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("FashionMNIST, ConvNet-3")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_with(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    a = _args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from splatdd import distill as D
    from splatdd import registry
    from splatdd.data import load_dataset
    from splatdd.evaluate import evaluate

    progress = not a.no_progress
    json_path = Path(a.results)
    results = _load_results(json_path)
    import platform
    import os
    results["environment"] = {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
                   f"{torch.get_num_threads()} torch threads, no GPU",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "note": results.get("environment", {}).get("note", "")}
    if a.note is not None:
        results["environment"]["note"] = a.note
    train, test = load_dataset("fashion_mnist", a.data_root, progress=progress)
    pixel = registry.get_parameterization("pixel")
    dm = registry.get_algorithm("dm")
    ek = _eval_key(a)

    for ipc in a.ipc:
        spec = train.spec
        init_gen = torch.Generator().manual_seed(a.seed)
        real_imgs = torch.cat([train.sample(c, ipc, init_gen) for c in range(spec.num_classes)])
        real_labels = torch.arange(spec.num_classes).repeat_interleave(ipc)

        def run_eval(images, labels):
            t = time.perf_counter()
            r = evaluate(images, labels, test, model=a.eval_model, runs=a.eval_runs,
                         epochs=a.eval_epochs, seed=a.seed, progress=progress)
            return r, time.perf_counter() - t

        if 0 in a.points and _find(results, ipc=ipc, method="random_real", eval=ek) is None:
            print(f"[ipc {ipc}] evaluating random real images", flush=True)
            r, secs = run_eval(real_imgs, real_labels)
            results["entries"].append({"ipc": ipc, "method": "random_real", "iterations": 0,
                                       "mean": r.mean, "std": r.std, "accs": list(r.accs),
                                       "eval": ek, "eval_seconds": secs})
            _write_outputs(results, json_path)
            print(f"[ipc {ipc}] random real: {r.mean:.2f} +- {r.std:.2f}", flush=True)

        for target in [p for p in a.points if p > 0]:
            match = dict(ipc=ipc, method="pixel_dm", iterations=target, batch_real=a.batch_real,
                         eval=ek)
            if _find(results, **match) is not None:
                continue
            param = pixel.build(spec, ipc)
            param.init_from_real(real_imgs, real_labels)
            algo = dm(train, ipc=ipc, generator=torch.Generator().manual_seed(a.seed),
                      batch_real=a.batch_real)
            out = Path(a.work_dir) / f"ipc{ipc}_br{a.batch_real}_seed{a.seed}"
            t = time.perf_counter()
            D.distill(param, algo, iterations=target, out_dir=out, checkpoint_every=10,
                      resume=True, seed=a.seed, progress=progress)
            dsecs = time.perf_counter() - t
            hist = json.loads((out / "history.json").read_text())
            print(f"[ipc {ipc}] distilled to iteration {target}; evaluating", flush=True)
            with torch.no_grad():
                images = param.decode().detach()
            r, secs = run_eval(images, param.labels)
            results["entries"].append({**match, "mean": r.mean, "std": r.std,
                                       "accs": list(r.accs), "eval_seconds": secs,
                                       "distill_seconds": dsecs,
                                       "final_loss": hist["losses"][-1] if hist["losses"] else None,
                                       "file": str(out / D.DISTILLED_NAME)})
            _write_outputs(results, json_path)
            print(f"[ipc {ipc}] pixel+DM @ {target}: {r.mean:.2f} +- {r.std:.2f}", flush=True)
    _write_outputs(results, json_path)
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
