"""SirenImages: exact storage accounting, DDiF's architecture rule and budget."""
import pytest
import torch

from splatdd.budget import budget_bytes
from splatdd.plugin_api import REGIMES, DatasetSpec, check_plugin_class
from splatdd_siren import SirenImages, siren_param_count

FMNIST = DatasetSpec("fashion_mnist", 1, 28, 28, 10)
IN128 = DatasetSpec("imagenette", 3, 128, 128, 10)


def test_plugin_class_is_valid():
    check_plugin_class(SirenImages, "parameterization")
    assert SirenImages.name == "siren"


def test_param_count_matches_ddif():
    # DDiF at 128 px: 3 sine layers of width 20, RGB out: 963 floats (the GSDD paper's Table 5)
    assert siren_param_count(3, 20, 3) == 2 * 20 + 20 + 2 * (20 * 20 + 20) + 20 * 3 + 3 == 963
    assert siren_param_count(2, 6, 3) == 3 * 6 + 7 * 6 + 7 * 3 == 81


@pytest.mark.parametrize("spec,ipc", [(FMNIST, 1), (FMNIST, 10), (IN128, 1),
                                      (DatasetSpec("c", 3, 32, 32, 10), 50)])
def test_bytes_exact_and_within_budget(spec, ipc):
    s = SirenImages.build(spec, ipc)
    per = siren_param_count(s.layers, s.width, spec.channels)
    assert s.params_per_field == per
    assert s.num_bytes() == s.num_images * per * 4
    assert s.num_bytes() == sum(p.numel() for p in s.parameters()) * 4
    st = s.state_tensors()
    assert all(t.dtype == torch.float32 for t in st.values())
    assert sum(t.numel() * t.element_size() for t in st.values()) == s.num_bytes()
    assert s.num_bytes() <= budget_bytes(spec, ipc)
    assert (s.dpc + 1) * spec.num_classes * per * 4 > budget_bytes(spec, ipc)
    assert len(s.labels) == s.num_images == s.dpc * spec.num_classes


def test_default_architecture():
    s = SirenImages.build(IN128, 1)
    assert (s.layers, s.width, s.w0_initial, s.w0) == (3, 20, 30.0, 40.0)
    assert s.dpc == (128 * 128 * 3) // 963 == 51
    f = SirenImages.build(FMNIST, 1)
    assert (f.layers, f.width) == (2, 6)
    assert f.dpc == 784 // siren_param_count(2, 6, 1)
    with pytest.raises(TypeError, match="bogus"):
        SirenImages.build(FMNIST, 1, bogus=3)
    with pytest.raises(ValueError):
        SirenImages.build(FMNIST, 1, width=40)         # one field is bigger than the budget


def test_optimizer_spec():
    """DDiF: Adam lr 1e-4 on every field tensor under every regime; unknown regimes refused."""
    s = SirenImages.build(FMNIST, 1, dpc=1)
    for regime in REGIMES:
        spec = s.optimizer_spec(regime)
        assert spec.kind == "adam" and spec.params[0]["lr"] == 1e-4
        assert len(spec.params[0]["params"]) == 6
    assert s.optimizer_spec("trajectory", lr=1e-3).params[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="got 'tm'"):
        s.optimizer_spec("tm")
