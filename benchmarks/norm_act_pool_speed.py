"""The fused ConvNet blocks (splatdd.norm_act_pool) of this tree against a baseline build of the
same ops, on the CPU, one torch thread.

Ops and shapes (batch 16, ConvNet width 128, as in the evaluation's training passes):

* ``conv_instance_norm_act_pool`` (the fused first block: 3x3 convolution from the image's 1 or 3
  channels -> instance norm -> ReLU -> 2x2 average pool): 28 px, 1 channel, padding 1 (28 x 28
  planes); 28 px, 1 channel, padding 3 (32 x 32 planes: ConvNet's FashionMNIST padding); 32 px,
  3 channels, padding 1 (CIFAR);
* ``instance_norm_act_pool`` (the later blocks): 128-channel planes of 28, 14, 7, 32, 16, 8 px;
* for scale, one training pass (forward, loss, backward inside ``first_order``) of the whole
  ConvNet-3 on 16 FashionMNIST-sized images (its blocks run at 32, 16 and 8 px).

Each is timed forward only (no graph) and forward + backward (the evaluation's training pass:
the parameters want gradients; for the norm block x does too, and one first-block case also asks
for the image's gradient, as distillation does). The baseline is another Python whose splatdd
has the old build (for example a venv with ``git worktree add BASE <commit>`` installed
editable). Both sides run in subprocesses, alternated round by round so that both see the same
background load, and each case keeps its minimum over rounds (the cores are shared; other jobs
only add time). Ratios are baseline time / this tree's time (> 1: this tree is faster).

    python benchmarks/norm_act_pool_speed.py --baseline-python BASE_VENV/bin/python \\
        --baseline-label "caf5c34"      # writes benchmarks/results/norm_act_pool_speed.md
    python benchmarks/norm_act_pool_speed.py --baseline-python ... --quick    # prints only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (label, kind, shape, padding, wants_x_grad); kind "conv": shape = the image batch (N, Cin, H, W)
# and 128 output channels; kind "norm": shape = the block's input (N, C, H, W).
CASES = [
    ("first block 1->128, 28 px, pad 1 (28x28)", "conv", (16, 1, 28, 28), 1, False),
    ("first block 1->128, 28 px, pad 3 (32x32, FashionMNIST)", "conv", (16, 1, 28, 28), 3, False),
    ("first block 3->128, 32 px, pad 1 (32x32, CIFAR)", "conv", (16, 3, 32, 32), 1, False),
    ("first block 1->128, 28 px, pad 3, image grad", "conv", (16, 1, 28, 28), 3, True),
    ("norm block 128 x 28x28", "norm", (16, 128, 28, 28), 0, True),
    ("norm block 128 x 14x14", "norm", (16, 128, 14, 14), 0, True),
    ("norm block 128 x 7x7", "norm", (16, 128, 7, 7), 0, True),
    ("norm block 128 x 32x32", "norm", (16, 128, 32, 32), 0, True),
    ("norm block 128 x 16x16", "norm", (16, 128, 16, 16), 0, True),
    ("norm block 128 x 8x8", "norm", (16, 128, 8, 8), 0, True),
]
BF16_CASES = [("norm block 128 x 14x14, bf16", (16, 128, 14, 14)),
              ("norm block 128 x 16x16, bf16", (16, 128, 16, 16)),
              ("norm block 128 x 7x7, bf16", (16, 128, 7, 7)),
              ("norm block 128 x 8x8, bf16", (16, 128, 8, 8))]


def _best(fn, repeats: int, inner: int) -> float:
    """Minimum over ``repeats`` of the mean seconds of ``inner`` back-to-back calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def worker(repeats: int, inner: int) -> dict:
    """Times every case with this interpreter's splatdd; {"file": ..., "times": {name: s}}."""
    import torch
    import splatdd
    from splatdd.norm_act_pool import conv_instance_norm_act_pool, instance_norm_act_pool

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    times = {}
    for label, kind, shape, pad, wants_x in CASES:
        if kind == "conv":
            x = torch.rand(*shape, generator=gen)
            k = 128
            params = [torch.randn(k, shape[1], 3, 3, generator=gen) / 3,
                      torch.randn(k, generator=gen) / 10, torch.rand(k, generator=gen) + 0.5,
                      torch.randn(k, generator=gen) / 10]

            def call(x=x, params=params, pad=pad):
                return conv_instance_norm_act_pool(x, *params, padding=pad)
        else:
            x = torch.randn(*shape, generator=gen) * 2 + 0.5
            c = shape[1]
            params = [torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) / 10]

            def call(x=x, params=params):
                return instance_norm_act_pool(x, *params)
        with torch.no_grad():
            times[f"{label} | forward"] = _best(call, repeats, inner)
        xg = x.clone().requires_grad_(wants_x)
        pg = [p.clone().requires_grad_() for p in params]
        with torch.no_grad():
            g = torch.randn(call(xg, pg).shape, generator=gen)

        def train_step(xg=xg, pg=pg, g=g):
            for t in [xg] + pg:
                t.grad = None
            call(xg, pg).backward(g)
        times[f"{label} | forward + backward"] = _best(train_step, repeats, inner)
    # the whole network: one training pass of ConvNet-3 on 16 FashionMNIST-sized images inside
    # first_order (how the evaluation trains), all of its layers included
    from splatdd.models import first_order, get_network
    net = get_network("ConvNet", 1, 10, 28, seed=0)
    xs = torch.rand(16, 1, 28, 28, generator=gen)
    ys = torch.randint(0, 10, (16,), generator=gen)

    def net_step():
        net.zero_grad(set_to_none=True)
        with first_order(net):
            torch.nn.functional.cross_entropy(net(xs), ys).backward()
    times["ConvNet-3, 16 x 1x28x28 (first_order) | training pass"] = _best(net_step, repeats, inner)
    for label, shape in BF16_CASES:
        x = (torch.randn(*shape, generator=gen) * 2 + 0.5).bfloat16()
        w, b = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen) / 10
        with torch.no_grad():
            times[f"{label} | forward"] = _best(lambda: instance_norm_act_pool(x, w, b),
                                                repeats, inner)
    return {"file": splatdd.__file__, "times": times}


def run_side(python: str, repeats: int, inner: int) -> dict:
    out = subprocess.run([python, str(Path(__file__).resolve()), "--worker",
                          "--repeats", str(repeats), "--inner", str(inner)],
                         check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-python", help="a Python whose splatdd is the baseline build")
    ap.add_argument("--baseline-label", default="baseline", help="what the baseline is (for the report)")
    ap.add_argument("--label", default="this tree", help="what this tree is (for the report)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 rounds, print only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "norm_act_pool_speed.md")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.repeats, args.inner)))
        return
    if not args.baseline_python:
        ap.error("--baseline-python is required")
    rounds = 2 if args.quick else args.rounds
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    best: dict[str, dict[str, float]] = {"new": {}, "base": {}}
    files = {}
    for r in range(rounds):
        order = (("new", sys.executable), ("base", args.baseline_python))
        for side, py in (order if r % 2 == 0 else order[::-1]):
            res = run_side(py, args.repeats, args.inner)
            files[side] = res["file"]
            for k, v in res["times"].items():
                best[side][k] = min(best[side].get(k, float("inf")), v)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    load_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    if files["new"] == files["base"]:
        raise SystemExit("both sides imported the same splatdd: " + files["new"])

    import torch
    from splatdd.fit import machine_description
    from splatdd.io_utils import atomic_write_text
    torch.set_num_threads(1)
    rows = ["| case | pass | baseline ms | this tree ms | baseline / this tree |",
            "|---|---|---:|---:|---:|"]
    for key in best["new"]:
        case, kind = key.split(" | ")
        b, n = best["base"][key] * 1e3, best["new"][key] * 1e3
        rows.append(f"| {case} | {kind} | {b:.3f} | {n:.3f} | {b / n:.2f}x |")
    text = "\n".join([
        "# Fused ConvNet blocks: this tree against a baseline build",
        "",
        "Written by `benchmarks/norm_act_pool_speed.py`. Batch 16, 128 channels, float32 unless "
        "noted; 1 torch thread; each figure is the minimum over "
        f"{rounds} interleaved rounds of the best of {args.repeats} x {args.inner} calls "
        "(per call). Forward: no graph. Forward + backward: the parameters want gradients, and "
        "x for the norm block and the 'image grad' case.",
        "",
        f"- machine: {machine_description()}",
        f"- baseline: {args.baseline_label}; this tree: {args.label}",
        f"- load average (1, 5, 15 min) before: {' '.join(load_before)}; after: {' '.join(load_after)}",
        "",
        *rows,
        "",
    ])
    print(text)
    if not args.quick:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
