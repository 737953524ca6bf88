"""End to end with the dm algorithm on a tiny run: build, init from real, distil, save, load."""
import math

import pytest
import torch

pytest.importorskip("splatdd_dm")
from splatdd.testing import run_tiny_distillation  # noqa: E402
from splatdd_gaussian import GaussianImages  # noqa: E402


def test_gaussian_with_dm_end_to_end(tmp_path):
    run = run_tiny_distillation(GaussianImages, "dm", tmp_path, gpc=2, watch="params",
                                algo_options=dict(batch_real=4, dsa=False, width=8))
    assert run.init_diag["mse"] < run.init_diag["mse_start"]
    out = run.param
    assert len(run.losses) == 2 and all(math.isfinite(float(x)) for x in run.losses)
    assert not torch.equal(out.params.detach(), run.before)
    assert out.params[..., :2].abs().max() <= 1 - out.clip_eps
    files = list(tmp_path.glob("*.safetensors"))
    if files:
        from splatdd.distilled_file import load
        loaded = load(files[0])
        assert torch.equal(loaded.param.decode(), out.decode().detach())
