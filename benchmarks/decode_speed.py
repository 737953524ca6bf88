"""Decoding speed and memory, Gaussian images vs SIREN fields at equal storage -- the GSDD paper's
Figure 5, on this machine.

Both store 963 fp32 floats = 3,852 bytes per image (SIREN: 3 sine layers of width 20, fp32;
Gaussians: 214 bf16 Gaussians, rendered with 2x2 SSAA and the prefilter, as in training). We time
decoding all images of a batch (forward, no autograd) and decoding plus the backward pass of a sum
loss (what every distillation step pays), and the peak memory of each (CPU: rise of the peak
resident set size). Two sweeps, as in the paper: resolution at batch 32, batch size at 128 px.

The Gaussians are placed as ``GaussianImages`` places them before fitting (jittered grid, standard
deviation half the grid spacing, so they cover the image like fitted ones do); SIREN weights are the
SIREN initialisation. Cost does not depend on the values otherwise.

    python benchmarks/decode_speed.py        # writes benchmarks/results/decode_speed.{md,png,json}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from splatdd.plugin_api import DatasetSpec
from splatdd_gaussian import GaussianImages
from splatdd.fit import PeakMemory, machine_description
from splatdd_siren import SirenImages

HERE = Path(__file__).resolve().parent


def make(kind: str, batch: int, res: int, floats: float):
    spec = DatasetSpec("speed", 3, res, res, 1)
    gen = torch.Generator().manual_seed(0)
    budget = 4 * floats
    if kind == "gaussian":
        p = GaussianImages(spec, gpc=batch, points=int(budget // 18), generator=gen)
    else:
        p = SirenImages(spec, dpc=batch, layers=3, width=20, w0=40.0, generator=gen)
    assert p.num_bytes() / batch <= budget
    return p


def _once(param, backward: bool) -> None:
    if backward:
        param.zero_grad(set_to_none=True)
        param.decode().sum().backward()
    else:
        with torch.no_grad():
            param.decode()


def measure_pair(params: dict, backward: bool, repeats: int) -> dict[str, tuple[float, float]]:
    """{kind: (best seconds of ``repeats`` runs, peak MB)} of decode [+ backward]. The methods are
    timed alternately, so both see the same background load, and the minimum is kept: the cores
    are shared, and other jobs only ever add time."""
    for p in params.values():
        _once(p, backward)                               # warm-up
    times: dict[str, list[float]] = {k: [] for k in params}
    for _ in range(repeats):
        for kind, p in params.items():
            t0 = time.perf_counter()
            _once(p, backward)
            times[kind].append(time.perf_counter() - t0)
    out = {}
    for kind, p in params.items():
        p.zero_grad(set_to_none=True)
        with PeakMemory("cpu") as mem:
            _once(p, backward)
        p.zero_grad(set_to_none=True)
        out[kind] = (min(times[kind]), mem.mb)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", default="32,64,128,256")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--batch", type=int, default=32, help="batch of the resolution sweep")
    ap.add_argument("--res", type=int, default=128, help="resolution of the batch sweep")
    ap.add_argument("--floats-per-image", type=float, default=963.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_speed"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rows = []
    sweeps = [("resolution", args.batch, r) for r in map(int, args.resolutions.split(","))]
    sweeps += [("batch", b, args.res) for b in map(int, args.batches.split(","))]
    for sweep, batch, res in sweeps:
        params = {kind: make(kind, batch, res, args.floats_per_image)
                  for kind in ("gaussian", "siren")}
        fw = measure_pair(params, False, args.repeats)
        fb = measure_pair(params, True, args.repeats)
        for kind, p in params.items():
            (fw_t, fw_m), (fb_t, fb_m) = fw[kind], fb[kind]
            row = {"sweep": sweep, "method": kind, "batch": batch, "resolution": res,
                   "bytes_per_image": p.num_bytes() / batch, "fwd_ms": fw_t * 1e3,
                   "fwd_mb": fw_m, "fwdbwd_ms": fb_t * 1e3, "fwdbwd_mb": fb_m}
            rows.append(row)
            print(f"{sweep:10s} {kind:8s} B={batch:3d} res={res:3d}: fwd {fw_t * 1e3:8.1f} ms "
                  f"{fw_m:7.1f} MB | fwd+bwd {fb_t * 1e3:8.1f} ms {fb_m:7.1f} MB", flush=True)
        del params
    total = time.perf_counter() - t_start
    load = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def pair(sweep, key):
        g = {(r["batch"], r["resolution"]): r for r in rows
             if r["sweep"] == sweep and r["method"] == "gaussian"}
        s = {(r["batch"], r["resolution"]): r for r in rows
             if r["sweep"] == sweep and r["method"] == "siren"}
        return [(k, g[k], s[k]) for k in g]

    lines = ["# Decoding speed: Gaussian images vs SIREN at equal storage (GSDD Figure 5, CPU)", "",
             f"Generated by `python benchmarks/decode_speed.py` in {total:.0f} s on: "
             f"{machine_description()}; 1-minute load average at the end {load:.1f} (2 cores "
             f"shared with other jobs: times are noisy). Best of {args.repeats} runs after one "
             f"warm-up, the two methods timed alternately.", "",
             f"Storage: {args.floats_per_image:g} fp32 floats = {4 * args.floats_per_image:.0f} "
             f"bytes per image for both: SIREN 3 sine layers x 20 (fp32, decoded with one "
             f"`baddbmm` per layer over the batch); Gaussians {int(4 * args.floats_per_image // 18)}"
             f" per image (bf16), `splatdd.render` with ssaa=2 and the prefilter. Memory: rise of "
             f"the peak resident set size (CPU), 0 when the allocator reuses freed memory.", ""]
    for sweep, label in (("resolution", f"batch {args.batch}"), ("batch", f"{args.res} px")):
        lines += [f"## {sweep} sweep ({label})", "",
                  "| batch | res | gaussian fwd ms | siren fwd ms | speed-up | gaussian fwd+bwd ms "
                  "| siren fwd+bwd ms | speed-up | gaussian fwd+bwd MB | siren fwd+bwd MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (b, r), g, s in pair(sweep, None):
            lines.append(f"| {b} | {r} | {g['fwd_ms']:.1f} | {s['fwd_ms']:.1f} | "
                         f"{s['fwd_ms'] / g['fwd_ms']:.1f}x | {g['fwdbwd_ms']:.1f} | "
                         f"{s['fwdbwd_ms']:.1f} | {s['fwdbwd_ms'] / g['fwdbwd_ms']:.1f}x | "
                         f"{g['fwdbwd_mb']:.1f} | {s['fwdbwd_mb']:.1f} |")
        lines.append("")
    lines += ["Compared with: the GSDD paper's Figure 5 (GPU; GSDD faster and lighter than DDiF at "
              "every resolution and batch size, the gap growing with both). No ANCHORS.md row "
              "gives its numbers."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine_description(),
                                                    "load_average": load, "rows": rows}, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for i, (sweep, xkey) in enumerate((("resolution", "resolution"), ("batch", "batch"))):
        for j, (key, ylabel) in enumerate((("fwd_ms", "forward (ms)"),
                                           ("fwdbwd_ms", "forward+backward (ms)"),
                                           ("fwdbwd_mb", "fwd+bwd peak memory (MB)"))):
            ax = axes[i, j]
            for kind, style in (("gaussian", "o-"), ("siren", "s--")):
                pts = [(r[xkey], r[key]) for r in rows if r["sweep"] == sweep and r["method"] == kind]
                ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], style, label=kind)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xkey)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel}, {sweep} sweep", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"equal storage {4 * args.floats_per_image:.0f} B/image; "
                 f"{machine_description()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    print(f"wrote {out.with_suffix('.md')}, .json, .png in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
