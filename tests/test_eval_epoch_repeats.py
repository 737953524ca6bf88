"""benchmarks/eval_epoch_repeats.py's summary and report (the runs themselves are benchmarks)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("splatdd_bench_eval_epoch_repeats",
                                              REPO / "benchmarks" / "eval_epoch_repeats.py")
rep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rep)


def _run(base, new):
    return {"utc": "05:00", "load_start": 0.5, "load_end": 0.9, "base_s": base, "new_s": new,
            "ratio": base / new}


def test_summary_median_range_and_count_at_target():
    runs = [_run(0.45, 0.08), _run(0.42, 0.10), _run(0.48, 0.094), _run(0.4, 0.08)]
    s = rep.summarise(runs)
    assert s["runs"] == 4 and s["target"] == 5.0
    assert s["median_ratio"] == pytest.approx((0.48 / 0.094 + 5.0) / 2)
    assert s["min_ratio"] == pytest.approx(4.2) and s["max_ratio"] == pytest.approx(5.625)
    assert s["at_target"] == 3                      # 5.625, 5.11 and 5.0 (the target counts)


def test_markdown_lists_every_run_and_the_median():
    runs = [_run(0.45, 0.08), _run(0.42, 0.10)]
    md = rep.markdown({"machine": "Machine: test.", "rounds": 7, "epochs": 5,
                       "base_rev": "d888e79", "new_rev": "abc1234", "runs": runs,
                       "summary": rep.summarise(runs)})
    assert "| 1 | 05:00 | 0.50, 0.90 | 0.450 | 0.080 | 5.62 |" in md
    assert "| 2 | 05:00 | 0.50, 0.90 | 0.420 | 0.100 | 4.20 |" in md
    assert "Median ratio **4.91x** over 2 runs (from 4.20x to 5.62x); 1 of 2 at or above" in md
    assert "--rounds 7 --epochs 5" in md and "new abc1234" in md


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        rep.main(["--runs", "0"])
