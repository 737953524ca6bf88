"""The evaluation-epoch ratio of benchmarks/speed.py, measured several times in a row (issue 15).

On this shared 2-core machine one speed.py run of the ``eval_epoch`` case (interleaved rounds,
minimum per side) has given ratios far apart at the same code: the two sides do not suffer alike
from what the host's other tenants do to memory bandwidth (the new side's Winograd transforms are
memory-bound, the base's oneDNN convolutions less so), and the load average does not show it.
This script runs that case ``--runs`` times, each a complete speed.py measurement in its own
processes, and writes every run's figures and their median to
benchmarks/results/eval_epoch_repeats.{md,json}, so that a single lucky or unlucky run is not
the whole story.

    python benchmarks/eval_epoch_repeats.py --base-tree /tmp/splatdd-speed-base \\
        --base-compiled /tmp/splatdd-speed-C/_C.cpython-311-x86_64-linux-gnu.so
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 5.0


def summarise(runs: list[dict]) -> dict:
    """Median, minimum and maximum of the runs' ratios, and how many reach the target."""
    ratios = [r["ratio"] for r in runs]
    return {"runs": len(runs), "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios), "max_ratio": max(ratios),
            "at_target": sum(r >= TARGET for r in ratios), "target": TARGET}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["# The evaluation epoch's ratio, run after run (issue 15)", "",
             "Written by `benchmarks/eval_epoch_repeats.py`. " + result["machine"], "",
             f"Each run is one `benchmarks/speed.py --cases eval_epoch --rounds "
             f"{result['rounds']} --epochs {result['epochs']}` (base {result['base_rev']}, new "
             f"{result['new_rev']}; interleaved rounds in fresh processes, the minimum per side), "
             "one after the other.", "",
             "| run | UTC | load at start, end | base s | new s | ratio |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["runs"], 1):
        lines.append(f"| {i} | {r['utc']} | {r['load_start']:.2f}, {r['load_end']:.2f} | "
                     f"{r['base_s']:.3f} | {r['new_s']:.3f} | {r['ratio']:.2f} |")
    lines += ["", f"Median ratio **{s['median_ratio']:.2f}x** over {s['runs']} runs (from "
              f"{s['min_ratio']:.2f}x to {s['max_ratio']:.2f}x); {s['at_target']} of "
              f"{s['runs']} at or above the issue's {s['target']:g}x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7, help="speed.py --rounds of each run")
    ap.add_argument("--epochs", type=int, default=5, help="speed.py --epochs of each run")
    ap.add_argument("--base-tree", type=Path)
    ap.add_argument("--base-compiled", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    for name in ("runs", "rounds", "epochs"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    import torch
    from splatdd.io_utils import atomic_write_text
    from splatdd.runtime import cpu_model
    runs, base_rev, new_rev = [], None, "unknown"
    with tempfile.TemporaryDirectory(prefix="splatdd-repeats-") as tmp:
        for i in range(a.runs):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, str(HERE / "speed.py"), "--cases", "eval_epoch",
                   "--rounds", str(a.rounds), "--epochs", str(a.epochs), "--out", str(out)]
            if a.base_tree:
                cmd += ["--base-tree", str(a.base_tree)]
            if a.base_compiled:
                cmd += ["--base-compiled", str(a.base_compiled)]
            load0, utc = os.getloadavg()[0], time.strftime("%H:%M", time.gmtime())
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            got = json.loads((out / "speed.json").read_text())
            fig = got["figures"]["eval_epoch"]
            base_rev = got.get("base", {}).get("rev", base_rev)
            new_rev = got.get("new", {}).get("rev", "unknown") + (
                "+changes" if got.get("new", {}).get("dirty") else "")
            runs.append({"utc": utc, "load_start": load0, "load_end": os.getloadavg()[0],
                         "base_s": fig["base_s"], "new_s": fig["new_s"], "ratio": fig["ratio"]})
            print(f"run {i + 1}/{a.runs}: {fig['base_s']:.3f} -> {fig['new_s']:.3f} s "
                  f"({fig['ratio']:.2f}x)", flush=True)
    result = {"machine": f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch "
                         f"{torch.__version__}, 1 torch thread.",
              "rounds": a.rounds, "epochs": a.epochs, "base_rev": base_rev or "unknown",
              "new_rev": new_rev, "runs": runs, "summary": summarise(runs)}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "eval_epoch_repeats.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(a.out / "eval_epoch_repeats.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
