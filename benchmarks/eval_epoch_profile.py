"""Where the evaluation epoch's time goes, and how far this design can go (issue 15).

speed.py's ``eval_epoch`` case (one training epoch of ConvNet-D3, width 128, on 110 FashionMNIST
images, passes of 16 images, one torch thread), taken apart in one process:

* ``compiled``: the epoch as train_network runs it by default, each step's passes in one
  compiled call (splatdd.convnet_step): its seconds, the seconds inside that call, and one
  pass's cost by its size; everything below takes apart the autograd path it replaced
  (``train_network(compiled=False)``), the same kernels driven from Python;
* ``epoch``: the autograd epoch's seconds, plain (minimum over ``--rounds``);
* ``in situ``: the same epoch with the Winograd layers' compiled transforms and ``torch.bmm``
  timed call by call (their seconds per epoch, and the GEMMs' floating-point work);
* ``passes``: one forward+backward pass of 1, 2, 4, 8 and 16 images, and the cost every pass
  has whatever its size;
* ``profiler``: torch.profiler's self CPU time by group (its own overhead inflates small ops, so
  these are shares of the profiled epoch, not seconds of a plain one);
* ``isolated``: the same GEMMs and transforms alone on warm buffers at the epoch's shapes, a
  2048^3 sgemm (this core's practical fp32 peak) and a copy of a V-sized buffer (the memory
  traffic a transform cannot avoid in this design);
* ``floor``: the epoch if its GEMMs ran at the best isolated rate (the sgemm's or their own) and
  its transforms at their isolated speed, everything else as measured: the best this layout (separate transforms and a
  batched GEMM per transform point) could do without touching the rest.

It reads benchmarks/results/speed.json (when present) for what the 5x target asks of the epoch,
as a fraction of that run's new side (ratios of different runs are not compared).

    python benchmarks/eval_epoch_profile.py                       # writes benchmarks/results/
    python benchmarks/eval_epoch_profile.py --rounds 2 --out /tmp/p   # a short look
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
GROUPS = (  # (name, test on a profiler key), first match wins
    ("Winograd GEMMs (bmm)", lambda k: k in ("aten::bmm", "aten::baddbmm")),
    ("Winograd layers: transforms and Python", lambda k: k.startswith("_WinogradConv")),
    ("first block, fused conv + norm + ReLU + pool", lambda k: k.startswith("_ConvNormActPool")),
    ("norm + ReLU + pool blocks", lambda k: k.startswith("_NormActPool")),
    ("filter transforms, weight-gradient back-transform, classifier (mm)",
     lambda k: k in ("aten::mm", "aten::addmm", "aten::flip")),
)
OTHER = "the rest: DSA, loss, optimiser, autograd, small ops"


@functools.lru_cache(maxsize=None)
def _bench(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"splatdd_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _best(fn: Callable[[], object], n: int) -> float:
    """Seconds of the fastest of ``n`` calls, after one warm-up call."""
    fn()
    return _bench("winograd_speed")._time(fn, n)


class _Timed:
    """splatdd.winograd's compiled module and torch.bmm with every call timed (and bmm's flops)."""

    def __init__(self, lib) -> None:
        self.lib, self.sec = lib, collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.flops = 0.0

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.sec[name] += time.perf_counter() - t0
            self.calls[name] += 1
            return out
        return timed

    def bmm(self, bmm):
        def timed(a, b, *args, **kw):
            t0 = time.perf_counter()
            out = bmm(a, b, *args, **kw)
            self.sec["bmm"] += time.perf_counter() - t0
            self.calls["bmm"] += 1
            self.flops += 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
            return out
        return timed


def measure(rounds: int) -> dict:
    import torch
    import splatdd.winograd as wg
    from splatdd.evaluate import train_network
    from splatdd.models import get_network

    torch.set_num_threads(1)
    sp = _bench("speed")
    train, _ = sp._fashion()
    x, y = sp._first_per_class(train, 11)
    net = get_network("ConvNet", 1, 10, (28, 28), seed=0)
    seed = iter(range(1, 10 ** 6))

    def epoch():
        train_network(net, x, y, epochs=1, seed=next(seed), compiled=False)

    import splatdd.convnet_step as cs
    step_fn, step_s = cs.loss_backward, []

    def compiled_epoch():
        t = [0.0]

        def timed_step(*args, **kw):
            t0 = time.perf_counter()
            out = step_fn(*args, **kw)
            t[0] += time.perf_counter() - t0
            return out
        cs.loss_backward = timed_step
        try:
            t0 = time.perf_counter()
            train_network(net, x, y, epochs=1, seed=next(seed))
            return time.perf_counter() - t0, t[0]
        finally:
            cs.loss_backward = step_fn

    epoch()
    compiled_epoch()
    plain, situ, comp = [], [], []
    lib, bmm, make_lib = wg._C(), torch.bmm, wg._C
    for _ in range(rounds):                       # plain, compiled and timed epochs interleaved
        plain.append(_best(epoch, 1))
        comp.append(compiled_epoch())
        timed = _Timed(lib)
        wg._C, torch.bmm = (lambda: timed), timed.bmm(bmm)
        try:
            t0 = time.perf_counter()
            epoch()
            wall = time.perf_counter() - t0
        finally:
            wg._C, torch.bmm = make_lib, bmm
        situ.append((wall, dict(timed.sec), dict(timed.calls), timed.flops))
    wall, sec, calls, flops = min(situ, key=lambda s: s[0])

    from torch.profiler import ProfilerActivity, profile
    n_prof = max(2, rounds)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_prof):
            epoch()
    groups = collections.defaultdict(float)
    for ev in prof.key_averages():
        name = next((g for g, test in GROUPS if test(ev.key)), OTHER)
        groups[name] += ev.self_cpu_time_total / 1e6 / n_prof
    profiled = sum(groups.values())
    # the transforms sit inside the Winograd layers' self time: split them out at the in-situ share
    tr_situ = sum(v for k, v in sec.items() if k != "bmm")
    wl = GROUPS[1][0]
    groups["  (part of the line above: its compiled transforms, at their in-situ share)"] = \
        min(groups[wl], tr_situ * profiled / wall)

    passes = _pass_costs(net, x, y)
    passes["epoch_by_pass_images"] = _epochs_by_pass_size(epoch_fn=lambda c: train_network(
        net, x, y, epochs=1, seed=next(seed), chunk=c, compiled=False),
        rounds=max(3, rounds // 2))
    c_wall, c_step = min(comp)
    compiled = {"epoch_s": c_wall, "step_call_s": c_step,
                "passes": _pass_costs(net, x, y, compiled=True)}
    iso = _isolated(torch, wg, lib)
    gemm_floor = flops / iso["peak_flops"]
    tr_iso = iso["transforms_epoch_s"]
    epoch_s = min(plain)
    floor = epoch_s - sec.get("bmm", 0.0) * epoch_s / wall - tr_situ * epoch_s / wall \
        + gemm_floor + tr_iso
    return {"epoch_s": epoch_s, "situ": {"wall_s": wall, "seconds": sec, "calls": calls,
                                        "gemm_flops": flops},
            "profile": {"epochs": n_prof, "profiled_epoch_s": profiled,
                        "groups_s": dict(groups)},
            "isolated": iso, "floor_s": floor, "gemm_floor_s": gemm_floor, "passes": passes,
            "compiled": compiled}


def _epochs_by_pass_size(epoch_fn, rounds: int, sizes=(16, 32, 55, 110)) -> dict:
    """The epoch's seconds (minimum over interleaved rounds) with passes of each size."""
    best = _bench("winograd_speed").interleaved_best(
        {n: (lambda n=n: epoch_fn(n)) for n in sizes}, rounds, 1)
    return {str(n): v for n, v in best.items()}


def _pass_costs(net, x, y, sizes=(1, 2, 4, 8, 16), reps: int = 15, compiled: bool = False) -> dict:
    """Seconds of one forward+backward pass (as the epoch runs them: through autograd, or with
    ``compiled`` the compiled step) of n images, and the least-squares line ``a + b n`` through
    them: ``a`` is what every pass costs whatever its size (the weight-sized work: each pass's
    GEMMs read the transformed filters again)."""
    import splatdd.evaluate as ev
    from splatdd.models import first_order
    net.train()
    sec = {}
    with first_order(net):
        for n in sizes:
            xb, yb = x[:n].contiguous(), y[:n].contiguous()
            sec[n] = _best(lambda: ev._loss_backward(net, xb, yb, None, compiled=compiled),
                           reps)
    net.zero_grad(set_to_none=True)
    k = len(sizes)
    mx, my = sum(sizes) / k, sum(sec.values()) / k
    b = sum((n - mx) * (sec[n] - my) for n in sizes) / sum((n - mx) ** 2 for n in sizes)
    return {"seconds": {str(n): v for n, v in sec.items()}, "fixed_s": my - b * mx,
            "per_image_s": b}


def _isolated(torch, wg, lib) -> dict:
    """The epoch's GEMMs and transforms alone on warm buffers, one pass of 16 images (112 =
    7 passes, the last of 14, counted as 7 full ones), and a 2048^3 sgemm."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    sgemm = 2 * 2048 ** 3 / _best(lambda: a @ b, 5)
    C = K = 128
    out: dict = {"sgemm_flops": sgemm, "layers": []}
    tr_epoch = gemm_epoch = 0.0
    for H in (16, 8):
        n, T = 16, (H // 4) ** 2
        rows = -(-n * T // 16) * 16
        x, dy = torch.randn(n, C, H, H), torch.randn(n, K, H, H)
        U, V, M = torch.randn(36, K, C), torch.randn(36, C, rows), torch.randn(36, K, rows)
        y, dV, dU = torch.empty(n, K, H, H), torch.empty(36, C, rows), torch.empty(36, K, C)
        flops = 2.0 * 36 * K * C * rows
        g = {"forward": _best(lambda: torch.bmm(U, V, out=M), 20),
             "input gradient": _best(lambda: torch.bmm(U.transpose(1, 2), M, out=dV), 20),
             "filter gradient": _best(lambda: torch.bmm(M, V.transpose(1, 2), out=dU), 20)}
        t = {"input": _best(lambda: lib.winograd_input_transform(
                 x.data_ptr(), n, C, H, H, 1, rows, V.data_ptr(), 1, 0), 20),
             "output": _best(lambda: lib.winograd_output_transform(
                 M.data_ptr(), rows, 0, n, K, H, H, y.data_ptr(), 1, 0), 20),
             "grad": _best(lambda: lib.winograd_grad_transform(
                 dy.data_ptr(), n, K, H, H, rows, M.data_ptr(), 1, 0), 20)}
        copy = _best(lambda: V.copy_(M), 20)
        # per pass: forward input + output, backward grad + (input gradient's) input + output
        per_pass = 2 * t["input"] + 2 * t["output"] + t["grad"]
        tr_epoch += 7 * per_pass
        gemm_epoch += 7 * sum(g.values())
        out["layers"].append({"H": H, "images": n, "tiles": rows, "gemm_s": g,
                              "gemm_gflops": {k: flops / v / 1e9 for k, v in g.items()},
                              "transform_s": t, "copy_v_s": copy, "v_bytes": V.numel() * 4})
    # the 16x16 layer's forward GEMM again with cold operands: 8 sets of U, V, M (~94 MB) in turn
    sets = [(torch.randn(36, K, C), torch.randn(36, C, 256), torch.empty(36, K, 256))
            for _ in range(8)]
    turn = iter(range(10 ** 9))

    def cold():
        u, v, m = sets[next(turn) % len(sets)]
        torch.bmm(u, v, out=m)
    out["cold_forward_gflops"] = 2.0 * 36 * K * C * 256 / _best(cold, 40) / 1e9
    # this core's fp32 GEMM rate: the best of the sgemm and the epoch's GEMMs alone
    out["peak_flops"] = max([sgemm] + [1e9 * v for L in out["layers"]
                                       for v in L["gemm_gflops"].values()])
    out["transforms_epoch_s"] = tr_epoch
    out["gemms_epoch_s"] = gemm_epoch
    # the forward GEMM of the 16x16 layer in bfloat16 (AMX or AVX-512 bf16 where the CPU has them;
    # torch's CPU bmm then returns bfloat16, so this is a rate, not a usable fp32 path)
    from splatdd.precision import bf16_native
    if bf16_native("cpu"):
        rows = 256
        Ub, Vb = torch.randn(36, K, C).bfloat16(), torch.randn(36, C, rows).bfloat16()
        out["bf16_gflops"] = 2.0 * 36 * K * C * rows / _best(lambda: torch.bmm(Ub, Vb), 20) / 1e9
        out["fp32_gflops_same_shape"] = out["layers"][0]["gemm_gflops"]["forward"]
    return out


def target_fraction(path: Path) -> dict | None:
    """What the eval-epoch target asks, from speed.json: base / 5 as a fraction of new."""
    try:
        fig = json.loads(path.read_text())["figures"]["eval_epoch"]
        return {"base_s": fig["base_s"], "new_s": fig["new_s"], "target": 5.0,
                "fraction": fig["base_s"] / 5.0 / fig["new_s"]}
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return None


def markdown(r: dict) -> str:
    ms = lambda s: f"{1e3 * s:.1f}"                                      # noqa: E731
    us = lambda s: f"{1e6 * s:.0f}"                                      # noqa: E731
    e, situ, prof, iso = r["epoch_s"], r["situ"], r["profile"], r["isolated"]
    lines = ["# Where the evaluation epoch's time goes (issue 15)", "",
             "Written by `benchmarks/eval_epoch_profile.py`. " + r["machine"], ""]
    c = r.get("compiled")
    if c:
        cp = c["passes"]
        lines += ["## The epoch as train_network runs it: each step in one compiled call", "",
                  f"With `splatdd.convnet_step` (the default): **{ms(c['epoch_s'])} ms** per "
                  f"epoch, {c['epoch_s'] / e:.0%} of the autograd path's {ms(e)} ms (minimum of "
                  f"{r['rounds']} interleaved rounds each). Of it, {ms(c['step_call_s'])} ms "
                  "inside the step (the kernels and GEMMs of every pass, the loss, the filters' "
                  "transforms), the other "
                  f"{ms(c['epoch_s'] - c['step_call_s'])} ms the epoch's Python: DSA, the "
                  "optimiser, shuffling.", "",
                  "One pass by its number of images, compiled: " + ", ".join(
                      f"{k}: {ms(v)} ms" for k, v in cp["seconds"].items())
                  + f"; a line through them: {ms(cp['fixed_s'])} ms per pass plus "
                  f"{ms(cp['per_image_s'])} ms per image.", "",
                  "The rest of this report takes apart the autograd path "
                  "(`train_network(compiled=False)`), the same kernels driven from Python, "
                  "which the compiled step replaced.", ""]
    lines += [f"Plain epoch through autograd (minimum of {r['rounds']} rounds): **{ms(e)} ms**.",
              "",
             "## In situ (the compiled transforms and torch.bmm timed call by call)", "",
             "| part | ms per epoch | calls | share of the timed epoch |", "|---|---|---|---|"]
    for k, v in sorted(situ["seconds"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {ms(v)} | {situ['calls'][k]} | {v / situ['wall_s']:.0%} |")
    rest = situ["wall_s"] - sum(situ["seconds"].values())
    lines += [f"| everything else | {ms(rest)} | | {rest / situ['wall_s']:.0%} |",
              f"| the timed epoch | {ms(situ['wall_s'])} | | |", "",
              f"The GEMMs do {situ['gemm_flops'] / 1e9:.2f} GFLOP per epoch: "
              f"{situ['gemm_flops'] / situ['seconds'].get('bmm', float('nan')) / 1e9:.0f} GFLOP/s "
              f"in situ, against {iso['sgemm_flops'] / 1e9:.0f} GFLOP/s for a 2048^3 sgemm on this "
              "core.", "",
              f"## torch.profiler, self CPU time by group ({prof['epochs']} epochs)", "",
              "| group | share of the profiled epoch |", "|---|---|"]
    for k, v in sorted(prof["groups_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v / prof['profiled_epoch_s']:.0%} |")
    ps = r.get("passes")
    if ps:
        lines += ["", "## One pass (forward + backward) by its number of images", "",
                  "| images | " + " | ".join(ps["seconds"]) + " |",
                  "|---|" + "---|" * len(ps["seconds"]),
                  "| ms | " + " | ".join(ms(v) for v in ps["seconds"].values()) + " |", "",
                  f"A line through them: {ms(ps['fixed_s'])} ms per pass whatever its size plus "
                  f"{ms(ps['per_image_s'])} ms per image. The epoch runs 7 passes (110 images in "
                  f"16s), so about {ms(7 * ps['fixed_s'])} ms of it is per-pass cost: the "
                  "weight-sized work (each pass's GEMMs read the transformed filters again, from "
                  "memory, and the filters' gradient is written and transformed back per pass) "
                  "and the pass's fixed overheads."]
        if ps.get("epoch_by_pass_images"):
            by = ps["epoch_by_pass_images"]
            lines += ["", "The whole epoch with passes of other sizes (fewer passes, colder "
                      "activations; minimum over interleaved rounds):", "",
                      "| images per pass | " + " | ".join(by) + " |",
                      "|---|" + "---|" * len(by),
                      "| epoch ms | " + " | ".join(ms(v) for v in by.values()) + " |"]
    lines += ["", "## Isolated, warm buffers, one pass of 16 images", "",
              "| plane | tiles | GEMM GFLOP/s: forward / input grad / filter grad "
              "| transforms µs: input / output / grad | copy of V (µs, MB) |",
              "|---|---|---|---|---|"]
    for L in iso["layers"]:
        g, t = L["gemm_gflops"], L["transform_s"]
        lines.append(f"| {L['H']}x{L['H']} | {L['tiles']} | {g['forward']:.0f} / "
                     f"{g['input gradient']:.0f} / {g['filter gradient']:.0f} | "
                     f"{us(t['input'])} / {us(t['output'])} / {us(t['grad'])} | "
                     f"{us(L['copy_v_s'])}, {L['v_bytes'] / 1e6:.1f} |")
    if "cold_forward_gflops" in iso:
        lines += ["", f"The 16x16 forward GEMM with cold operands (8 sets of buffers used in turn, "
                  f"about 94 MB): {iso['cold_forward_gflops']:.0f} GFLOP/s, against "
                  f"{iso['layers'][0]['gemm_gflops']['forward']:.0f} warm."]
    lines += ["", "Compare each transform with the copy of V beside it: a transform that takes about "
              "as long is bound by memory traffic (V and M hold 2.25x the activations' values), "
              "not by its arithmetic.", "",
              *([f"In bfloat16 the 16x16 layer's forward GEMM runs at {iso['bf16_gflops']:.0f} "
                 f"GFLOP/s on this CPU ({iso['bf16_gflops'] / iso['fp32_gflops_same_shape']:.1f}x "
                 "float32's). torch's CPU bmm returns bfloat16, though; an fp32-accurate use "
                 "(each float split into bfloat16 parts, three products summed in float32 by "
                 "the cblas_gemm_bf16bf16f32 of torch's own MKL) was measured slower than one "
                 "float32 GEMM at these shapes (docs/speed.md).", ""]
                if "bf16_gflops" in iso else []),
              "## The floor of the autograd path's design", "",
              f"With every GEMM at {iso['peak_flops'] / 1e9:.0f} GFLOP/s, the best rate above "
              f"({ms(r['gemm_floor_s'])} ms), and the "
              f"transforms at their isolated speed ({ms(iso['transforms_epoch_s'])} ms), "
              f"the rest as measured, the epoch would take **{ms(r['floor_s'])} ms, "
              f"{r['floor_s'] / e:.0%} of the autograd epoch's**."]
    if c:
        lines += ["", f"The compiled step's epoch is {c['epoch_s'] / e:.0%} of the autograd "
                  "epoch's: it removes the framework's cost around the same kernels (the "
                  "\"everything else\" row above, less the epoch's own Python), which this floor "
                  "keeps."]
    t = r.get("target")
    if t:
        verdict = (f"5x needs the epoch at **{t['fraction']:.0%}** of that run's new side"
                   if t["fraction"] < 1 else
                   f"that run makes 5x with {t['fraction'] - 1:.0%} to spare")
        lines += ["", f"speed.md's run (benchmarks/results/speed.json) measured the base at "
                  f"{t['base_s']:.3f} s and the new side at {t['new_s']:.3f} s "
                  f"({t['base_s'] / t['new_s']:.2f}x): {verdict}. Fractions, not seconds, are "
                  "compared across the two runs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="plain / timed epoch pairs (min kept)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render --out/eval_epoch_profile.md from its JSON")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    if a.report_only:
        from splatdd.io_utils import atomic_write_text
        r = json.loads((a.out / "eval_epoch_profile.json").read_text())
        atomic_write_text(a.out / "eval_epoch_profile.md", markdown(r))
        return 0
    import torch
    from splatdd.runtime import cpu_model
    load0 = os.getloadavg()
    r = measure(a.rounds)
    r["rounds"] = a.rounds
    r["target"] = target_fraction(HERE / "results" / "speed.json")
    r["machine"] = (f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch "
                    f"{torch.__version__}, 1 torch thread; load average "
                    f"{load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.")
    from splatdd.io_utils import atomic_write_text
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "eval_epoch_profile.json", json.dumps(r, indent=2) + "\n")
    atomic_write_text(a.out / "eval_epoch_profile.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
