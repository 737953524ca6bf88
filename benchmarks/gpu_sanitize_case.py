"""One small forward + backward through the CUDA backend, for compute-sanitizer (memcheck,
racecheck): few enough Gaussians to run in seconds under instrumentation, but covering the paths
that can go wrong -- a ragged batch with empty images first, in the middle and last, sizes that are
not multiples of the 16-sample tile, ssaa 1 and 4, C = 1 and 3, fp32 and fp64, and one tile holding
more than 256 Gaussians (the staging batch loop). Each output and gradient is also compared with the
CPU backend, so a wrong result fails the run even when the sanitizer is silent.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize_case.py
    python benchmarks/gpu_sanitize_case.py --device cpu      # the same cases, CPU backend only
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

#: (name, counts per image, C, H, W, ssaa, dtype, crowded)
CASES = (
    ("ragged fp32 C=3 ssaa=2 20x13", (0, 7, 0, 12, 0), 3, 20, 13, 2, torch.float32, False),
    ("fp32 C=1 ssaa=4 17x5", (9, 4), 1, 17, 5, 4, torch.float32, False),
    ("fp64 C=3 ssaa=1 28x28", (6, 0, 5), 3, 28, 28, 1, torch.float64, False),
    ("crowded tile: 300 Gaussians, fp32 C=3 ssaa=1 8x8", (300,), 3, 8, 8, 1, torch.float32, True),
)


def make_case(counts: Sequence[int], C: int, dtype: torch.dtype, crowded: bool, seed: int) -> torch.Tensor:
    """``(sum counts, 6 + C)`` parameters (fixed seed); ``crowded`` packs them into one tile."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    p = torch.empty(n, 6 + C, dtype=torch.float64)
    spread = 0.2 if crowded else 1.1
    p[:, 0:2] = (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    p[:, 2] = 0.05 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64)
    p[:, 4] = 0.05 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64)
    p[:, 3] = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    p[:, 5:5 + C] = torch.randn(n, C, generator=gen, dtype=torch.float64)
    p[:, 5 + C] = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    return p.to(dtype)


def fwd_bwd(params: torch.Tensor, counts: Sequence[int], H: int, W: int, ssaa: int,
            v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Render on params' device, backward of (out * v).sum(); both returned on the CPU."""
    import splatdd

    x = params.detach().clone().requires_grad_(True)
    out = splatdd.render(x, H, W, ssaa=ssaa, counts=list(counts))
    (out * v.to(out.device, out.dtype)).sum().backward()
    return out.detach().cpu(), x.grad.detach().cpu()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (plain max |a - b| when b is all zero)."""
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    d = (a - b).abs().max().item()
    return d / scale if scale > 0 else d


def run_cases(device: str) -> list[tuple[str, float, float]]:
    """(case name, output error, gradient error) against the CPU backend for every case."""
    results = []
    for i, (name, counts, C, H, W, s, dtype, crowded) in enumerate(CASES):
        p = make_case(counts, C, dtype, crowded, seed=i)
        v = torch.randn(len(counts), C, H, W, generator=torch.Generator().manual_seed(100 + i))
        out_ref, g_ref = fwd_bwd(p, counts, H, W, s, v)
        out, g = fwd_bwd(p.to(device), counts, H, W, s, v)
        results.append((name, rel_err(out, out_ref), rel_err(g, g_ref)))
    if device == "cuda":
        torch.cuda.synchronize()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative error (fp32; fp64 gets tol^2)")
    args = ap.parse_args(argv)
    import splatdd

    if args.device not in splatdd.backends():
        print(f"gpu_sanitize_case: error: backend {args.device!r} not usable here "
              f"(splatdd.backends() = {splatdd.backends()})", file=sys.stderr)
        return 2
    bad = 0
    for (name, eo, eg), case in zip(run_cases(args.device), CASES):
        tol = args.tol ** 2 if case[6] == torch.float64 else args.tol
        ok = eo <= tol and eg <= tol
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: output rel err {eo:.2e}, grad rel err {eg:.2e} (tol {tol:.0e})")
    print(f"gpu_sanitize_case: {len(CASES) - bad} of {len(CASES)} cases match the CPU backend")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
