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
    python benchmarks/render.py --baseline d888e79   # CPU backend now vs a baseline build, same
                                                # run; writes benchmarks/results/render_speed.{md,json}

Baseline mode (--baseline DIR_OR_REF): DIR is a folder holding a built splatdd ``_C*.so`` (or a
source tree with ``build/_C*.so``); otherwise the argument is a git revision whose ``cpp/``,
``cuda/`` and ``CMakeLists.txt`` are exported (``git archive``) into a temporary folder and built
there with CMake (CPU only). Both extension modules are loaded in this process and driven by the
same Python wrapper; for each workload the two are timed in interleaved rounds (forward, then
forward + backward), 1 thread, and the minimum over rounds is kept -- of the thread's CPU time
(``time.thread_time``: on a shared machine it excludes the time the thread waits for a core) and,
for reference, of the wall time. The results file also gives the achieved fraction of a measured
single-core FMA peak (a compiled loop of independent FMA chains at the widest vector width the CPU
has), counting the useful work only: samples inside the cut-off ellipses times the nominal flops
per sample of the current kernel (FMA = 2 flops).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import glob
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
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
    ext = sys.modules["splatdd.render"]._C()
    kernel = ext.cpu_kernel_name() if hasattr(ext, "cpu_kernel_name") else (
        os.environ.get("SPLATDD_CPU_KERNEL") or ("avx2" if {"avx2", "fma"} <= flags else "generic"))
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


# ----------------------------------------------------------------------------------------------
# baseline mode

REPO = HERE.parent
#: The issue-15 workloads: (B, N, px, sigma or None for the default size).
SPEED_CONFIGS = [(64, 170, 128, None), (1000, 170, 128, 0.1), (256, 22, 32, None)]
#: Nominal flops per sample inside the cut-off ellipse (FMA = 2) of a direct per-sample evaluation
#: in fp32: forward 25 (offset 2, exponent 3, clamp 1, 2^x 16, kernel and sum 3), backward 33 (the
#: same exponent and 2^x, masks 4, moments 7, chunk-level dot products amortised). Kept fixed across
#: revisions, so work the loops save (forward differencing, moments from column sums) shows as a
#: higher rate, and the rates of two revisions compare.
FLOPS_FWD, FLOPS_BWD = 25, 33


def find_module(folder: Path) -> Path | None:
    """A built extension ``_C*.so`` in `folder` or `folder`/build."""
    for pattern in ("_C*.so", "build/_C*.so", "build/*/_C*.so"):
        hits = sorted(glob.glob(str(folder / pattern)))
        if hits:
            return Path(hits[0])
    return None


def build_baseline(spec: str, workdir: Path) -> Path:
    """Path of the baseline extension: an existing build in folder `spec`, or git revision `spec`
    exported and built with CMake (CPU only) under `workdir`."""
    folder = Path(spec)
    if folder.is_dir():
        found = find_module(folder)
        if found is None:
            raise SystemExit(f"render.py: error: no built _C*.so in {folder} (or {folder}/build)")
        return found
    src = workdir / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", spec, "cpp", "cuda", "CMakeLists.txt"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"render.py: error: --baseline {spec!r} is neither a folder nor a git revision: "
                         + archive.stderr.decode(errors="replace").strip())
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    import pybind11  # the build requirement of the package itself

    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), *gen, "-DSPLATDD_CUDA=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(src / "build")], check=True, capture_output=True)
    found = find_module(src)
    if found is None:
        raise SystemExit(f"render.py: error: building {spec} produced no _C*.so")
    return found


def load_extension(path: Path, package: str):
    """Import the extension file `path` as module `package`._C (its init symbol is PyInit__C)."""
    spec = importlib.util.spec_from_file_location(f"{package}._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FMA_SRC = r"""
#include <immintrin.h>
extern "C" double fma_loop(long iters) {
#if defined(__AVX512F__)
  typedef __m512 V; const int lanes = 16;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define STORE(p, v) _mm512_storeu_ps(p, v)
#else
  typedef __m256 V; const int lanes = 8;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define STORE(p, v) _mm256_storeu_ps(p, v)
#endif
  V a[12];
  for (int i = 0; i < 12; ++i) a[i] = SET1(1.0f + 1e-3f * i);
  const V m = SET1(0.999999f), c = SET1(1e-7f);
  for (long it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) a[i] = FMA(a[i], m, c);
  V s = a[0];
  for (int i = 1; i < 12; ++i) s = ADD(s, a[i]);
  float out[16];
  STORE(out, s);
  return out[0] + 2.0 * 12.0 * lanes * (double)iters * 0.0;  // keep the loop alive
}
extern "C" int fma_lanes() {
#if defined(__AVX512F__)
  return 16;
#else
  return 8;
#endif
}
"""


def fma_peak_gflops(workdir: Path) -> tuple[float, str]:
    """Single-thread FMA peak: 12 independent FMA chains at the widest width this CPU runs,
    compiled here with -march=native. Returns (GFLOP/s, description)."""
    flags = cpu_flags()
    src = workdir / "fma.cpp"
    lib = workdir / "libfma.so"
    src.write_text(FMA_SRC)
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        return float("nan"), "no C++ compiler: not measured"
    arch = "-march=native" if "avx2" in flags else "-mavx2"
    subprocess.run([cxx, "-O2", arch, "-mfma", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.fma_loop.restype = ctypes.c_double
    dll.fma_loop.argtypes = [ctypes.c_long]
    lanes = dll.fma_lanes()
    iters = 20_000_000
    dll.fma_loop(iters // 10)
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        dll.fma_loop(iters)
        best = min(best, time.thread_time() - t0)
    gflops = 2.0 * 12 * lanes * iters / best / 1e9
    return gflops, f"{lanes}-lane fp32 FMA ({'AVX-512' if lanes == 16 else 'AVX2'}), 12 independent chains"


def count_samples(params: torch.Tensor, R: int, max_images: int = 64) -> float:
    """Samples inside the cut-off ellipses (d2 <= 16) per image, exactly, on up to `max_images`
    images (mean per image), with the reference's maths in fp64."""
    p = params[:max_images].double()
    Hs = Ws = SSAA * R
    sx, sy = 0.5 * Ws, 0.5 * Hs
    delta = reference.PREFILTER_VARIANCE
    total = 0.0
    xs = torch.arange(Ws, dtype=torch.float64) + 0.5
    for img in p:
        u, v, l11, l21, l22 = (img[:, q] for q in range(5))
        mx, my = (u + 1) * sx, (v + 1) * sy
        a = sx * sx * l11 * l11 + delta
        b = sx * sy * l11 * l21
        c = sy * sy * (l21 * l21 + l22 * l22) + delta
        det = a * c - b * b
        for k in range(img.shape[0]):
            dy = xs.view(-1, 1) - my[k]
            dx = xs.view(1, -1) - mx[k]
            d2 = (c[k] * dx * dx - 2 * b[k] * dx * dy + a[k] * dy * dy) / det[k]
            total += float((d2 <= reference.CUTOFF_D2).sum())
    return total / p.shape[0]


def time_pair(mods: dict, params: torch.Tensor, R: int, rounds: int) -> dict:
    """Interleaved rounds over the modules: min thread-CPU and wall seconds of fwd and fwd+bwd."""
    rm = sys.modules["splatdd.render"]
    v = torch.randn(params.shape[0], C, R, R, generator=torch.Generator().manual_seed(1))
    best = {k: {"fwd_cpu": float("inf"), "fwd_bwd_cpu": float("inf"), "fwd_wall": float("inf"),
                "fwd_bwd_wall": float("inf")} for k in mods}
    saved = rm._ext
    try:
        for _ in range(rounds):
            for name, mod in mods.items():
                rm._ext = mod
                w0, c0 = time.perf_counter(), time.thread_time()
                with torch.no_grad():
                    splatdd.render(params, R, R, ssaa=SSAA)
                w1, c1 = time.perf_counter(), time.thread_time()
                x = params.detach().requires_grad_(True)
                (splatdd.render(x, R, R, ssaa=SSAA) * v).sum().backward()
                w2, c2 = time.perf_counter(), time.thread_time()
                b = best[name]
                b["fwd_cpu"] = min(b["fwd_cpu"], c1 - c0)
                b["fwd_bwd_cpu"] = min(b["fwd_bwd_cpu"], c2 - c1)
                b["fwd_wall"] = min(b["fwd_wall"], w1 - w0)
                b["fwd_bwd_wall"] = min(b["fwd_bwd_wall"], w2 - w1)
    finally:
        rm._ext = saved
    return best


def run_baseline(args) -> int:
    """--baseline: the CPU backend now vs a baseline build, same process, interleaved rounds."""
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    rounds = args.repeats or (2 if args.quick else 5)
    configs = [(16, 170, 128, None), (16, 170, 128, 0.1), (64, 22, 32, None)] if args.quick else SPEED_CONFIGS
    with tempfile.TemporaryDirectory(prefix="splatdd-baseline-") as tmp:
        work = Path(tmp)
        base_path = build_baseline(args.baseline, work)
        mods = {"new": sys.modules["splatdd.render"]._C(), "base": load_extension(base_path, "splatdd_baseline")}
        peak, peak_desc = fma_peak_gflops(work)
        rows = []
        for B, N, R, sig in configs:
            params = make_params(B, N, sigma=sig)
            best = time_pair(mods, params, R, rounds)
            samples = count_samples(params, R, max_images=8 if args.quick else 32) * B
            new, base = best["new"], best["base"]
            flops = samples * (FLOPS_FWD + FLOPS_BWD)
            rows.append({
                "B": B, "N": N, "res": R, "sigma": sig if sig is not None else "default 0.5-1.5 x 1/sqrt(N)",
                "new_s": new["fwd_bwd_cpu"], "base_s": base["fwd_bwd_cpu"],
                "fwd_bwd_ratio_vs_baseline": base["fwd_bwd_cpu"] / new["fwd_bwd_cpu"],
                "fwd_new_s": new["fwd_cpu"], "fwd_base_s": base["fwd_cpu"],
                "fwd_ratio_vs_baseline": base["fwd_cpu"] / new["fwd_cpu"],
                "wall_new_s": new["fwd_bwd_wall"], "wall_base_s": base["fwd_bwd_wall"],
                "wall_fwd_bwd_ratio_vs_baseline": base["fwd_bwd_wall"] / new["fwd_bwd_wall"],
                "samples_in_ellipses": samples,
                "gflops": flops / new["fwd_bwd_cpu"] / 1e9,
                "fraction_of_peak": flops / new["fwd_bwd_cpu"] / 1e9 / peak,
            })
            print(json.dumps(rows[-1]), flush=True)
    load1 = os.getloadavg()
    main_rows = [r for r in rows if r["res"] == 128]
    result = {
        "configs": rows,
        "baseline": args.baseline,
        "fma_peak_gflops": peak,
        "fma_peak": peak_desc,
        "fraction_of_peak": max(r["fraction_of_peak"] for r in main_rows) if main_rows else None,
        "flops_per_sample": {"fwd": FLOPS_FWD, "bwd": FLOPS_BWD},
        "kernel": mods["new"].cpu_kernel_name() if hasattr(mods["new"], "cpu_kernel_name") else None,
        "machine": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "sse4", "amx"))),
        "threads": 1,
        "rounds": rounds,
        "load": {"start": list(load0), "end": list(load1)},
        "timer": "min over interleaved rounds of time.thread_time (CPU time of the one thread); wall in wall_*",
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
    }
    prefix = args.out or RESULTS / "render_speed"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    from splatdd.io_utils import atomic_write_text  # noqa: E402 -- files written atomically

    atomic_write_text(prefix.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    md = ["# CPU renderer speed: now vs baseline, same run", ""]
    how = ("a prebuilt extension in that folder" if Path(args.baseline).is_dir()
           else "built CPU-only from that revision's cpp/ and CMakeLists.txt")
    md += [f"- baseline: `{args.baseline}` ({how})",
           f"- CPU: {result['machine']}; CPU flags: {' '.join(result['cpu_flags'])}",
           f"- kernel now: {result['kernel']}; 1 thread; {rounds} interleaved rounds, minimum kept",
           f"- load average at start {', '.join(f'{x:.1f}' for x in load0)}, at end "
           f"{', '.join(f'{x:.1f}' for x in load1)} (shared 2-core machine)",
           f"- timer: CPU time of the rendering thread (`time.thread_time`); wall-clock ratios beside",
           f"- measured FMA peak: {peak:.1f} GFLOP/s ({peak_desc})",
           f"- torch {torch.__version__}, {result['date']}", "",
           "C = 3, ssaa = 2, prefilter on, fp32. fwd+bwd = render + backward of (out * v).sum().", "",
           "| B | N | px | sigma | fwd now s | fwd base s | fwd x | fwd+bwd now s | fwd+bwd base s | "
           "fwd+bwd x | wall x | GFLOP/s | of FMA peak |",
           "|" + "---|" * 13]
    for r in rows:
        sig = r["sigma"] if isinstance(r["sigma"], float) else "default"
        md.append(f"| {r['B']} | {r['N']} | {r['res']} | {sig} | {r['fwd_new_s']:.4f} | {r['fwd_base_s']:.4f} | "
                  f"{r['fwd_ratio_vs_baseline']:.2f} | {r['new_s']:.4f} | {r['base_s']:.4f} | "
                  f"**{r['fwd_bwd_ratio_vs_baseline']:.2f}** | {r['wall_fwd_bwd_ratio_vs_baseline']:.2f} | "
                  f"{r['gflops']:.1f} | {100 * r['fraction_of_peak']:.1f} % |")
    md += ["", "x = baseline time / time now (higher is faster). GFLOP/s counts useful work only: the "
           "samples inside the cut-off ellipses times a fixed nominal count per sample, that of a direct "
           f"per-sample evaluation ({FLOPS_FWD} forward + {FLOPS_BWD} backward, FMA = 2), so padding and "
           "masked lanes are overhead, not flops, and work the loops save shows as a higher rate."]
    atomic_write_text(prefix.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"wrote {prefix.with_suffix('.md')} and .json")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batches and sweeps (smoke test)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (backend and reference alike); default: torch's")
    ap.add_argument("--out", type=Path, default=None, help="results prefix (default benchmarks/results/render_<device>)")
    ap.add_argument("--baseline", default=None, metavar="DIR_OR_REF",
                    help="time the CPU backend against a baseline build (a folder with _C*.so, or a git "
                         "revision to build) in the same run; writes benchmarks/results/render_speed.{md,json}")
    args = ap.parse_args(argv)
    if args.baseline is not None:
        return run_baseline(args)
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
