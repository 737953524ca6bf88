"""Batched decoding equals a per-image loop; init fitting; save/load; any resolution."""
import json

import pytest
import torch
import torch.nn.functional as F

from splatdd.plugin_api import DatasetSpec
from splatdd_siren import SirenImages, coordinate_grid

SPEC = DatasetSpec("toy", 3, 9, 7, 2)


def _field_loop(s, i, coords):
    """One field evaluated on its own with plain matmuls (the reference)."""
    h = torch.sin(s.w0_initial * (coords @ s.w_in[i] + s.b_in[i]))
    for layer in range(s.layers - 1):
        h = torch.sin(s.w0 * (h @ s.w_hidden[i, layer] + s.b_hidden[i, layer]))
    return h @ s.w_out[i] + s.b_out[i]


@pytest.mark.parametrize("layers,width", [(1, 4), (2, 6), (3, 5)])
def test_batched_decode_equals_loop(layers, width):
    s = SirenImages(SPEC, dpc=3, layers=layers, width=width, w0=10.0,
                    generator=torch.Generator().manual_seed(layers))
    out = s.decode()
    assert out.shape == (6, 3, 9, 7)
    coords = coordinate_grid(9, 7)
    for i in range(6):
        ref = _field_loop(s, i, coords).T.reshape(3, 9, 7)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    sub = s.decode(torch.tensor([4, 0]))
    torch.testing.assert_close(sub, out[[4, 0]], rtol=1e-6, atol=1e-6)


def test_coordinates():
    c = coordinate_grid(3, 2)
    assert c.tolist() == [[-1, -1], [1, -1], [-1, 0], [1, 0], [-1, 1], [1, 1]]


def test_any_resolution_samples_the_same_field():
    s = SirenImages(SPEC, dpc=1, layers=2, width=4, w0=5.0)
    big = s.decode(resolution=(17, 13))                # linspace grid: every 2nd sample is shared
    assert big.shape == (2, 3, 17, 13)
    torch.testing.assert_close(big[:, :, ::2, ::2], s.decode(), rtol=1e-5, atol=1e-5)


def test_init_from_real_reduces_mse():
    s = SirenImages(SPEC, dpc=2, layers=2, width=8, w0=10.0,
                    generator=torch.Generator().manual_seed(0))
    real = torch.rand(4, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    diag = s.init_from_real(real, s.labels, steps=60)
    assert diag["mse"] < 0.5 * diag["mse_start"]
    assert F.mse_loss(s.decode(), real).item() == pytest.approx(diag["mse"], rel=1e-5)
    with pytest.raises(ValueError):
        s.init_from_real(real[:3], s.labels[:3], steps=1)


def test_gradients_flow_to_every_tensor():
    s = SirenImages(SPEC, dpc=1, layers=3, width=4)
    s.decode().square().sum().backward()
    for name, p in s.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_round_trip_identical():
    s = SirenImages(SPEC, dpc=2, layers=3, width=5, generator=torch.Generator().manual_seed(3))
    cfg = json.loads(json.dumps(s.config()))
    t = s.state_tensors()
    r = SirenImages.from_state(SPEC, t, cfg)
    assert torch.equal(r.decode(), s.decode().detach())
    assert r.num_bytes() == s.num_bytes()
    with pytest.raises(ValueError, match="w_out"):
        SirenImages.from_state(SPEC, {k: v for k, v in t.items() if k != "w_out"}, cfg)
    bad = dict(t)
    bad["w_in"] = t["w_in"][:1]
    with pytest.raises(ValueError, match="shape"):
        SirenImages.from_state(SPEC, bad, cfg)


def test_round_trip_through_distilled_file(tmp_path):
    df = pytest.importorskip("splatdd.distilled_file")
    s = SirenImages(SPEC, dpc=1, layers=2, width=4)
    df.save(tmp_path / "s.safetensors", s, spec=SPEC, ipc=1, algorithm="none", algo_config={},
            learned_lr=None, extra_meta={})
    loaded = df.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.param.decode(), s.decode().detach())
