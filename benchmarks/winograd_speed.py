"""Winograd F(4x4, 3x3) (splatdd.winograd) against F.conv2d on the CPU: time and accuracy.

For each layer shape (N, C, K, H) -- ConvNet-3's 128 -> 128 convolutions at 16 x 16 and 8 x 8
outputs, at the test pass's batch of 8 images and dm's real batch of 256, and the first layer's
few input channels (where the direct convolution should stay) -- it times, interleaved round by
round on the same input so that all see the same background load, and keeps each one's minimum:

* ``conv2d``: ``F.conv2d(x, w, b, padding=1)`` (oneDNN's direct convolution);
* ``winograd``: ``conv3x3_winograd(x, U, b)``, the input and output transforms and the GEMMs
  included, the weight transform ``U = winograd_weight(w)`` excluded (a network computes it once
  per weight), with a fresh output tensor every call (as F.conv2d);
* ``winograd + out``: the same writing into a kept ``out`` tensor (what a network that owns its
  output buffers pays; F.conv2d allocates its output on every call).

It also reports the error of each against a float64 ``F.conv2d`` (max over outputs, relative to
the largest output), on ConvNet-like inputs (ReLU'd, Kaiming-scaled weights).

A second table times the filters' gradient of the training layers at ConvNet-3's shapes (a pass
of 16 images, as evaluation training runs them, and 110 images in one pass): oneDNN's
``convolution_backward`` (weight only) against ``conv3x3_winograd_grad_weight`` recomputing the
input transform V, and with V kept from the forward in a ``WinogradWorkspace`` (what
splatdd.winograd_train does), with the error of each against float64 autograd (max over
entries, relative to the largest entry).

    python benchmarks/winograd_speed.py            # writes benchmarks/results/winograd_speed.md
    python benchmarks/winograd_speed.py --quick    # fewer rounds, prints only
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from splatdd.fit import machine_description
from splatdd.io_utils import atomic_write_text
from splatdd.render import _C
from splatdd.winograd import (MIN_CHANNELS, WinogradWorkspace, _conv3x3_winograd,
                              conv3x3_winograd, conv3x3_winograd_grad_weight, winograd_weight)

HERE = Path(__file__).resolve().parent

# (N, C, K, H): the four shapes, then the crossover in C (ConvNet's first layer has 1 or 3).
SHAPES = [(8, 128, 128, 16), (8, 128, 128, 8), (256, 128, 128, 16), (256, 128, 128, 8),
          (8, 1, 128, 32), (8, 3, 128, 32), (8, 8, 128, 32), (8, 16, 128, 32), (8, 24, 128, 32),
          (8, 32, 128, 32), (8, 64, 128, 32)]
TARGET_SHAPES = {(8, 128, 128, 16), (256, 128, 128, 16)}
# (N, C, K, H) of the filter-gradient table: the training passes of 16 images, and 110 in one.
GRAD_SHAPES = [(16, 128, 128, 16), (16, 128, 128, 8), (110, 128, 128, 16), (110, 128, 128, 8)]
TARGET = 2.5


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                                "amx_tile") if x in have)
    except OSError:
        pass
    return "unknown"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _layer(N: int, C: int, K: int, H: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.relu(torch.randn(N, C, H, H, generator=g, dtype=torch.float64))
    w = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64) * (2.0 / (9 * C)) ** 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64) * 0.1
    return x, w, b


def _time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved_best(methods: dict, rounds: int, reps: int) -> dict:
    """Seconds per method: one warm-up call each, then ``rounds`` rounds over the methods in
    turn, each the best of ``reps`` calls; the minimum over rounds."""
    best = {k: float("inf") for k in methods}
    for fn in methods.values():
        fn()
    for _ in range(rounds):
        for name, fn in methods.items():
            best[name] = min(best[name], _time(fn, reps))
    return best


def _reps(N: int, C: int, K: int, H: int) -> int:
    """Calls per timing: about 50 ms of a 128-channel layer's work at 150 GFLOP/s, 1 to 20."""
    return max(1, min(20, int(0.05 / max(1e-6, N * C * K * H * H * 18 / 150e9))))


def measure(shape, rounds: int) -> dict:
    N, C, K, H = shape
    x64, w64, b64 = _layer(N, C, K, H)
    x, w, b = x64.float(), w64.float(), b64.float()
    U = winograd_weight(w)
    out = torch.empty(N, K, H, H)
    methods = {
        "conv2d": lambda: F.conv2d(x, w, b, padding=1),
        "winograd": lambda: conv3x3_winograd(x, U, b, 1),
        "winograd + out": lambda: conv3x3_winograd(x, U, b, 1, out=out),
    }
    reps = _reps(N, C, K, H)
    with torch.no_grad():
        best = interleaved_best(methods, rounds, reps)
        ref = F.conv2d(x64, w64, b64, padding=1)
        scale = float(ref.abs().max())
        err_direct = float((F.conv2d(x, w, b, padding=1).double() - ref).abs().max()) / scale
        err_wino = float((conv3x3_winograd(x, U, b, 1).double() - ref).abs().max()) / scale
    return {"shape": shape, "best": best, "reps": reps, "err_direct": err_direct,
            "err_wino": err_wino}


def measure_grad(shape, rounds: int) -> dict:
    """Filter gradient: oneDNN vs Winograd (recomputed V, kept V); times and errors."""
    N, C, K, H = shape
    x64, w64, _ = _layer(N, C, K, H)
    dy64 = torch.randn(N, K, H, H, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    x, w, dy = x64.float(), w64.float(), dy64.float()
    ws = WinogradWorkspace()
    _, kept = _conv3x3_winograd(x, winograd_weight(w), None, 1, None, 0, ws, keep=True)

    def onednn():
        return torch.ops.aten.convolution_backward(dy, x, w, [K], [1, 1], [1, 1], [1, 1], False,
                                                   [0, 0], 1, [False, True, False])[1]
    methods = {"onednn": onednn,
               "winograd": lambda: conv3x3_winograd_grad_weight(x, dy, 1),
               "winograd, kept V": lambda: conv3x3_winograd_grad_weight(x, dy, 1, workspace=ws,
                                                                        _kept=kept)}
    reps = _reps(N, C, K, H)
    best = interleaved_best(methods, rounds, reps)
    wr = w64.clone().requires_grad_(True)
    ref, = torch.autograd.grad(F.conv2d(x64, wr, padding=1), wr, dy64)
    scale = float(ref.abs().max())
    errs = {name: float((fn().double() - ref).abs().max()) / scale
            for name, fn in methods.items() if name != "winograd"}
    return {"shape": shape, "best": best, "reps": reps, "errs": errs, "kept": kept is not None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 rounds, print only, no results file")
    ap.add_argument("--out", default=str(HERE / "results" / "winograd_speed.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    load_before = _loadavg()
    t0 = time.time()
    rows = []
    for shape in SHAPES:
        r = measure(shape, rounds)
        rows.append(r)
        bt = r["best"]
        print(f"N={shape[0]} C={shape[1]} K={shape[2]} H={shape[3]}: "
              f"conv2d {bt['conv2d'] * 1e3:.3f} ms, "
              f"winograd {bt['conv2d'] / bt['winograd']:.2f}x, with out "
              f"{bt['conv2d'] / bt['winograd + out']:.2f}x; error {r['err_direct']:.1e} (direct) "
              f"{r['err_wino']:.1e} (winograd)", flush=True)
    grad_rows = []
    for shape in GRAD_SHAPES:
        r = measure_grad(shape, rounds)
        grad_rows.append(r)
        bt = r["best"]
        print(f"filter grad N={shape[0]} H={shape[3]}: oneDNN {bt['onednn'] * 1e3:.3f} ms, "
              f"winograd {bt['onednn'] / bt['winograd']:.2f}x, kept V "
              f"{bt['onednn'] / bt['winograd, kept V']:.2f}x", flush=True)
    load_after = _loadavg()
    if args.quick:
        return
    lines = [
        "# Winograd F(4x4, 3x3) vs F.conv2d on the CPU",
        "",
        "Written by `benchmarks/winograd_speed.py` (do not edit by hand). First table: forward "
        "only, no grad, "
        "float32, 3x3, stride 1, padding 1, ConvNet-like inputs (ReLU'd x, Kaiming-scaled w).",
        "",
        f"- machine: {machine_description()}",
        f"- CPU flags: {_cpu_flags()}; splatdd kernels: {_C().cpu_kernel_name()}",
        f"- torch threads: {torch.get_num_threads()}",
        f"- load average (1, 5, 15 min): {load_before} before, {load_after} after "
        f"({time.time() - t0:.0f} s); 2 cores shared with other jobs",
        f"- method: {rounds} interleaved rounds, each the best of `reps` calls per method; the "
        "minimum over rounds is kept. Ratios are conv2d time / method time from the same run.",
        "- `winograd`: `conv3x3_winograd(x, U, b)` with the transforms and GEMMs, excluding "
        "`winograd_weight` (computed once per weight); `+ out`: writing into a kept output tensor.",
        "- error: max |y - conv2d_float64| / max |conv2d_float64|.",
        "",
        "| N | C | K | H (= output) | reps | conv2d (ms) | winograd (ms) | ratio | + out (ms) "
        "| ratio | error conv2d | error winograd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        N, C, K, H = r["shape"]
        bt = r["best"]
        lines.append(
            f"| {N} | {C} | {K} | {H} | {r['reps']} | {bt['conv2d'] * 1e3:.3f} | "
            f"{bt['winograd'] * 1e3:.3f} | {bt['conv2d'] / bt['winograd']:.2f}x | "
            f"{bt['winograd + out'] * 1e3:.3f} | {bt['conv2d'] / bt['winograd + out']:.2f}x | "
            f"{r['err_direct']:.1e} | {r['err_wino']:.1e} |")
    lines += ["", f"Target (issue 15 helper brief): >= {TARGET}x end to end on 1 thread at "
              "(8, 128, 128, 16) and (256, 128, 128, 16):"]
    for r in rows:
        if r["shape"] in TARGET_SHAPES:
            bt = r["best"]
            plain, buf = bt["conv2d"] / bt["winograd"], bt["conv2d"] / bt["winograd + out"]
            verdict = ("met" if plain >= TARGET else
                       "met only with a kept output" if buf >= TARGET else "missed")
            lines.append(f"- {r['shape']}: {plain:.2f}x (fresh output), {buf:.2f}x (kept out): "
                         f"{verdict}")
    small = [r for r in rows if r["shape"][1] < 128]
    lines += ["", f"`winograd_available` requires C >= MIN_CHANNELS = {MIN_CHANNELS}; measured "
              "ratios at small C (8 images, 32 x 32, K = 128): " + ", ".join(
                  f"C={r['shape'][1]}: {r['best']['conv2d'] / r['best']['winograd']:.2f}x"
                  for r in small)]
    lines += ["", "## Filters' gradient (training)", "",
              "oneDNN's `convolution_backward` (weight only) against "
              "`conv3x3_winograd_grad_weight` (V recomputed) and with the forward's V kept in a "
              "`WinogradWorkspace` (splatdd.winograd_train's path; 110 images do not fit one "
              "chunk of tiles, so V is recomputed there too). Error: max |g - g_float64| / "
              "max |g_float64| (float64 autograd).", "",
              "| N | C | K | H | reps | oneDNN (ms) | winograd (ms) | ratio | kept V (ms) | ratio "
              "| error oneDNN | error winograd |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in grad_rows:
        N, C, K, H = r["shape"]
        bt = r["best"]
        lines.append(
            f"| {N} | {C} | {K} | {H} | {r['reps']} | {bt['onednn'] * 1e3:.3f} | "
            f"{bt['winograd'] * 1e3:.3f} | {bt['onednn'] / bt['winograd']:.2f}x | "
            f"{bt['winograd, kept V'] * 1e3:.3f} | "
            f"{bt['onednn'] / bt['winograd, kept V']:.2f}x | {r['errs']['onednn']:.1e} | "
            f"{r['errs']['winograd, kept V']:.1e} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
