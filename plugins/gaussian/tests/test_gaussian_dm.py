"""End to end with the dm algorithm on a tiny run: build, init from real, distil, save, load."""
import pytest
import torch

pytest.importorskip("splatdd_dm")
from splatdd.testing import run_tiny_distillation  # noqa: E402
from splatdd_gaussian import GaussianImages  # noqa: E402


def test_gaussian_with_dm_end_to_end(tmp_path):
    run = run_tiny_distillation(GaussianImages, "dm", tmp_path, gpc=2, watch="params",
                                algo_options=dict(batch_real=4, dsa=False, net_width=8))
    assert run.init_diag["mse"] < run.init_diag["mse_start"]
    run.check_finished()
    out = run.param
    assert not torch.equal(out.params.detach(), run.before)
    assert out.params[..., :2].abs().max() <= 1 - out.clip_eps
