"""benchmarks/eval_epoch_profile.py's parts that need no epoch: the call timer (against torch.bmm
and the flop count of its shapes), the target's fraction from speed.json, the report."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("splatdd_bench_eval_epoch_profile",
                                                  REPO / "benchmarks" / "eval_epoch_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prof = _load()


def test_timed_bmm_returns_bmm_and_counts_its_flops():
    class Lib:
        def twice(self, v):
            return 2 * v
    timed = prof._Timed(Lib())
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    out = torch.empty(3, 4, 6)
    r = timed.bmm(torch.bmm)(a, b, out=out)
    assert r is out and torch.equal(out, torch.bmm(a, b))
    timed.bmm(torch.bmm)(a, b)
    assert timed.flops == 2 * (2.0 * 3 * 4 * 5 * 6) and timed.calls["bmm"] == 2
    assert timed.twice(21) == 42 and timed.calls["twice"] == 1 and timed.sec["twice"] >= 0
    with pytest.raises(AttributeError):
        timed.missing


def test_target_fraction(tmp_path):
    p = tmp_path / "speed.json"
    p.write_text(json.dumps({"figures": {"eval_epoch": {"base_s": 0.5, "new_s": 0.125}}}))
    t = prof.target_fraction(p)
    assert t["fraction"] == pytest.approx(0.5 / 5 / 0.125)
    assert prof.target_fraction(tmp_path / "none.json") is None
    p.write_text("{not json")
    assert prof.target_fraction(p) is None
    p.write_text(json.dumps({"figures": {}}))
    assert prof.target_fraction(p) is None


def test_markdown_names_every_part_and_the_floor():
    layer = {"H": 16, "tiles": 256, "gemm_gflops": {"forward": 150.0, "input gradient": 140.0,
                                                    "filter gradient": 130.0},
             "transform_s": {"input": 4e-4, "output": 3e-4, "grad": 3e-4}, "copy_v_s": 4e-4,
             "v_bytes": 4718592}
    r = {"machine": "Machine: test.", "rounds": 3, "epoch_s": 0.15, "floor_s": 0.12,
         "gemm_floor_s": 0.05,
         "situ": {"wall_s": 0.16, "seconds": {"bmm": 0.07, "winograd_input_transform": 0.01},
                  "calls": {"bmm": 42, "winograd_input_transform": 28}, "gemm_flops": 7.8e9},
         "profile": {"epochs": 3, "profiled_epoch_s": 0.2,
                     "groups_s": {name: 0.02 for name, _ in prof.GROUPS} | {prof.OTHER: 0.1}},
         "isolated": {"sgemm_flops": 1.45e11, "peak_flops": 1.5e11, "transforms_epoch_s": 0.016, "layers": [layer]},
         "passes": {"seconds": {"1": 0.005, "16": 0.020}, "fixed_s": 0.004, "per_image_s": 0.001,
                    "epoch_by_pass_images": {"16": 0.15, "110": 0.16}},
         "target": {"base_s": 0.572, "new_s": 0.144, "target": 5.0, "fraction": 0.794}}
    md = prof.markdown(r)
    for name, _ in prof.GROUPS:
        assert name in md
    assert "(minimum of 3 rounds): **150.0 ms**" in md
    assert "| everything else | 80.0 |" in md and "111 GFLOP/s in situ" in md
    assert "**120.0 ms, 80% of the autograd epoch's**" in md and "**79%**" in md
    r2 = {**r, "target": {**r["target"], "fraction": 1.13}}
    assert "that run makes 5x with 13% to spare" in prof.markdown(r2)
    assert "compiled call" not in md                      # no compiled figures given
    r["compiled"] = {"epoch_s": 0.105, "step_call_s": 0.1,
                     "passes": {"seconds": {"1": 0.003, "16": 0.015}, "fixed_s": 0.0022,
                                "per_image_s": 0.0008}}
    md = prof.markdown(r)
    assert "each step in one compiled call" in md and "**105.0 ms** per epoch, 70% of" in md
    assert "100.0 ms inside the step" in md and "other 5.0 ms" in md
    assert "1: 3.0 ms, 16: 15.0 ms" in md and "2.2 ms per pass plus 0.8 ms per image" in md
    assert "| 16x16 | 256 | 150 / 140 / 130 | 400 / 300 / 300 | 400, 4.7 |" in md
    assert "| ms | 5.0 | 20.0 |" in md and "| epoch ms | 150.0 | 160.0 |" in md and "4.0 ms per pass whatever its size plus 1.0 ms" in md


def test_pass_costs_line_goes_through_two_sizes():
    from splatdd.models import get_network
    net = get_network("ConvNet", 1, 10, (28, 28), seed=0)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 7])
    r = prof._pass_costs(net, x, y, sizes=(1, 2), reps=1)
    s1, s2 = r["seconds"]["1"], r["seconds"]["2"]
    assert s1 > 0 and s2 > 0
    assert r["fixed_s"] + r["per_image_s"] == pytest.approx(s1)
    assert r["fixed_s"] + 2 * r["per_image_s"] == pytest.approx(s2)
    assert all(p.grad is None for p in net.parameters())     # leaves no gradient behind


def test_epochs_by_pass_size_keeps_each_sizes_minimum():
    calls = []
    r = prof._epochs_by_pass_size(calls.append, rounds=2, sizes=(16, 32))
    assert calls == [16, 32, 16, 32, 16, 32] and set(r) == {"16", "32"}
    assert all(v >= 0 for v in r.values())
