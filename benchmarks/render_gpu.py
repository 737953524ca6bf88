"""Renderer speed on a GPU: the CUDA backend against the dense PyTorch reference on the same GPU and
against the CPU backend, in one run, at the CPU benchmark's configurations (benchmarks/render.py:
C = 3, 2x2 SSAA, prefilter on, fp32; forward and forward + backward of a weighted-sum loss, in
images per second). The workloads, parameter generator and timing (best of runs after a warm-up,
device synchronised) are benchmarks/render.py's own functions, so the rows are comparable with
benchmarks/results/render_cpu.md.

The dense reference runs on a subset of the batch when its memory would be too large (the subset is
stated); every rate is per image. Speed-ups are against the reference on the same device.

    python benchmarks/render_gpu.py --json out.json                      # on a GPU
    python benchmarks/render_gpu.py --device cpu --configs 4,8,16 --repeats 1   # smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
#: benchmarks/render.py's workloads (B images, N Gaussians each, R px), copied from its main()
#: (it exposes no importable list); used unless render.py defines CONFIGS.
FALLBACK_CONFIGS = ((256, 22, 32), (64, 170, 128), (16, 364, 256))
#: dense reference: at most this many floats per intermediate on a GPU (render.py's GPU value)
REF_ELEMS_GPU = 1.0e9
REF_ELEMS_CPU = 1.2e8


def load_cpu_benchmark() -> ModuleType:
    """benchmarks/render.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("splatdd_bench_render", HERE / "render.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def default_configs(bench: ModuleType) -> tuple[tuple[int, int, int], ...]:
    """render.py's CONFIGS when it defines one, else :data:`FALLBACK_CONFIGS`."""
    cfg = getattr(bench, "CONFIGS", None)
    return tuple(tuple(int(x) for x in c) for c in cfg) if cfg else FALLBACK_CONFIGS


def parse_configs(text: str) -> list[tuple[int, int, int]]:
    """``"B,N,R;B,N,R"`` -> ``[(B, N, R), ...]``.

    >>> parse_configs("4,8,16;2,3,8")
    [(4, 8, 16), (2, 3, 8)]
    """
    out = []
    for part in text.split(";"):
        vals = part.split(",")
        try:
            b, n, r = (int(v) for v in vals)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--configs must be 'B,N,R' triples of ints separated by ';', got {part!r}") from None
        if min(b, n, r) < 1:
            raise argparse.ArgumentTypeError(f"--configs values must be >= 1, got {part!r}")
        out.append((b, n, r))
    return out


def benchmark(configs: Sequence[tuple[int, int, int]], device: str, repeats: int,
              bench: ModuleType | None = None, log=print) -> list[dict]:
    """One row per (workload, renderer): ``splatdd <device>``, ``splatdd cpu`` (when the device is
    a GPU), ``dense reference (<device>)``. Rates are images per second; ``*_speedup`` are against
    the reference row of the same workload."""
    bench = bench or load_cpu_benchmark()
    ref_elems = REF_ELEMS_GPU if device == "cuda" else REF_ELEMS_CPU
    rows = []
    for B, N, R in configs:
        params = bench.make_params(B, N, device=device)
        name = f"B={B}, N={N}, {R} px"
        runs = []
        f, fb = bench.time_renderer(bench.backend_fn(device), params, R, repeats, device)
        runs.append((f"splatdd {device}", B, f, fb))
        if device == "cuda":
            f, fb = bench.time_renderer(bench.backend_fn("cpu"), params.cpu(), R, max(1, repeats // 2), "cpu")
            runs.append(("splatdd cpu", B, f, fb))
        k = bench.ref_subset(B, N, R, ref_elems)
        f, fb = bench.time_renderer(bench.reference_fn, params[:k], R, max(1, min(repeats, 3)), device)
        runs.append((f"dense reference ({device})", k, f, fb))
        ref_f, ref_fb = k / f, k / fb
        for label, n, f, fb in runs:
            row = {"workload": name, "B": B, "N": N, "px": R, "renderer": label, "images_timed": n,
                   "fwd_img_s": n / f, "fwd_bwd_img_s": n / fb, "fwd_speedup": (n / f) / ref_f,
                   "fwd_bwd_speedup": (n / fb) / ref_fb}
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(r: dict) -> str:
    """One markdown table row of :func:`benchmark`'s output."""
    sub = "" if r["images_timed"] == r["B"] or not r["renderer"].startswith("dense") else \
        f", {r['images_timed']} of {r['B']} images"
    return (f"| {r['workload']} | {r['renderer']}{sub} | {r['images_timed']} | {r['fwd_img_s']:,.1f} | "
            f"{r['fwd_bwd_img_s']:,.1f} | {r['fwd_speedup']:,.1f}x | {r['fwd_bwd_speedup']:,.1f}x |")


TABLE_HEAD = ["| workload | renderer | images timed | fwd img/s | fwd+bwd img/s | fwd speed-up | "
              "fwd+bwd speed-up |", "|" + "---|" * 7]


def cuda_vs_cpu(rows: Sequence[dict]) -> list[dict]:
    """Per workload, the CUDA backend's rate over the CPU backend's (forward, forward+backward)."""
    out = []
    by = {}
    for r in rows:
        by.setdefault(r["workload"], {})[r["renderer"]] = r
    for w, rs in by.items():
        if "splatdd cuda" in rs and "splatdd cpu" in rs:
            a, b = rs["splatdd cuda"], rs["splatdd cpu"]
            out.append({"workload": w, "fwd": a["fwd_img_s"] / b["fwd_img_s"],
                        "fwd_bwd": a["fwd_bwd_img_s"] / b["fwd_bwd_img_s"]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--configs", type=parse_configs, default=None,
                    help="'B,N,R;...' (default: benchmarks/render.py's workloads)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import splatdd

    if args.device == "cuda" and "cuda" not in splatdd.backends():
        print("render_gpu: error: the CUDA backend is not usable here (splatdd.backends() = "
              f"{splatdd.backends()}; torch.cuda.is_available() = {torch.cuda.is_available()})",
              file=sys.stderr)
        return 2
    bench = load_cpu_benchmark()
    configs = args.configs or default_configs(bench)
    threads = torch.get_num_threads()
    print(f"render_gpu: device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f", CPU backend with {threads} torch threads; C = {bench.C}, ssaa = {bench.SSAA}, fp32")
    print("\n".join(TABLE_HEAD), flush=True)
    rows: list[dict] = []
    for cfg in configs:         # the JSON after every workload: a time-boxed run keeps its rows
        rows += benchmark([cfg], args.device, args.repeats, bench)
        ratios = cuda_vs_cpu(rows)
        if args.json is not None:
            from splatdd.io_utils import atomic_write_json

            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.json, {
                "device": args.device, "cpu_threads": threads, "channels": bench.C, "ssaa": bench.SSAA,
                "configs": [list(c) for c in configs],
                "configs_source": "benchmarks/render.py CONFIGS" if getattr(bench, "CONFIGS", None)
                else "copied from benchmarks/render.py main() (FALLBACK_CONFIGS)",
                "repeats": args.repeats, "rows": rows, "cuda_vs_cpu": ratios})
    for r in cuda_vs_cpu(rows):
        print(f"- {r['workload']}: CUDA / CPU backend: fwd {r['fwd']:,.1f}x, fwd+bwd {r['fwd_bwd']:,.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
