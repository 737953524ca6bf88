"""FashionMNIST table: {pixel, gaussian, siren} x {dm, dc, tm} at equal storage, before and after
distillation, through ``splatdd.experiment.run``.

Every cell is an :class:`~splatdd.experiment.ExperimentConfig` (the settings below, written into
the cell's run folder as ``config.toml``) run by :func:`splatdd.experiment.run`, which builds the
parameterization for the budget of ``ipc`` fp32 images per class with the plugin's own defaults
(gaussian GPC 11 at IPC 1, siren's DPC), initialises it from random real images, saves that set
(``initial.safetensors``), distils and saves the result. Both sets are then evaluated with the
papers' hard-label protocol (ConvNet-3, SGD, DSA; ``paper`` in :mod:`splatdd.protocols`) at a
reduced length, so the table separates what distillation adds from what the parameterization's
extra images add:

* ``before``: the initialised set (random real images, or fits of them), no distillation step;
* ``after``: the distilled set;
* equal epochs (``--eval-epochs``), and, where a cell's image count differs from pixels', equal
  SGD steps (``--eval-steps``: gaussian's 110 images at IPC 1 fit one batch of 256 as pixels' 10
  do, so the two coincide there; at IPC 10 they do not). Each row says which.

Each cell runs for every seed in ``--seeds`` (default 0 and 1) and reports the mean +- std over
seeds x evaluation nets. TM cells use expert trajectories trained with the tm plugin on a
class-balanced subset (``--buffer-per-class``); the distillation itself is plain ``run(config)``.

Outputs (rewritten after every cell; the script resumes, skipping measured cells): ``--results``
(``benchmarks/results/fmnist_table.json``), its ``.md`` report (text generated from the data) and
``.png`` (before/after bars with the published pixel rows). ``--best-eval`` evaluates the best
IPC-1 distilled file with the papers' full protocol (3 nets x 1000 epochs) into
``fmnist_best_eval.json``. The published rows are those of docs/references.md. Example (the
committed run)::

    python benchmarks/fmnist_table.py --ipc 1 --jobs 2
    python benchmarks/fmnist_table.py --best-eval

The papers' settings on a GPU (hours)::

    python benchmarks/fmnist_table.py --device cuda --jobs 1 --dm-iterations 20000 \
        --dm-batch-real 256 --dc-iterations 1000 --tm-iterations 5000 --syn-steps 50 \
        --batch-syn 1000 --experts 100 --buffer-epochs 50 --buffer-per-class 6000 \
        --eval-epochs 1000
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
PARAMS = ("pixel", "gaussian", "siren")
ALGOS = ("dm", "dc", "tm")
#: docs/references.md, "FashionMNIST, ConvNet-3, test accuracy (%)"
PUBLISHED = {
    "dc": ("DC (pixels)", {1: 70.5, 10: 82.3}, "DC, ICLR 2021"),
    "dm": ("DM (pixels)", {1: 71.5, 10: 83.6}, "DM, WACV 2023 (unverified)"),
    "tm": ("MTT (pixels)", {1: 75.1, 10: 87.2}, "as re-run in FRePo (unverified)"),
}
PUBLISHED_EQUAL_STORAGE = {"FreD + TM": ({1: 84.6, 10: 89.1}, "FreD, NeurIPS 2023"),
                           "IDC": ({1: 81.0, 10: 86.0}, "IDC, ICML 2022")}
REFERENCES = "docs/references.md, 'FashionMNIST, ConvNet-3, test accuracy (%)'"


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cells", default="table",
                    help="comma-separated PARAM-ALGO cells (e.g. pixel-dm,gaussian-tm) or 'table'")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1])
    ap.add_argument("--seeds", default="0,1", help="distillation seeds, comma-separated")
    ap.add_argument("--dm-iterations", type=int, default=100)
    ap.add_argument("--dc-iterations", type=int, default=20)
    ap.add_argument("--tm-iterations", type=int, default=20)
    ap.add_argument("--dm-batch-real", type=int, default=64)
    ap.add_argument("--dc-batch-real", type=int, default=32)
    ap.add_argument("--dc-inner-loop", type=int, default=None,
                    help="DC inner loop; default: the paper's by IPC")
    ap.add_argument("--syn-steps", type=int, default=10, help="TM student steps")
    ap.add_argument("--batch-syn", type=int, default=10,
                    help="TM student minibatch (capped at the number of synthetic images)")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--buffer-epochs", type=int, default=3, help="epochs per expert")
    ap.add_argument("--buffer-per-class", type=int, default=500,
                    help="class-balanced training subset for the experts (images per class)")
    ap.add_argument("--eval-runs", type=int, default=3)
    ap.add_argument("--eval-epochs", type=int, default=150)
    ap.add_argument("--eval-steps", type=int, default=150,
                    help="SGD steps (batch 256) of the equal-step evaluation")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--results", default=str(HERE / "results" / "fmnist_table.json"))
    ap.add_argument("--work-dir", default="runs/fmnist_table")
    ap.add_argument("--report-only", action="store_true", help="rewrite md/png from the JSON")
    ap.add_argument("--best-eval", action="store_true",
                    help="evaluate the best IPC-1 cell's distilled file with 3 nets x 1000 epochs")
    return ap.parse_args(argv)


# ---- cells ------------------------------------------------------------------------------------
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _buffer_settings(a: argparse.Namespace) -> dict[str, Any]:
    return {"experts": a.experts, "epochs": a.buffer_epochs, "per_class": a.buffer_per_class,
            "lr": 0.01, "batch": 256, "dsa": True, "seed": 0}


#: The table's reduced settings per algorithm: (iterations, algorithm options) from the args.
REDUCED: dict[str, Callable[[argparse.Namespace, str | None], tuple[int, dict[str, Any]]]] = {
    "dm": lambda a, _: (a.dm_iterations, {"batch_real": a.dm_batch_real}),
    "dc": lambda a, _: (a.dc_iterations, {"batch_real": a.dc_batch_real, **(
        {} if a.dc_inner_loop is None else {"inner_loop": a.dc_inner_loop})}),
    "tm": lambda a, buf: (a.tm_iterations, {"buffer_dir": buf or "", "syn_steps": a.syn_steps,
                                            "expert_epochs": 2, "batch_syn": a.batch_syn}),
}


def cell_config(a: argparse.Namespace, ipc: int, param: str, algo: str, seed: int,
                buffer_dir: str | None = None):
    """The experiment of one cell: the plugins' own defaults, the reduced settings of ``a``."""
    from splatdd.experiment import ExperimentConfig
    iters, algo_opts = REDUCED[algo](a, buffer_dir)
    cfg = ExperimentConfig(parameterization=param, algorithm=algo, ipc=ipc, iterations=iters,
                           seed=seed, algo_options=algo_opts, device=a.device,
                           checkpoint_every=10, name=f"fmnist-table-{param}-{algo}-ipc{ipc}",
                           source="benchmarks/fmnist_table.py reduced settings")
    cfg.dataset.root = a.data_root
    cfg.eval.runs = 0                      # evaluated below, before and after, two ways
    return cfg


def _identity(a: argparse.Namespace, ipc: int, param: str, algo: str, seed: int) -> dict:
    cfg = cell_config(a, ipc, param, algo, seed).to_dict()
    for k in ("out", "device", "name", "source", "checkpoint_every"):
        cfg.pop(k, None)
    cfg.get("dataset", {}).pop("root", None)
    return {"config": cfg, "buffer": _buffer_settings(a) if algo == "tm" else None}


def _eval_settings(a: argparse.Namespace) -> dict[str, Any]:
    return {"runs": a.eval_runs, "epochs": a.eval_epochs, "steps": a.eval_steps}


def _tasks(a: argparse.Namespace) -> list[dict[str, Any]]:
    sel = {s.strip() for s in a.cells.split(",") if s.strip()}
    cells = [(p, al) for al in ALGOS for p in PARAMS if "table" in sel or f"{p}-{al}" in sel]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    order = {"dm": 0, "tm": 1, "dc": 2}
    tasks = [{"ipc": ipc, "param": p, "algo": al, "seed": s}
             for ipc in a.ipc for s in seeds for p, al in cells]
    tasks.sort(key=lambda t: (t["ipc"], t["seed"], order[t["algo"]]))
    return tasks


# ---- worker -------------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _init_worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    _W["args"] = a


def _data():
    if "train" not in _W:
        from splatdd.data import load_dataset
        a = _W["args"]
        _W["train"], _W["test"] = load_dataset("fashion_mnist", a.data_root, progress=False,
                                               device=a.device)
    return _W["train"], _W["test"]


def _ensure_buffer(a: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Experts on a class-balanced subset (file-locked: one worker trains, the others wait)."""
    from splatdd.io_utils import atomic_write_json
    from splatdd.plugin_api import RealData
    bs = _buffer_settings(a)
    d = Path(a.work_dir) / f"buffer_{_hash(bs)}"
    d.mkdir(parents=True, exist_ok=True)
    info_path = d / "bench_info.json"
    with open(d / ".bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if info_path.is_file():
            return d, json.loads(info_path.read_text())
        train, _ = _data()
        g = torch.Generator().manual_seed(bs["seed"] + 12345)
        idx = torch.cat([train.indices_of(c)[torch.randperm(len(train.indices_of(c)),
                                                            generator=g)[:bs["per_class"]]]
                         for c in range(train.spec.num_classes)])
        sub = RealData(spec=train.spec, images=train.images[idx], labels=train.labels[idx])
        from splatdd_tm import train_experts      # the experts of the TM cells
        t0 = time.perf_counter()
        train_experts(sub, d, experts=bs["experts"], epochs=bs["epochs"], lr=bs["lr"],
                      batch_size=bs["batch"], dsa=bs["dsa"], seed=bs["seed"], progress=False)
        info = {"seconds": time.perf_counter() - t0, "subset_images": int(len(idx)), **bs}
        atomic_write_json(info_path, info)
        return d, info


def _eval_sets(a, files: dict[str, Path], n_images: int, pixel_images: int, learned_lr):
    """Rows for each stored set ('before', 'after') under equal epochs and, where the image count
    differs from pixels', equal SGD steps."""
    from splatdd import distilled_file
    from splatdd.experiment.run import evaluate_rows
    from splatdd.protocols import PaperProtocol
    _, test = _data()
    per_epoch = -(-n_images // 256)
    step_epochs = max(2, round(a.eval_steps / per_epoch))
    modes = [("equal epochs", a.eval_epochs)]
    if -(-pixel_images // 256) != per_epoch:
        modes.append(("equal steps", step_epochs))
    rows: dict[str, list[dict[str, Any]]] = {}
    for stage, path in files.items():
        d = distilled_file.load(path, device=a.device)
        for mode, epochs in modes:
            lr = learned_lr if stage == "after" else None

            def measure() -> dict[str, Any]:
                row, = evaluate_rows(PaperProtocol(epochs=epochs), d.images(), d.labels, test,
                                     models=["ConvNet"], runs=a.eval_runs, seed=0,
                                     learned_lr=lr, progress=False, log=lambda _: None)
                return row
            key = {"file": _file_hash(path), "epochs": epochs, "runs": a.eval_runs, "lr": lr}
            row = _cached(Path(a.work_dir) / "eval_cache.json", key, measure)
            rows.setdefault(stage, []).append({**row, "mode": mode,
                                               "sgd_steps": epochs * per_epoch})
    return rows


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _cached(path: Path, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict:
    """``measure()`` once per ``key`` (e.g. the same initialised set in its dm, dc and tm cells),
    remembered in ``path``; concurrent workers wait on a lock instead of measuring twice."""
    from splatdd.io_utils import atomic_write_json
    k = _hash(key)
    path.parent.mkdir(parents=True, exist_ok=True)

    def read() -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {}
    with open(path.parent / f".eval_{k}.lock", "w") as key_lock:   # one measurement per key
        fcntl.flock(key_lock, fcntl.LOCK_EX)
        if k in read():
            return read()[k]
        row = measure()
        with open(path.with_suffix(".lock"), "w") as lock:           # short: merge and write
            fcntl.flock(lock, fcntl.LOCK_EX)
            cache = read()
            cache[k] = row
            atomic_write_json(path, cache)
        return row


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    from splatdd.experiment import run
    a = _W["args"]
    t_start = time.time()
    entry: dict[str, Any] = {**task, "identity": _identity(a, **task),
                             "eval_settings": _eval_settings(a)}
    try:
        buffer_dir = None
        if task["algo"] == "tm":
            bdir, entry["buffer"] = _ensure_buffer(a)
            buffer_dir = str(bdir)
        cfg = cell_config(a, **task, buffer_dir=buffer_dir)
        cfg.out = str(Path(a.work_dir) / f"{cfg.name}-seed{task['seed']}-"
                      f"{_hash(entry['identity'])}")
        from splatdd.distill import has_checkpoint
        res = run(cfg, resume=has_checkpoint(cfg.out), progress=False, log=lambda _: None)
        from splatdd import distilled_file
        d = distilled_file.load(res.distilled_file)
        n = len(d.labels)
        pixel_n = task["ipc"] * d.spec.num_classes
        entry.update(out=cfg.out, num_images=n, bytes=res.budget["used"],
                     budget_bytes=res.budget["allowed"], init=res.init,
                     distill_seconds=res.distill_seconds, final_loss=res.final_loss,
                     learned_lr=res.learned_lr, param_config=d.meta.get("param_config"))
        entry["rows"] = _eval_sets(a, {"before": res.out_dir / "initial.safetensors",
                                       "after": res.distilled_file}, n, pixel_n, res.learned_lr)
    except Exception as e:  # noqa: BLE001 - recorded, the table goes on
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc()[-3000:]
    entry["wall_seconds"] = time.time() - t_start
    entry["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    entry["threads"] = torch.get_num_threads()
    return entry


# ---- results file -------------------------------------------------------------------------------
def _machine(a: argparse.Namespace | None = None) -> str:
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path(
        "/proc/loadavg").exists() else "?"
    dev = getattr(a, "device", "cpu") if a else "cpu"
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, device "
            f"{dev}; torch {torch.__version__}; load average at write {load}")


def _update(json_path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Locked read-change-write of the results JSON (parallel invocations merge their cells)."""
    from splatdd.io_utils import atomic_write_json
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(json_path.read_text()) if json_path.is_file() else {}
        results.setdefault("benchmark", "fmnist_table")
        results.setdefault("cells", [])
        change(results)
        atomic_write_json(json_path, results)
        write_report(results, json_path)
    return results


def _same(e: dict[str, Any], task: dict[str, Any], a: argparse.Namespace) -> bool:
    return (all(e.get(k) == task[k] for k in ("ipc", "param", "algo", "seed"))
            and e.get("identity") == _identity(a, **task)
            and e.get("eval_settings") == _eval_settings(a) and "error" not in e)


def _merge(json_path: Path, entry: dict[str, Any], a: argparse.Namespace) -> None:
    def change(results: dict[str, Any]) -> None:
        task = {k: entry[k] for k in ("ipc", "param", "algo", "seed")}
        results["cells"] = [e for e in results["cells"]
                            if not all(e.get(k) == task[k] for k in task)] + [entry]
        results["machine"] = _machine(a)
    _update(json_path, change)


# ---- report -----------------------------------------------------------------------------------
def _pooled(entries: list[dict[str, Any]], stage: str, mode: str) -> tuple[float, float, int] | None:
    accs = [acc for e in entries for r in e.get("rows", {}).get(stage, []) if r["mode"] == mode
            for acc in r["accs"]]
    if not accs:
        return None
    return statistics.fmean(accs), statistics.pstdev(accs), len(accs)


def _cells(results: dict[str, Any], ipc: int, param: str, algo: str) -> list[dict[str, Any]]:
    return [e for e in results.get("cells", []) if e.get("ipc") == ipc and e.get("param") == param
            and e.get("algo") == algo and "rows" in e]


def _fmt(v: tuple[float, float, int] | None) -> str:
    return "-" if v is None else f"{v[0]:.2f} +- {v[1]:.2f}"


def summary(results: dict[str, Any], ipc: int, mode: str = "equal epochs") -> dict:
    """``{(param, algo): {"before": (mean, std, n), "after": ..., "seeds": [...]}}``."""
    out = {}
    for p in PARAMS:
        for al in ALGOS:
            es = _cells(results, ipc, p, al)
            if es:
                m = mode if any(r["mode"] == mode for e in es for r in e["rows"]["after"]) \
                    else "equal epochs"
                out[(p, al)] = {"before": _pooled(es, "before", m), "after": _pooled(es, "after", m),
                                "seeds": sorted(e["seed"] for e in es), "mode": m,
                                "images": es[0].get("num_images")}
    return out


def report_text(results: dict[str, Any]) -> str:
    ipcs = sorted({e["ipc"] for e in results.get("cells", []) if "rows" in e})
    lines = ["# FashionMNIST: {pixel, gaussian, siren} x {dm, dc, tm} at equal storage", "",
             "Generated by `benchmarks/fmnist_table.py` from `fmnist_table.json`; every cell is a "
             "`splatdd.experiment.run(config)` (its `config.toml` is in the cell's run folder). "
             "Accuracy: ConvNet-3, the papers' hard-label protocol (`paper`: SGD, lr 0.01 or "
             "the learned lr, x0.1 at half, DSA) at reduced length, mean +- std over seeds x "
             "evaluation nets. *before*: the initialised set (no distillation step); *after*: "
             "the distilled set.", "", f"Machine: {results.get('machine', '?')}", ""]
    for ipc in ipcs:
        s_ep = summary(results, ipc, "equal epochs")
        s_st = summary(results, ipc, "equal steps")
        any_e = next(iter(_cells(results, ipc, *next(iter(s_ep)))), {})
        ev = any_e.get("eval_settings", {})
        lines += [f"## IPC {ipc}", "",
                  f"Evaluation: {ev.get('runs')} nets per seed; equal epochs = {ev.get('epochs')} "
                  f"epochs; equal steps = about {ev.get('steps')} SGD steps of batch 256 (only "
                  f"where a set's image count needs more batches per epoch than pixels').", "",
                  "| parameterization | images | " + " | ".join(
                      f"{al} before | {al} after | {al} gain" for al in ALGOS) + " | seeds |",
                  "|---|---|" + "---|---|---|" * len(ALGOS) + "---|"]
        for p in PARAMS:
            cells = [s_ep.get((p, al)) for al in ALGOS]
            if not any(cells):
                continue
            imgs = next((c["images"] for c in cells if c), "-")
            row = [p, str(imgs)]
            for c in cells:
                if not c:
                    row += ["-", "-", "-"]
                    continue
                gain = (c["after"][0] - c["before"][0]) if c["after"] and c["before"] else None
                row += [_fmt(c["before"]), _fmt(c["after"]),
                        "-" if gain is None else f"{gain:+.2f}"]
            seeds = "; ".join(f"{al} {','.join(map(str, c['seeds']))}"
                              for al, c in zip(ALGOS, cells) if c)
            lines.append("| " + " | ".join(row + [seeds]) + " |")
        steps_rows = [(k, v) for k, v in s_st.items() if v["mode"] == "equal steps"]
        if steps_rows:
            lines += ["", "Equal SGD steps (cells whose sets need more batches per epoch):", "",
                      "| cell | before | after |", "|---|---|---|"]
            lines += [f"| {p}+{al} | {_fmt(v['before'])} | {_fmt(v['after'])} |"
                      for (p, al), v in steps_rows]
        lines += ["", *_findings(s_ep, ipc), ""]
        lines += ["Published (pixels, the papers' full settings; " + REFERENCES + "): " + "; ".join(
            f"{name} {vals[ipc]}" for name, vals, _ in PUBLISHED.values() if ipc in vals)
            + "; equal storage: " + "; ".join(f"{k} {v[0][ipc]}" for k, v in
                                              PUBLISHED_EQUAL_STORAGE.items() if ipc in v[0]), ""]
    lines += ["## Settings (reduced; the papers' are in the script's docstring)", ""]
    seen = set()
    for e in results.get("cells", []):
        key = (e.get("algo"), json.dumps(e.get("identity", {}).get("config", {}).get(
            "algo_options"), sort_keys=True), e.get("identity", {}).get("config", {}).get(
            "iterations"))
        if key in seen or "identity" not in e:
            continue
        seen.add(key)
        c = e["identity"]["config"]
        lines.append(f"- {e['algo']}: {c.get('iterations')} iterations, options "
                     f"{c.get('algo_options')}" + (f"; experts {e['identity']['buffer']}"
                                                   if e["identity"].get("buffer") else ""))
    errors = [e for e in results.get("cells", []) if "error" in e]
    if errors:
        lines += ["", "## Cells that failed", ""] + [
            f"- IPC {e['ipc']} {e['param']}+{e['algo']} seed {e['seed']}: {e['error']}"
            for e in errors]
    return "\n".join(lines) + "\n"


def _findings(s: dict, ipc: int) -> list[str]:
    """Sentences computed from the table (no fixed text that holds for one IPC only)."""
    out = []
    diffs = {al: s[("gaussian", al)]["after"][0] - s[("pixel", al)]["after"][0]
             for al in ALGOS if s.get(("gaussian", al), {}).get("after")
             and s.get(("pixel", al), {}).get("after")}
    if diffs:
        wins = [al for al, d in diffs.items() if d > 0]
        out.append(f"- After distillation, gaussian is above pixel at equal storage for "
                   f"{len(wins)} of {len(diffs)} algorithms at IPC {ipc} ("
                   + ", ".join(f"{al} {d:+.2f}" for al, d in diffs.items()) + " points).")
    gains = {f"{p}+{al}": v["after"][0] - v["before"][0] for (p, al), v in s.items()
             if v["after"] and v["before"]}
    if gains:
        best = max(gains, key=gains.get)
        worst = min(gains, key=gains.get)
        out.append(f"- Distillation's own gain (after - before) ranges from {gains[worst]:+.2f} "
                   f"({worst}) to {gains[best]:+.2f} ({best}).")
    before = {p: s[(p, "dm")]["before"][0] for p in PARAMS if s.get((p, "dm"), {}).get("before")}
    if "pixel" in before and "gaussian" in before:
        out.append(f"- Before any distillation step, gaussian's set is "
                   f"{before['gaussian'] - before['pixel']:+.2f} points from pixel's "
                   f"(more, smaller-detail images at the same storage).")
    if s:
        (bp, ba), bv = max(((k, v) for k, v in s.items() if v["after"]),
                           key=lambda kv: kv[1]["after"][0])
        out.append(f"- Best cell: {bp}+{ba} {_fmt(bv['after'])} %.")
    return out


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splatdd.io_utils import atomic_save_with
    ipcs = sorted({e["ipc"] for e in results.get("cells", []) if "rows" in e})
    if not ipcs:
        return
    fig, axes = plt.subplots(1, len(ipcs), figsize=(7 * len(ipcs), 4), squeeze=False)
    colors = {"pixel": "#777777", "gaussian": "#1f77b4", "siren": "#ff7f0e"}
    for ax, ipc in zip(axes[0], ipcs):
        s = summary(results, ipc)
        for j, al in enumerate(ALGOS):
            for i, p in enumerate(PARAMS):
                v = s.get((p, al))
                if not v or not v["after"]:
                    continue
                x = j + (i - 1) * 0.27
                ax.bar(x, v["after"][0], 0.25, yerr=v["after"][1], color=colors[p],
                       label=p if j == 0 else None)
                if v["before"]:
                    ax.plot([x - 0.12, x + 0.12], [v["before"][0]] * 2, color="black", lw=2,
                            label="before distillation" if (i, j) == (0, 0) else None)
            pub = PUBLISHED[al][1].get(ipc)
            if pub:
                ax.plot([j - 0.45, j + 0.45], [pub, pub], ls="--", color="red",
                        label="published (pixels)" if j == 0 else None)
        ax.set_xticks(range(len(ALGOS)), ALGOS)
        ax.set_ylim(40, 90)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"FashionMNIST IPC {ipc}, equal storage (reduced settings)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_save_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def write_report(results: dict[str, Any], json_path: Path) -> None:
    from splatdd.io_utils import atomic_write_text
    atomic_write_text(json_path.with_suffix(".md"), report_text(results))
    _plot(results, json_path.with_suffix(".png"))


# ---- best cell with the papers' full evaluation -------------------------------------------------
def best_eval(a: argparse.Namespace) -> dict[str, Any]:
    """The best IPC-1 cell's distilled file (highest after-accuracy, first seed) evaluated with 3
    nets x 1000 epochs, written to fmnist_best_eval.json beside the table."""
    from splatdd import distilled_file
    from splatdd.experiment.run import evaluate_rows
    from splatdd.io_utils import atomic_write_json
    from splatdd.protocols import PaperProtocol
    json_path = Path(a.results)
    results = json.loads(json_path.read_text())
    s = summary(results, 1)
    (p, al), v = max(((k, v) for k, v in s.items() if v["after"]), key=lambda kv: kv[1]["after"][0])
    entry = min(_cells(results, 1, p, al), key=lambda e: e["seed"])
    _init_worker(a)
    _, test = _data()
    d = distilled_file.load(Path(entry["out"]) / "distilled.safetensors", device=a.device)
    t0 = time.perf_counter()
    row, = evaluate_rows(PaperProtocol(epochs=1000), d.images(), d.labels, test,
                         models=["ConvNet"], runs=3, seed=0, learned_lr=d.learned_lr,
                         progress=True)
    out = {"benchmark": "fmnist_best_eval", "cell": {"ipc": 1, "param": p, "algo": al,
                                                      "seed": entry["seed"], "out": entry["out"]},
           "table_accuracy": {"this_seed_after": entry["rows"]["after"],
                              "seeds_at_selection": sorted(e["seed"] for e in _cells(results, 1, p, al)),
                              "mean_after_at_selection": v["after"],
                              "eval_settings": entry["eval_settings"]},
           "protocol": "paper: 3 ConvNet-3 nets x 1000 epochs (the papers' evaluation)",
           "result": row, "seconds": time.perf_counter() - t0, "machine": _machine(a),
           "command": "python benchmarks/fmnist_table.py --best-eval"}
    atomic_write_json(json_path.parent / "fmnist_best_eval.json", out)
    print(f"best IPC-1 cell {p}+{al}: {row['mean']:.2f} +- {row['std']:.2f} % (3 x 1000 epochs)")
    return out


def main(argv=None) -> int:
    a = _args(argv)
    json_path = Path(a.results)
    if a.report_only:
        _update(json_path, lambda r: None)
        return 0
    if a.best_eval:
        best_eval(a)
        return 0
    done = json.loads(json_path.read_text()) if json_path.is_file() else {"cells": []}
    todo = [t for t in _tasks(a) if not any(_same(e, t, a) for e in done.get("cells", []))]
    print(f"{len(todo)} cells to run ({len(_tasks(a)) - len(todo)} already measured)", flush=True)
    if not todo:
        _update(json_path, lambda r: None)
        return 0
    if a.jobs <= 1:
        _init_worker(a)
        for t in todo:
            e = run_task(t)
            _merge(json_path, e, a)
            print(_line(e), flush=True)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(a.jobs, initializer=_init_worker, initargs=(a,)) as pool:
            for e in pool.imap_unordered(run_task, todo):
                _merge(json_path, e, a)
                print(_line(e), flush=True)
    return 0


def _line(e: dict[str, Any]) -> str:
    head = f"IPC {e['ipc']} {e['param']}+{e['algo']} seed {e['seed']}"
    if "error" in e:
        return f"{head}: ERROR {e['error']}"
    b, af = e["rows"]["before"][0], e["rows"]["after"][0]
    return (f"{head}: before {b['mean']:.2f}, after {af['mean']:.2f} ({e['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
