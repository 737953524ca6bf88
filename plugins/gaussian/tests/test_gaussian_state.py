"""Save/load round trip renders identical images; from_state validates its input."""
import pytest
import torch

from splatdd.plugin_api import DatasetSpec
from splatdd_gaussian import GaussianImages

SPEC = DatasetSpec("toy", 3, 10, 10, 2)


def _trained(**kw):
    g = GaussianImages(SPEC, gpc=2, points=7, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        g.params.add_(torch.randn(g.params.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    return g


@pytest.mark.parametrize("kw", [{}, {"opacity": False}, {"bf16": False},
                                {"ssaa": 1, "prefilter": False}])
def test_round_trip_identical(kw):
    g = _trained(**kw)
    tensors, cfg = g.state_tensors(), g.config()
    import json
    cfg = json.loads(json.dumps(cfg))                  # config is JSON-serialisable
    h = GaussianImages.from_state(SPEC, tensors, cfg)
    assert torch.equal(h.decode(), g.decode().detach())
    assert h.num_bytes() == g.num_bytes()
    assert torch.equal(h.labels, g.labels)
    assert h.config() == g.config()


def test_round_trip_through_distilled_file(tmp_path):
    df = pytest.importorskip("splatdd.distilled_file")
    g = _trained()
    path = tmp_path / "d.safetensors"
    df.save(path, g, spec=SPEC, ipc=1, algorithm="none", algo_config={}, learned_lr=None,
            extra_meta={})
    loaded = df.load(path)
    assert torch.equal(loaded.param.decode(), g.decode().detach())


def test_from_state_errors():
    g = _trained()
    t, cfg = g.state_tensors(), g.config()
    with pytest.raises(ValueError, match="gaussians"):
        GaussianImages.from_state(SPEC, {}, cfg)
    with pytest.raises(ValueError, match="shape"):
        GaussianImages.from_state(SPEC, {"gaussians": t["gaussians"][:, :3]}, cfg)
    with pytest.raises(ValueError, match="dtype"):
        GaussianImages.from_state(SPEC, {"gaussians": t["gaussians"].float()}, cfg)
    bad = dict(cfg)
    del bad["points"]
    with pytest.raises(ValueError, match="points"):
        GaussianImages.from_state(SPEC, t, bad)
