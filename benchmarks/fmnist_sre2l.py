"""FashionMNIST with SRe2L (squeeze, recover, relabel): pixel, gaussian and idc at equal storage,
evaluated with the soft-label protocol.

1. Squeeze: a BatchNorm ConvNet-3 teacher (``splatdd_sre2l.teacher.train_teacher``, resumable);
   its test accuracy is the first line of the report.
2. Recover + relabel, per cell (IPC 1 and 10 x {pixel, gaussian, idc}): one
   :func:`splatdd.experiment.run` with ``algorithm = "sre2l"``, every parameterization built by its
   own plugin for the storage of ``ipc`` fp32 images per class, initialised from random real images,
   and evaluated with ``eval.protocol = "soft-label"`` before and after distillation.
3. Next to it, the best cells of the hard-label table (``benchmarks/results/fmnist_table.json``),
   labelled as a different protocol: soft-label and hard-label accuracies are not comparable.

Outputs: ``benchmarks/results/fmnist_sre2l.json`` (teacher, every cell with its settings; the script
skips cells already measured with the same settings, and the runs resume from their checkpoints
under ``--work-dir``) and ``fmnist_sre2l.md``, rewritten after every cell. The committed run::

    heavy python benchmarks/fmnist_sre2l.py --threads 1

On a GPU, closer to the papers (SRe2L: 1k-4k recover iterations, students for 300+ epochs)::

    python benchmarks/fmnist_sre2l.py --device cuda --teacher-width 128 --teacher-epochs 30 \
        --iterations 1000 --eval-steps 3000 --eval-width 128 --eval-runs 3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TABLE_JSON = RESULTS / "fmnist_table_v1.json"   # the earlier pipeline's cells
PARAMS = ("pixel", "gaussian", "idc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work-dir", default="runs/fmnist_sre2l")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--params", nargs="+", default=list(PARAMS))
    ap.add_argument("--teacher-width", type=int, default=32)
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--teacher-lr", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=300, help="recover iterations per cell")
    ap.add_argument("--batches-per-step", type=int, default=10,
                    help="sre2l batches (one image per class each) per step")
    ap.add_argument("--r-bn", type=float, default=0.01)
    ap.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0])
    ap.add_argument("--idc-factor", type=int, default=2)
    ap.add_argument("--init-steps", type=int, default=300, help="gaussian init fit steps")
    ap.add_argument("--gaussian-lr-cholesky", type=float, default=None,
                    help="gaussian lr_cholesky (GSDD's reference code steps the Cholesky factor in "
                         "pixels: its Adam 1e-2 is 1e-2 * 2 / W here, 7.14e-4 at 28 px)")
    ap.add_argument("--gaussian-gpc", type=int, default=None,
                    help="gaussian images per class (default: the plugin's default_gpc, 11 at "
                         "IPC 1 and 36 at IPC 10 on FashionMNIST)")
    ap.add_argument("--eval-steps", type=int, default=200, help="student AdamW steps")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--eval-width", type=int, default=32, help="student ConvNet width")
    ap.add_argument("--eval-runs", type=int, default=2,
                    help="students per cell (mean +- std; the IPC-10 cells of the committed run "
                         "used 1)")
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--validate", action="store_true",
                    help="instead of the table: recover the IPC-1 gaussian cell's initialised set "
                         "with each of VALIDATION_SETTINGS and evaluate on a validation split of "
                         "the TRAINING set (how the gaussian recover setting was chosen, never on "
                         "the test set)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and exit")
    ap.add_argument("--merge", nargs="*", default=[], metavar="PREFIX",
                    help="with --report-only: add the cells of other results files (a run that "
                         "wrote to its own --results while another was running)")
    ap.add_argument("--results", default=str(RESULTS / "fmnist_sre2l"),
                    help="results path without extension (.json and .md are written)")
    return ap.parse_args(argv)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _load(prefix: str) -> dict[str, Any]:
    path = Path(prefix + ".json")
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": "fmnist_sre2l", "teacher": None, "cells": []}


def _machine() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    return (f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"load average {' '.join(load)}")


def _save(data: dict[str, Any], prefix: str | Path) -> None:
    from splatdd.io_utils import atomic_write_json, atomic_write_text
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(f"{prefix}.json"), data)
    atomic_write_text(Path(f"{prefix}.md"), report(data))


LOSS_TAIL = 50


def loss_tail(out_dir: str | Path) -> float | None:
    """Mean recover loss (CE + r_bn * BN) over the last :data:`LOSS_TAIL` steps of a run folder's
    ``history.json`` (one step's loss is noisy: every step draws its own crops)."""
    path = Path(out_dir) / "history.json"
    if not path.is_file():
        return None
    losses = json.loads(path.read_text()).get("losses") or []
    tail = losses[-LOSS_TAIL:]
    return sum(tail) / len(tail) if tail else None


def _backfill(data: dict[str, Any]) -> None:
    """Cells measured before the loss tail was recorded get it from their run folder."""
    for c in data.get("cells", []):
        if c.get("loss_tail") is None:
            c["loss_tail"] = loss_tail(c["out_dir"])
        if "recover_optimizer" not in c["settings"]:
            o = dict(EARLIER_RECOVER[c["param"]])
            chol = c["settings"]["param_options"].get("lr_cholesky")
            if chol is not None:
                o["lr_min"] = float(chol)
            c["recover_optimizer_backfilled"] = o
    data.pop("notes", None)      # observations are generated from the cells (observations())


# ---- the hard-label reference -------------------------------------------------------------------
def hard_label_best() -> dict[int, dict[str, Any]]:
    """The best measured cell per IPC of the hard-label table (its own settings)."""
    if not TABLE_JSON.is_file():
        return {}
    best: dict[int, dict[str, Any]] = {}
    for e in json.loads(TABLE_JSON.read_text()).get("entries", []):
        if e.get("mean") is None or e.get("group") != "table":
            continue
        ipc = int(e["ipc"])
        if ipc not in best or e["mean"] > best[ipc]["mean"]:
            best[ipc] = e
    return best


# ---- the report ---------------------------------------------------------------------------------
def _fmt(row: dict[str, Any] | None) -> str:
    if not row:
        return "--"
    return f"{row['mean']:.2f} +- {row['std']:.2f}" if len(row.get("accs", [])) > 1 \
        else f"{row['mean']:.2f}"


def _label(c: dict[str, Any]) -> str:
    """The parameterization with its non-default options, e.g. ``gaussian (gpc 22)``."""
    opts = {k: v for k, v in c["settings"]["param_options"].items() if k != "factor"}
    return c["param"] + (" (" + ", ".join(f"{k} {v:g}" for k, v in opts.items()) + ")"
                         if opts else "")


def _significance(a: dict[str, Any], b: dict[str, Any], name: str) -> str:
    """The gap between two cells' means in units of its standard error over the students
    (``sqrt(sd_a^2/n_a + sd_b^2/n_b)``, sample sd): how far the gap stands out of the students'
    noise (about 2 or more for a clear gap)."""
    import statistics
    na, nb = len(a["accs"]), len(b["accs"])
    se = (statistics.variance(a["accs"]) / na + statistics.variance(b["accs"]) / nb) ** 0.5
    gap = a["mean"] - b["mean"]
    z = gap / se if se > 0 else float("inf")
    verdict = ("clear" if abs(z) >= 2 else "within the students' noise")
    return f"gap to {name} {gap:+.2f} = {z:+.1f} standard errors ({verdict})"


def _opt(c: dict[str, Any]) -> dict[str, Any] | None:
    """The recover optimiser of a cell: recorded, or (cells from before it was recorded)
    :data:`EARLIER_RECOVER`."""
    return c["settings"].get("recover_optimizer") or c.get("recover_optimizer_backfilled")


def observations(cells: list[dict[str, Any]], current: set[str] | None = None) -> list[str]:
    """Sentences about the measured cells, each computed from them: per group of equal settings
    (current or earlier, IPC, iterations, eval runs) the ranking after recovery, what recovery
    changed, the student's spread, and the recover loss reached."""
    out: list[str] = []
    current = current or set()

    def gkey(c: dict[str, Any]) -> tuple[bool, int, int, int]:
        return (c["key"] not in current, c["ipc"], c["settings"]["iterations"],
                c["settings"]["eval"]["runs"])

    for earlier, ipc, iters, runs in sorted({gkey(c) for c in cells}):
        g = [c for c in cells if gkey(c) == (earlier, ipc, iters, runs) and c.get("after")]
        if not g:
            continue
        head = (f"{'Earlier' if earlier else 'Current'}: IPC {ipc}, {iters} iterations, {runs} "
                f"student(s) per cell")
        ranked = sorted(g, key=lambda c: -c["after"][0]["mean"])
        out.append(f"{head}: after recovery "
                   + " > ".join(f"{_label(c)} {c['after'][0]['mean']:.2f}" for c in ranked)
                   + "; before (the initialised set, same protocol) "
                   + " > ".join(f"{_label(c)} {c['before'][0]['mean']:.2f}" for c in
                                sorted(g, key=lambda c: -c["before"][0]["mean"])
                                if c.get("before"))
                   + ".")
        changes = [f"{_label(c)} {c['after'][0]['mean'] - c['before'][0]['mean']:+.2f}"
                   for c in g if c.get("before")]
        if changes:
            out.append(f"{head}: recovery changed the accuracy by " + ", ".join(changes)
                       + " points.")
        if runs > 1:
            stds = [r["std"] for c in g for r in (c["after"][0], *(c.get("before") or [])[:1])]
            out.append(f"{head}: the std over the {runs} students of a cell ranges "
                       f"{min(stds):.2f}-{max(stds):.2f} points, so gaps below about "
                       f"{2 * max(stds):.1f} points are within the student's noise.")
        else:
            out.append(f"{head}: one student per cell, its spread not measured here (the "
                       "2-student groups show it).")
        tails = [(c, c.get("loss_tail")) for c in g if c.get("loss_tail") is not None]
        if tails:
            out.append(f"{head}: recover loss over the last {LOSS_TAIL} steps "
                       + ", ".join(f"{_label(c)} {t:.3f}" for c, t in
                                   sorted(tails, key=lambda x: x[1])) + ".")
    return out


def report(data: dict[str, Any]) -> str:
    t = data.get("teacher") or {}
    cells = data.get("cells", [])
    lines = ["# FashionMNIST: SRe2L (recover) with pixel, gaussian and idc at equal storage",
             "", "Written by `benchmarks/fmnist_sre2l.py`; every number comes from "
             "`benchmarks/results/fmnist_sre2l.json`.", ""]
    lines += ["**Soft-label protocol.** The accuracies below come from students trained on the "
              "distilled images with the teacher's per-crop soft labels (SRe2L/FKD relabel). The "
              "teacher is needed at evaluation time. They are **not comparable** with the "
              "hard-label accuracies of the FashionMNIST table (`fmnist_table*.md`), whose best "
              "cells are shown at the end only as a "
              "different protocol.", ""]
    if t:
        ts = t["training"]
        lines += ["## Teacher (squeeze)", "",
                  f"ConvNet-3 with BatchNorm, width {ts['width']}, {ts['epochs']} epochs, SGD lr "
                  f"{ts['lr']} (cosine), batch {ts['batch_size']}, random crop + flip: "
                  f"**test accuracy {t['test_accuracy']:.2f} %** (10,000 test images); "
                  + (f"trained in {t['seconds']:.0f} s" if t.get("seconds") is not None else
                     "trained by `splatdd teacher` with the same settings (resumable; time not "
                     "recorded)") + f" ({t.get('machine', '')}).", ""]
    s = data.get("settings") or {}
    idc_factors = sorted({str(c["settings"]["param_options"].get("factor")) for c in cells
                          if c["param"] == "idc"})
    if s:
        lines += ["## Settings", "",
                  f"- recover (`sre2l`): iterations per row, r_bn {s['r_bn']}, first BN "
                  f"multiplier 10, crops scale {s['crop_scale']}, flip, one crop per class batch, "
                  f"{s['batches_per_step']} class batches (one image per class each) per step; the "
                  f"parameterization's `recover` optimiser, per row in the table (pixel/idc: "
                  f"SRe2L's Adam lr 0.25, betas (0.5, 0.9); gaussian: its plugin's recover "
                  f"setting, since 2026-11-29 Adam lr 1e-3, betas (0.5, 0.9), chosen on a "
                  f"validation split of the training set, docs/gaussian.md); "
                  f"cosine schedule applied by the core loop: {s.get('cosine_in_core', 'unknown')}",
                  f"- storage: {', '.join(sorted({c['param'] for c in cells}, key=PARAMS.index))}"
                  f" at the budget of IPC fp32 images per class (gaussian at its default GPC "
                  f"unless the row names gpc; idc factor {', '.join(idc_factors)}); "
                  f"initialised from random real images (gaussian: {s['init_steps']} fit steps); "
                  f"rows name their non-default options",
                  f"- soft-label evaluation: student ConvNet-3 width {s['eval_width']} (instance "
                  f"norm), {s['eval_steps']} AdamW steps (lr 1e-3, wd 0.01, cosine) of batch "
                  f"{s['eval_batch']}, random resized crop (0.08-1) + flip per image, teacher "
                  f"logits on the same crop, KL at temperature {s['temperature']}, "
                  f"runs per row, whole test set",
                  "- before = the initialised set (real images in each parameterization's form) "
                  "evaluated with the same soft-label protocol", ""]
    current = set(data.get("current") or [])
    lines += ["## Results (soft-label protocol, test accuracy %)", "",
              "Rows marked **current** are the last run of this script with the plugins' present "
              "settings; rows marked *earlier* come from earlier runs with other settings (the "
              "`recover optimiser`, iterations and eval runs columns say which) and are kept for "
              "the record.", "",
              "| row | IPC | recover iterations | parameterization | recover optimiser | "
              "images/class | bytes (budget) | "
              f"eval runs | before | after sre2l | recover loss (last {LOSS_TAIL} steps) | "
              "recover s | eval s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def group(c: dict[str, Any]) -> tuple[bool, int, int, int]:
        return (c["key"] not in current, c["ipc"], c["settings"]["iterations"],
                c["settings"]["eval"]["runs"])

    order = {p: i for i, p in enumerate(PARAMS)}
    for c in sorted(cells, key=lambda c: (*group(c), order.get(c["param"], 9))):
        b = c["before"][0] if c.get("before") else None
        a = c["after"][0] if c.get("after") else None
        lines.append(f"| {'**current**' if c['key'] in current else '*earlier*'} | "
                     f"{c['ipc']} | {c['settings']['iterations']} | {_label(c)} | "
                     f"{_fmt_opt(_opt(c))} | "
                     f"{c['images_per_class']} | {c['budget']['used']:,} "
                     f"({c['budget']['allowed']:,}) | {c['settings']['eval']['runs']} | "
                     f"{_fmt(b)} | **{_fmt(a)}** | "
                     f"{'--' if c.get('loss_tail') is None else format(c['loss_tail'], '.3f')} | "
                     f"{c['distill_seconds']:.0f} | "
                     f"{(a or {}).get('seconds', 0):.0f} |")
    lines += [""]
    tried: list[tuple[float, str, int, int, bool]] = []
    verdicts: dict[bool, list[str]] = {True: [], False: []}
    for earlier, ipc, iters, runs in sorted({group(c) for c in cells}):
        g_cells = [c for c in cells if group(c) == (earlier, ipc, iters, runs) and c["after"]]
        by = {_label(c): c["after"][0]["mean"] for c in g_cells}
        rows_by = {_label(c): c["after"][0] for c in g_cells}
        opts = {_label(c): _fmt_opt(_opt(c)) for c in g_cells}
        others = [k for k in by if k in ("pixel", "idc")]
        out = verdicts[not earlier]
        for g in [k for k in by if k.startswith("gaussian")]:
            parts = [f"{g} [{opts[g]}] {by[g]:.2f}"] + [
                f"{'above' if by[g] > by[p] else 'NOT above'} {p} {by[p]:.2f} "
                f"({by[g] - by[p]:+.2f})" for p in others]
            out.append(f"- IPC {ipc}, {iters} iterations, {runs} eval run(s): "
                       + ", ".join(parts))
            if ipc == 1 and len(others) == 2:
                met = all(by[g] > by[p] for p in others)
                out.append(f"  - **target ({g} above pixel and above idc at IPC 1, as GSDD "
                           f"Table 18 on ImageNet-1K): {'met' if met else 'MISSED'}**"
                           + ("" if runs < 2 else " on the means; " + "; ".join(
                               _significance(rows_by[g], rows_by[p], p) for p in others)))
                if earlier:
                    tried.append((by[g] - max(by[p] for p in others), g, iters, runs, met))
    if verdicts[True]:
        lines += ["### Current comparison", ""] + verdicts[True] + [
            "", "Each cell is one recover run (seed 0) and one initialisation; the +- and the "
            "standard errors cover the students only (their seeds are shared across cells), so "
            "a gap within the students' noise is not evidence either way."]
    if verdicts[False]:
        lines += ["", "### Earlier comparisons (other settings, kept for the record)", ""]
        lines += verdicts[False]
    if tried:
        margin, g, iters, runs, _ = max(tried)
        n_met = sum(t[4] for t in tried)
        lines += ["", f"Earlier settings, over all {len(tried)} IPC-1 comparisons: target "
                  + (f"met in {n_met}" if n_met else "MISSED in every one")
                  + f"; best margin of gaussian over the better of pixel and idc: {margin:+.2f} "
                  f"points ({g}, {iters} iterations, {runs} student(s) per cell)."]
    obs = observations(cells, current)
    if obs:
        lines += ["", "## Observations (generated from the cells above)", ""] + [
            f"- {o}" for o in obs]
    lines += validation_report(data)
    best = hard_label_best()
    if best:
        lines += ["", "## For orientation only: best hard-label cells (a different protocol)", "",
                  f"From `benchmarks/results/{TABLE_JSON.name}` (the hard-label table, "
                  f"`{TABLE_JSON.with_suffix('.md').name}`: DSA hard-label protocol, ConvNet-3 "
                  "width 128, its own reduced settings). Hard labels, no teacher at evaluation: "
                  "**not comparable** with the soft-label numbers above.", "",
                  "| IPC | cell | hard-label accuracy % | eval |", "|---|---|---|---|"]
        for ipc, e in sorted(best.items()):
            ev = e.get("settings", {}).get("eval", {})
            length = (f"{ev['epochs']} epochs" if "epochs" in ev else
                      f"{ev['steps']} SGD steps" if "steps" in ev else "?")
            lines.append(f"| {ipc} | {e['param']} + {e['algo']} ({e['settings'].get('iterations')}"
                         f" it) | {e['mean']:.2f} +- {e['std']:.2f} | {ev.get('runs', '?')} x "
                         f"{length} |")
    lines += ["", "## Machine", ""]
    for c in cells:
        lines.append(f"- IPC {c['ipc']} {_label(c)}, {c['settings']['iterations']} it: "
                     f"{c.get('machine', '')}, finished "
                     f"{c.get('finished', '')}")
    return "\n".join(lines) + "\n"


# ---- the run ------------------------------------------------------------------------------------
def _cosine_in_core() -> bool:
    """Whether the core loop reads ``Algorithm.lr_schedule`` (plugin API v2 asks it to)."""
    import inspect

    from splatdd import distill
    return "lr_schedule" in inspect.getsource(distill)


def ensure_teacher(a: argparse.Namespace, data: dict[str, Any]) -> Path:
    from splatdd.data import load_dataset
    from splatdd_sre2l.teacher import load_teacher, teacher_path, train_teacher

    tdir = Path(a.work_dir) / "teacher"
    settings = dict(model="ConvNet", width=a.teacher_width, epochs=a.teacher_epochs,
                    lr=a.teacher_lr, batch_size=256, seed=0)
    t = data.get("teacher")
    if t and t["training"] == {**settings, "depth": None} and teacher_path(tdir).is_file():
        return tdir
    train, test = load_dataset("fashion_mnist", device=a.device, progress=False)
    t0 = time.perf_counter()
    fresh = not teacher_path(tdir).is_file()
    info = train_teacher(train, test, tdir, device=a.device, progress=False,
                         log=lambda s: print(s, flush=True), **settings)
    if info["test_accuracy"] is None:
        _, info = load_teacher(tdir)
    data["teacher"] = {"dir": str(tdir), "training": info["training"],
                       "test_accuracy": info["test_accuracy"],
                       "seconds": time.perf_counter() - t0 if fresh else None,
                       "machine": _machine()}
    _save(data, a.results)
    return tdir


def recover_optimizer(param: str, ipc: int, param_options: dict[str, Any]) -> dict[str, Any]:
    """The optimiser the parameterization picks for sre2l's ``recover`` regime with these options
    (asked from the plugin through the registry, on a fresh uninitialised instance): kind, lr,
    betas and any per-entry lr scale (gaussian's ``lr_cholesky``)."""
    from splatdd.plugin_api import DatasetSpec
    from splatdd.registry import default_registry
    spec = DatasetSpec("fashion_mnist", 1, 28, 28, 10)
    cls = default_registry().get("parameterization", param)
    opt = cls.build(spec, ipc, generator=torch.Generator().manual_seed(0),
                    **param_options).optimizer_spec("recover")
    group = opt.params[0]
    out: dict[str, Any] = {"kind": opt.kind, "lr": float(group["lr"]),
                           "betas": list(opt.betas) if opt.betas is not None else [0.9, 0.999]}
    if group.get("lr_scale") is not None:
        out["lr_min"] = float(group["lr"]) * float(torch.as_tensor(group["lr_scale"]).min())
    return out


def _fmt_opt(o: dict[str, Any] | None) -> str:
    if not o:
        return "--"
    extra = f", some entries {o['lr_min']:.3g}" if "lr_min" in o and o["lr_min"] != o["lr"] else ""
    b0, b1 = o["betas"]
    return f"{o['kind'].capitalize()} {o['lr']:g}{extra}, betas ({b0:g}, {b1:g})"


#: What the plugins' recover regime was before the gaussian change of 2026-11-29 (gaussian: Adam
#: 1e-2 with torch's betas for every regime; pixel and idc unchanged); cells measured then did not
#: record it. ``lr_cholesky`` rows stepped the Cholesky entries at that lr instead.
EARLIER_RECOVER = {"pixel": {"kind": "adam", "lr": 0.25, "betas": [0.5, 0.9]},
                   "idc": {"kind": "adam", "lr": 0.25, "betas": [0.5, 0.9]},
                   "gaussian": {"kind": "adam", "lr": 1e-2, "betas": [0.9, 0.999]}}


def cell_settings(a: argparse.Namespace, tdir: Path, ipc: int, param: str):
    """The plugin/protocol options of a cell and its key (what decides whether it is measured)."""
    param_options: dict[str, Any] = {"factor": a.idc_factor} if param == "idc" else {}
    if param == "gaussian" and a.gaussian_lr_cholesky is not None:
        param_options["lr_cholesky"] = a.gaussian_lr_cholesky
    if param == "gaussian" and a.gaussian_gpc is not None:
        param_options["gpc"] = a.gaussian_gpc
    algo_options = {"teacher": str(tdir), "r_bn": a.r_bn, "crop_scale": list(a.crop_scale),
                    "batches_per_step": a.batches_per_step}
    eval_options = {"teacher": str(tdir), "steps": a.eval_steps, "batch_size": a.eval_batch,
                    "width": a.eval_width, "temperature": a.temperature}
    key = {"ipc": ipc, "param": param, "param_options": param_options,
           "algo_options": {**algo_options, "teacher": "teacher"}, "iterations": a.iterations,
           "init_steps": a.init_steps if param == "gaussian" else None,
           "eval": {**eval_options, "teacher": "teacher", "runs": a.eval_runs},
           "recover_optimizer": recover_optimizer(param, ipc, param_options)}
    return param_options, algo_options, eval_options, key


def run_cell(a: argparse.Namespace, tdir: Path, ipc: int, param: str) -> dict[str, Any]:
    from splatdd.experiment import DatasetConfig, EvalConfig, ExperimentConfig, run

    param_options, algo_options, eval_options, key = cell_settings(a, tdir, ipc, param)
    cfg = ExperimentConfig(
        ipc=ipc, parameterization=param, algorithm="sre2l", param_options=param_options,
        algo_options=algo_options, dataset=DatasetConfig(name="fashion_mnist"),
        iterations=a.iterations, seed=0, init="real",
        init_steps=a.init_steps if param == "gaussian" else None, checkpoint_every=50,
        eval=EvalConfig(protocol="soft-label", models=["ConvNet"], runs=a.eval_runs,
                        options=eval_options, before=True),
        out=str(Path(a.work_dir) / f"ipc{ipc}_{param}_{_hash(key)}"), device=a.device,
        threads=a.threads, name=f"fmnist-sre2l-{param}-ipc{ipc}",
        source="benchmarks/fmnist_sre2l.py (reduced CPU settings)")
    t0 = time.perf_counter()
    res = run(cfg, resume=True, progress=False, log=lambda s: print(f"[ipc{ipc} {param}] {s}",
                                                                    flush=True))
    from splatdd.distilled_file import load
    n_images = len(load(res.distilled_file).param.labels)
    return {"ipc": ipc, "param": param, "key": _hash(key), "settings": key,
            "images_per_class": n_images // 10, "budget": res.budget, "init": res.init,
            "distill_seconds": res.distill_seconds, "final_loss": res.final_loss,
            "before": res.before, "after": res.after, "out_dir": str(res.out_dir),
            "loss_tail": loss_tail(res.out_dir),
            "wall_seconds": time.perf_counter() - t0, "machine": _machine(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


# ---- choosing the gaussian recover setting on a validation split ---------------------------------
#: Recover optimisers compared by ``--validate`` (gaussian, IPC 1), most telling first: the default
#: before 2026-11-29 (Adam 1e-2, torch's betas), the present one (1e-3, SRe2L's betas (0.5, 0.9)),
#: the old preset's (1e-2 with the Cholesky entries at 1e-2 * 2/28), each change alone (betas
#: only, lr only), and the lr either side of 1e-3 with SRe2L's betas.
VALIDATION_SETTINGS: list[dict[str, Any]] = [
    {"lr": 1e-2, "betas": [0.9, 0.999]},
    {"lr": 1e-3, "betas": [0.5, 0.9]},
    {"lr": 1e-2, "betas": [0.9, 0.999], "lr_cholesky": 1e-2 * 2 / 28},
    {"lr": 1e-2, "betas": [0.5, 0.9]},
    {"lr": 1e-3, "betas": [0.9, 0.999]},
    {"lr": 3e-3, "betas": [0.5, 0.9]},
    {"lr": 3e-4, "betas": [0.5, 0.9]},
]
VAL_SIZE, VAL_SEED = 10_000, 123


def validation_split(train: Any) -> Any:
    """:data:`VAL_SIZE` training images drawn with seed :data:`VAL_SEED` (the teacher saw them;
    the students never see real images, so their accuracy on these measures transfer as on the
    test set, and choosing a setting on them leaves the test set untouched)."""
    from splatdd.plugin_api import RealData
    idx = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(VAL_SEED))
    idx = idx[:VAL_SIZE]
    return RealData(spec=train.spec, images=train.images[idx], labels=train.labels[idx])


def recover_terms(param: Any, algo: Any, draws: int = 30) -> dict[str, float]:
    """The recover objective's parts on ``param``, averaged over ``draws`` crop draws (seed 1):
    the teacher's cross-entropy on the crops, ``r_bn`` times the BN term, the parameterization's
    regulariser (gaussian: the boundary loss), and the teacher's accuracy on the whole images."""
    import torch.nn.functional as F

    from splatdd_sre2l.augment import apply_crops, expand_groups, sample_crops
    from splatdd_sre2l.bn import BNStatistics
    gen = torch.Generator().manual_seed(1)
    ce_sum = bn_sum = 0.0
    with torch.no_grad():
        batches = algo._pick_batches(param.labels)
        order = torch.cat(batches)
        sizes = [len(b) for b in batches]
        x, y = param.decode(order), param.labels[order]
        for _ in range(draws):
            crops = expand_groups(sample_crops(len(batches), gen, scale=algo.crop_scale,
                                               flip=algo.flip), sizes)
            with BNStatistics(algo.teacher, sizes=sizes,
                              first_bn_multiplier=algo.first_bn_multiplier) as bn:
                logits = algo.teacher(apply_crops(x, crops))
                bn_sum += float(bn.loss())
            ce_sum += float(torch.stack([F.cross_entropy(lg, yy) for lg, yy in
                                         zip(logits.split(sizes), y.split(sizes))]).mean())
        acc = float((algo.teacher(x).argmax(1) == y).float().mean())
        reg = param.regularization()
    return {"ce_crops": ce_sum / draws, "bn_weighted": algo.r_bn * bn_sum / draws,
            "regularizer": 0.0 if reg is None else float(reg), "teacher_acc_full": 100 * acc}


def first_per_class(param: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The first decoded image of every class and its label (what one image per class teaches)."""
    y = param.labels
    keep = torch.cat([torch.nonzero(y == c).flatten()[:1] for c in range(int(y.max()) + 1)])
    with torch.no_grad():
        return param.decode(keep).detach(), y[keep]


def validate(a: argparse.Namespace, data: dict[str, Any], tdir: Path) -> None:
    """Recover the IPC-1 gaussian cell's initialised set with each of
    :data:`VALIDATION_SETTINGS` (``a.iterations``, cosine, the cell's sre2l options) and record,
    on :func:`validation_split`, the soft-label accuracy of the whole set and of its first image
    per class (3 students each, the table's student settings), with :func:`recover_terms`."""
    from splatdd.data import load_dataset
    from splatdd.distill import distill
    from splatdd.distilled_file import load
    from splatdd_sre2l.algorithm import SRe2L
    from splatdd_sre2l.soft_label import SoftLabelProtocol

    src = [c for c in data["cells"] if c["param"] == "gaussian" and c["ipc"] == 1
           and not c["settings"]["param_options"]
           and (Path(c["out_dir"]) / "initial.safetensors").is_file()]
    if not src:
        raise SystemExit("--validate needs a measured IPC-1 gaussian cell with default options "
                         "(run the table first)")
    init_file = Path(src[-1]["out_dir"]) / "initial.safetensors"
    train, _ = load_dataset("fashion_mnist", device=a.device, progress=False)
    val = validation_split(train)
    proto = SoftLabelProtocol(teacher=str(tdir), steps=a.eval_steps, batch_size=a.eval_batch,
                              width=a.eval_width, temperature=a.temperature)
    runs = 3

    def score(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        r = proto.evaluate(x, y, val, runs=runs, seed=0)
        return {"mean": r.mean, "std": r.std, "accs": r.accs}

    algo_opts = {"teacher": str(tdir), "r_bn": a.r_bn, "crop_scale": list(a.crop_scale),
                 "batches_per_step": a.batches_per_step}
    rows = data.setdefault("validation", {"rows": []})
    rows.update({"initial_file": str(init_file), "val_size": VAL_SIZE, "val_seed": VAL_SEED,
                 "students": runs, "iterations": a.iterations})
    done = {json.dumps(r["setting"], sort_keys=True) for r in rows["rows"]
            if r["iterations"] == a.iterations}
    todo: list[dict[str, Any] | None] = [None] + list(VALIDATION_SETTINGS)   # None: before
    for setting in todo:
        tag = json.dumps(setting, sort_keys=True)
        if tag in done:
            continue
        param = load(init_file, device=a.device).param
        algo = SRe2L(train, ipc=1, generator=torch.Generator().manual_seed(0), **algo_opts)
        t0 = time.perf_counter()
        if setting is not None:
            param.lr, param.lr_cholesky = None, setting.get("lr_cholesky")
            spec = param.optimizer_spec("recover", setting["lr"])
            spec.betas = tuple(setting["betas"])
            param.optimizer_spec = lambda regime, lr=None, _s=spec: _s   # this run's optimiser
            distill(param, algo, iterations=a.iterations,
                    out_dir=Path(a.work_dir) / "validate" / _hash(setting), seed=0,
                    checkpoint_every=None, progress=False, plot=False)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            x = param.decode().detach()
        row = {"setting": setting, "iterations": a.iterations, "recover_seconds": seconds,
               "terms": recover_terms(param, algo), "val_all": score(x, param.labels),
               "val_first_per_class": score(*first_per_class(param)), "machine": _machine()}
        rows["rows"].append(row)
        print(f"[validate] {setting}: all {row['val_all']['mean']:.2f}, one per class "
              f"{row['val_first_per_class']['mean']:.2f}, CE on crops "
              f"{row['terms']['ce_crops']:.3f}", flush=True)
        _save(data, a.results)


def _validation_reading(rows: list[dict[str, Any]]) -> list[str]:
    """Sentences comparing, in the ``--validate`` rows, the set before recovery, the earlier
    gaussian default (Adam 1e-2, torch's betas) and the plugin's present recover setting."""
    def find(lr: float | None, betas: list[float] | None) -> dict[str, Any] | None:
        for r in rows:
            st = r["setting"]
            if (st is None and lr is None) or (st is not None and lr is not None and
                                               st["lr"] == lr and st["betas"] == betas
                                               and "lr_cholesky" not in st):
                return r
        return None
    now = recover_optimizer("gaussian", 1, {})
    before, old, new = find(None, None), find(1e-2, [0.9, 0.999]), find(now["lr"], now["betas"])
    if not (before and old):
        return []

    def desc(r: dict[str, Any]) -> str:
        return (f"the whole set {r['val_all']['mean']:.2f} %, one image per class "
                f"{r['val_first_per_class']['mean']:.2f} %, teacher CE on crops "
                f"{r['terms']['ce_crops']:.3f}")
    out = ["", f"Reading: before recovery {desc(before)}; after recovery with the earlier default "
           f"(Adam 1e-2, torch's betas) {desc(old)}. So the Gaussians "
           + ("do learn the recover objective (the teacher's cross-entropy on the crops falls), "
              "but " if old["terms"]["ce_crops"] < before["terms"]["ce_crops"] else "do not "
              "lower the teacher's cross-entropy on the crops, and ")
           + "the images they become teach the student "
           + ("less" if old["val_first_per_class"]["mean"] < before["val_first_per_class"]["mean"]
              else "no less") + " than the fitted real images they started from."]
    if new:
        out[-1] += (f" With the present setting (Adam {now['lr']:g}, betas "
                    f"({now['betas'][0]:g}, {now['betas'][1]:g})): {desc(new)}.")
        best = max((r for r in rows if r["setting"] is not None),
                   key=lambda r: r["val_all"]["mean"])
        if best is not new:
            st = best["setting"]
            gap = best["val_all"]["mean"] - new["val_all"]["mean"]
            out[-1] += (f" The best whole-set row (Adam {st['lr']:g}, betas ({st['betas'][0]:g}, "
                        f"{st['betas'][1]:g})) is {gap:+.2f}"
                        " points from it, less than the students' std there: a plateau, on which "
                        "the plugin takes GSDD's section-4.1 lr." if abs(
                            best["val_all"]["mean"] - new["val_all"]["mean"]) < max(
                            best["val_all"]["std"], new["val_all"]["std"], 0.5) else
                        f" The best whole-set row (Adam {st['lr']:g}) is "
                        f"{best['val_all']['mean'] - new['val_all']['mean']:+.2f} points from it.")
    return out + [""]


def validation_report(data: dict[str, Any]) -> list[str]:
    v = data.get("validation")
    if not v or not v.get("rows"):
        return []
    lines = ["", "## How the gaussian recover setting was chosen (validation split, not the test "
             "set)", "",
             f"`--validate`: the IPC-1 gaussian set as initialised (`{v['initial_file']}`, stored "
             f"bf16) recovered for {v['iterations']} iterations with each optimiser, then "
             f"{v['students']} soft-label students (the table's settings) tested on "
             f"{v['val_size']:,} **training** images (seed {v['val_seed']}; the students never "
             "see real images), once with the whole set (11 images per class) and once with its "
             "first image per class only. The recover terms are averages over 30 crop draws.",
             "", "| recover optimiser | val acc, whole set | val acc, 1 image/class | "
             "teacher CE on "
             "crops | r_bn x BN | boundary reg | teacher acc (whole images) |",
             "|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        st = r["setting"]
        name = "before recovery" if st is None else (
            f"Adam {st['lr']:g}, betas ({st['betas'][0]:g}, {st['betas'][1]:g})"
            + (f", Cholesky {st['lr_cholesky']:.3g}" if st.get("lr_cholesky") else ""))
        t = r["terms"]
        lines.append(f"| {name} | {_fmt(r['val_all'])} | {_fmt(r['val_first_per_class'])} | "
                     f"{t['ce_crops']:.3f} | {t['bn_weighted']:.3f} | {t['regularizer']:.3f} | "
                     f"{t['teacher_acc_full']:.0f} % |")
    return lines + _validation_reading(v["rows"])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    data = _load(a.results)
    if a.report_only:
        for other in a.merge:
            for cell in _load(other)["cells"]:
                data["cells"] = [c for c in data["cells"] if not (
                    c["ipc"] == cell["ipc"] and c["param"] == cell["param"]
                    and c["key"] == cell["key"])] + [cell]
        _backfill(data)
        _save(data, a.results)
        return 0
    torch.set_num_threads(a.threads)
    _backfill(data)
    if a.validate:                     # the table's settings stay as its last run wrote them
        validate(a, data, ensure_teacher(a, data))
        print("\n".join(validation_report(data)))
        return 0
    data["settings"] = {"iterations": a.iterations, "r_bn": a.r_bn,
                        "crop_scale": list(a.crop_scale), "batches_per_step": a.batches_per_step,
                        "params": list(a.params), "idc_factor": a.idc_factor,
                        "init_steps": a.init_steps, "eval_width": a.eval_width,
                        "eval_steps": a.eval_steps, "eval_batch": a.eval_batch,
                        "eval_runs": a.eval_runs, "temperature": a.temperature,
                        "cosine_in_core": _cosine_in_core(), "threads": a.threads}
    tdir = ensure_teacher(a, data)
    print(f"teacher: {data['teacher']['test_accuracy']:.2f} %", flush=True)
    data["current"] = [_hash(cell_settings(a, tdir, ipc, param)[3])
                       for ipc in a.ipc for param in a.params]
    for ipc in a.ipc:
        for param in a.params:
            key = _hash(cell_settings(a, tdir, ipc, param)[3])
            if any(c["ipc"] == ipc and c["param"] == param and c["key"] == key
                   for c in data["cells"]):
                print(f"[ipc{ipc} {param}] measured already ({key}), skipped", flush=True)
                continue
            cell = run_cell(a, tdir, ipc, param)
            data["cells"] = [c for c in data["cells"] if not (
                c["ipc"] == ipc and c["param"] == param and c["key"] == key)] + [cell]
            _save(data, a.results)
            print(f"[ipc{ipc} {param}] before {_fmt(cell['before'][0])} after "
                  f"{_fmt(cell['after'][0])}", flush=True)
    _save(data, a.results)
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
