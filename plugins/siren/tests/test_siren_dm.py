"""End to end with the dm algorithm on a tiny run: build, init from real, distil, save, load."""
import math

import pytest
import torch

from splatdd.plugin_api import DatasetSpec, RealData

dm = pytest.importorskip("splatdd_dm")
distill_mod = pytest.importorskip("splatdd.distill")
from splatdd_siren import SirenImages  # noqa: E402


def test_siren_with_dm_end_to_end(tmp_path):
    gen = torch.Generator().manual_seed(0)
    spec = DatasetSpec("toy", 3, 16, 16, 2, (0.0,) * 3, (1.0,) * 3)
    images = torch.randn(20, 3, 16, 16, generator=gen)
    labels = torch.arange(2).repeat_interleave(10)
    real = RealData(spec, images, labels)
    param = SirenImages.build(spec, 1, dpc=2, generator=gen, init_steps=5)
    init = torch.cat([images[:2], images[10:12]])
    diag = param.init_from_real(init, param.labels)
    assert diag["mse"] < diag["mse_start"]
    algo = dm.DistributionMatching(real, ipc=1, generator=torch.Generator().manual_seed(1),
                                   batch_real=4, dsa=False, width=8)
    before = param.w_out.detach().clone()
    losses = []
    out = distill_mod.distill(param, algo, iterations=2, out_dir=tmp_path, checkpoint_every=0,
                              progress=False, on_step=lambda step, loss, p, a: losses.append(loss))
    assert len(losses) == 2 and all(math.isfinite(float(x)) for x in losses)
    assert not torch.equal(out.w_out.detach(), before)
    files = list(tmp_path.glob("*.safetensors"))
    if files:
        from splatdd.distilled_file import load
        loaded = load(files[0])
        assert torch.equal(loaded.param.decode(), out.decode().detach())
