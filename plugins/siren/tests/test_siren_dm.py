"""End to end with the dm algorithm on a tiny run: build, init from real, distil, save, load."""
import pytest
import torch

pytest.importorskip("splatdd_dm")
from splatdd.testing import run_tiny_distillation  # noqa: E402
from splatdd_siren import SirenImages  # noqa: E402


def test_siren_with_dm_end_to_end(tmp_path):
    run = run_tiny_distillation(SirenImages, "dm", tmp_path, dpc=2, watch="w_out",
                                algo_options=dict(batch_real=4, dsa=False, net_width=8))
    assert run.init_diag["mse"] < run.init_diag["mse_start"]
    run.check_finished()
    out = run.param
    assert not torch.equal(out.w_out.detach(), run.before)
