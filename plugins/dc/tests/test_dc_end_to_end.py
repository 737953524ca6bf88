"""dc end to end, found through the registry, with every installed parameterization (each built
with its own quick_options, never with options keyed on its name), through the core's distill loop
(checkpoint + resume + distilled file)."""
import pytest
import torch

from splatdd.testing import (build_quick, init_from_real_samples, installed_parameterizations,
                             parameterization_class)
from splatdd_dc import GradientMatching


def test_registry_finds_dc():
    from splatdd import registry
    assert registry.get_algorithm("dc") is GradientMatching


@pytest.mark.parametrize("pname", installed_parameterizations())
def test_dc_end_to_end(pname, real, quick_workdir, tmp_path):
    pytest.importorskip("splatdd.distill")
    from splatdd import distilled_file, registry
    from splatdd.distill import distill

    pcls = parameterization_class(pname)
    acls = registry.get_algorithm("dc")
    param = build_quick(pcls, real.spec, 2, quick_workdir)
    init_from_real_samples(param, real, steps=5)
    before = param.decode().detach().clone()

    def make_algo():
        return acls(real, ipc=2, generator=torch.Generator().manual_seed(0), net_width=8,
                    net_depth=2, batch_real=16, inner_loop=2)   # outer_loop 2 (by IPC)

    algo = make_algo()
    distill(param, algo, iterations=2, out_dir=tmp_path, checkpoint_every=1, progress=False)
    # resume to 3 iterations (the third starts a fresh network: outer_loop is 2)
    param2 = build_quick(pcls, real.spec, 2, quick_workdir)
    distill(param2, make_algo(), iterations=3, out_dir=tmp_path, checkpoint_every=1,
            resume=True, progress=False)
    after = param2.decode().detach()
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)
    d = distilled_file.load(tmp_path / "distilled.safetensors")
    assert d.learned_lr is None
    assert d.algorithm == "dc"
