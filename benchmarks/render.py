"""Renderer speed: the compiled backend against the dense PyTorch reference, in the same run.

For three GSDD-like workloads (C = 3, 2x2 SSAA, prefilter on, fp32) we time the forward pass and
the forward + backward of a weighted-sum loss, in images per second:

* (B=256, N=22,  32 px)   (B=64, N=170, 128 px)   (B=16, N=364, 256 px)

The dense reference (:mod:`splatdd.reference`, every Gaussian at every sample -- what a user writes
by hand) needs N * (s H) * (s W) floats per intermediate and image, so it is run on a subset of the
batch (chunks of images) and reported per image; the subset is stated in the table. Then scaling
rows: time against B, against N (Gaussian size held fixed) and against resolution.

Gaussians are spread as a fitted image's are: centres uniform in the image, standard deviations
0.5..1.5 times half the spacing of a sqrt(N) x sqrt(N) grid, mild correlation, random colours and
opacities. Cost depends on the covered area, not on the values.

Timing: best of several runs (the minimum: the cores may be shared and other jobs only ever add
time), torch.get_num_threads() threads for both the backend and the reference.

    python benchmarks/render.py                 # CPU; writes benchmarks/results/render_cpu.{md,png}
    python benchmarks/render.py --quick         # smaller, for a smoke test
    python benchmarks/render.py --threads 1     # single-threaded (steadier on a loaded machine)
    python benchmarks/render.py --device cuda   # CUDA vs reference on the GPU vs CPU backend;
                                                # writes benchmarks/results/render_cuda.{md,png}
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

import splatdd
from splatdd import reference

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
C = 3
SSAA = 2


def make_params(B: int, N: int, *, sigma: float | None = None, seed: int = 0, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.empty(B, N, 6 + C)
    sig = sigma if sigma is not None else 1.0 / max(N, 1) ** 0.5  # half the grid spacing 2/sqrt(N)
    p[..., 0:2] = torch.rand(B, N, 2, generator=gen) * 2 - 1
    p[..., 2] = (0.5 + torch.rand(B, N, generator=gen)) * sig
    p[..., 4] = (0.5 + torch.rand(B, N, generator=gen)) * sig
    p[..., 3] = torch.randn(B, N, generator=gen) * 0.3 * sig
    p[..., 5 : 5 + C] = torch.randn(B, N, C, generator=gen) * 0.5
    p[..., 5 + C] = 0.2 + 0.8 * torch.rand(B, N, generator=gen)
    return p.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str, budget_s: float = 60.0) -> float:
    """Minimum wall time of `repeats` calls after one warm-up (fewer if they exceed budget_s)."""
    fn()
    sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return min(times)


def time_renderer(render_fn, params: torch.Tensor, R: int, repeats: int, device: str) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) for the whole `params` batch."""
    v = torch.randn(params.shape[0], C, R, R, device=params.device)

    def fwd():
        with torch.no_grad():
            render_fn(params, R, R, ssaa=SSAA)

    def fwd_bwd():
        x = params.detach().requires_grad_(True)
        (render_fn(x, R, R, ssaa=SSAA) * v).sum().backward()

    return best_time(fwd, repeats, device), best_time(fwd_bwd, repeats, device)


def backend_fn(backend: str):
    return lambda p, H, W, ssaa: splatdd.render(p, H, W, ssaa=ssaa, backend=backend)


def reference_fn(p, H, W, ssaa):
    return reference.render(p, H, W, ssaa=ssaa)


def ref_subset(B: int, N: int, R: int, max_elems: float) -> int:
    """Images of the batch the dense reference can take at once within ~max_elems floats."""
    per_image = N * (SSAA * R) ** 2
    return int(max(1, min(B, max_elems // per_image)))


def fmt(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_lines(device: str) -> list:
    flags = cpu_flags()
    kernel = os.environ.get("SPLATDD_CPU_KERNEL") or ("avx2" if {"avx2", "fma"} <= flags else "generic")
    lines = [
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible, torch threads "
        f"{torch.get_num_threads()}; CPU backend inner loops: {kernel}",
        f"- load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, splatdd {splatdd.__version__}",
    ]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batches and sweeps (smoke test)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (backend and reference alike); default: torch's")
    ap.add_argument("--out", type=Path, default=None, help="results prefix (default benchmarks/results/render_<device>)")
    args = ap.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and "cuda" not in splatdd.backends():
        print("CUDA backend not available (no GPU or splatdd built without CUDA)", file=sys.stderr)
        return 2
    repeats = args.repeats or (2 if args.quick else 5)
    prefix = args.out or RESULTS / f"render_{device}"
    prefix.parent.mkdir(parents=True, exist_ok=True)

    configs = [(256, 22, 32), (64, 170, 128), (16, 364, 256)]
    if args.quick:
        configs = [(64, 22, 32), (8, 170, 128), (2, 364, 256)]
    # dense reference: at most ~1.2e8 floats per intermediate on the CPU (its autograd graph holds
    # ~10 of them), 1e9 on a GPU
    ref_elems = 1.2e8 if device == "cpu" else 1.0e9

    md = ["# Renderer benchmark: compiled backend vs dense PyTorch reference", ""]
    md += machine_lines(device)
    md += ["", f"C = {C}, ssaa = {SSAA}, prefilter on, fp32 parameters; images/s (higher is better). "
           "Forward = render only (no autograd); fwd+bwd = render + backward of (out * v).sum(). "
           "The dense reference's rate is measured on the stated subset of the batch (its memory "
           "grows with N * (ssaa * px)^2 per image) and is per image like every other row; "
           "speed-ups are relative to it.", ""]
    head = "| workload | renderer | images timed | fwd img/s | fwd+bwd img/s | fwd speed-up | fwd+bwd speed-up |"
    md += [head, "|" + "---|" * 7]
    print("\n".join(md[2:6]))

    def row(cells):
        line = "| " + " | ".join(cells) + " |"
        md.append(line)
        print(line, flush=True)

    for B, N, R in configs:
        params = make_params(B, N, device=device)
        name = f"B={B}, N={N}, {R} px"
        runs = []
        fb, fbb = time_renderer(backend_fn(device), params, R, repeats, device)
        runs.append((f"splatdd {device}", B, fb, fbb))
        if device == "cuda":
            pc = params.cpu()
            fc, fcb = time_renderer(backend_fn("cpu"), pc, R, max(1, repeats // 2), "cpu")
            runs.append(("splatdd cpu", B, fc, fcb))
        k = ref_subset(B, N, R, ref_elems)
        sub = params[:k]
        fr, frb = time_renderer(reference_fn, sub, R, max(1, min(repeats, 3)), device)
        runs.append((f"dense reference ({device})" + ("" if k == B else f", {k} of {B} images"), k, fr, frb))
        if device == "cpu" and (B, N, R) == configs[1]:
            # the same backend with its plain per-sample loops and with baseline-x86-64 vectors
            for kern in ("generic", "simple"):
                os.environ["SPLATDD_CPU_KERNEL"] = kern
                try:
                    fk, fkb = time_renderer(backend_fn("cpu"), params, R, max(1, repeats // 2), "cpu")
                finally:
                    del os.environ["SPLATDD_CPU_KERNEL"]
                label = {"generic": "splatdd cpu, SSE2-only loops", "simple": "splatdd cpu, plain per-sample loops"}[kern]
                runs.append((label, B, fk, fkb))
        ref_f, ref_fb = k / fr, k / frb
        for label, n, f, fbk in runs:
            ips_f, ips_fb = n / f, n / fbk
            row([name, label, str(n), fmt(ips_f), fmt(ips_fb),
                 f"{ips_f / ref_f:,.0f}x", f"{ips_fb / ref_fb:,.0f}x"])

    # ------------------------------------------------------------------------------------------
    # scaling rows (backend only)
    md += ["", "## Scaling (backend only; seconds per call, best of runs)", ""]
    sweeps = {
        "B": [(b, 64, 64) for b in ((4, 8, 16, 32) if args.quick else (8, 16, 32, 64, 128, 256))],
        "N": [(16, n, 64) for n in ((16, 32, 64, 128) if args.quick else (16, 32, 64, 128, 256, 512, 1024))],
        "resolution": [(8, 64, r) for r in ((16, 32, 64) if args.quick else (16, 32, 64, 128, 256))],
    }
    fixed_sigma = 1.0 / 64 ** 0.5  # the N sweep keeps each Gaussian's size (so work grows with N)
    results = {}
    md += ["| sweep | B | N | px | fwd s | fwd+bwd s | fwd+bwd s per unit |", "|" + "---|" * 7]
    print("\n".join(md[-4:]))
    for sweep, pts in sweeps.items():
        results[sweep] = []
        for B, N, R in pts:
            params = make_params(B, N, sigma=fixed_sigma, seed=1, device=device)
            f, fb = time_renderer(backend_fn(device), params, R, repeats, device)
            unit = {"B": B, "N": N, "resolution": R * R}[sweep]
            results[sweep].append((B, N, R, f, fb))
            row([sweep, str(B), str(N), str(R), f"{f:.4f}", f"{fb:.4f}", f"{fb / unit:.3e}"])
    # linearity: least-squares slope of log(time) against log(size) (1 = linear; 2 for px, area)
    import math

    md += [""]
    for sweep, rows in results.items():
        xs = [math.log({"B": b, "N": n, "resolution": r}[sweep]) for b, n, r, _, _ in rows]
        ys = [math.log(fb) for *_, fb in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        what = "px (time ~ px^slope; 2 = proportional to the area)" if sweep == "resolution" else sweep
        line = f"- fwd+bwd log-log slope against {what}: {slope:.2f}"
        md.append(line)
        print(line)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, (sweep, rows) in zip(axes, results.items()):
            xs = [{"B": b, "N": n, "resolution": r}[sweep] for b, n, r, _, _ in rows]
            ax.loglog(xs, [f for *_, f, _ in rows], "o-", label="forward")
            ax.loglog(xs, [fb for *_, fb in rows], "s-", label="forward + backward")
            ref = rows[0][4]
            expo = 2 if sweep == "resolution" else 1
            ax.loglog(xs, [ref * (x / xs[0]) ** expo for x in xs], "k:", label=f"~ x^{expo}")
            fixed = {"B": "N=64, 64 px", "N": "B=16, 64 px, fixed size", "resolution": "B=8, N=64"}[sweep]
            ax.set_xlabel({"B": "images B", "N": "Gaussians per image N", "resolution": "pixels per side"}[sweep])
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel("seconds")
            ax.set_title(f"{device}: time vs {sweep} ({fixed})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        png = prefix.with_name(prefix.name + "_scaling.png")
        fig.savefig(png, dpi=110)
        md += ["", f"![scaling]({png.name})"]
    except ImportError:  # pragma: no cover
        md += ["", "(matplotlib not installed: no plot)"]

    out_md = prefix.with_suffix(".md")
    out_md.write_text("\n".join(md) + "\n")
    print(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
