"""ld3m end to end through the core: the registry, the distill loop with dm / dc / tm, the distilled
file, and the CLI (`splatdd distill --param ld3m`, `splatdd convert-ldm`). Skips only where a core
module or algorithm plugin is absent."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splatdd.plugin_api import DatasetSpec, RealData

SPEC = DatasetSpec("toy", 1, 16, 16, 2, (0.5,), (0.5,))


def _real(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(2 * n, 1, 16, 16, generator=g) * 0.5
    imgs[:n, :, :, :8] += 1.0  # class 0 brighter on the left
    labels = torch.arange(2).repeat_interleave(n)
    return RealData(SPEC, imgs, labels)


def _algo(name):
    from splatdd import registry

    try:
        return registry.get_algorithm(name)
    except registry.UnknownPluginError:
        pytest.skip(f"algorithm plugin {name!r} is not installed")


def _param(tiny_dir, real, **kw):
    from splatdd import registry

    cls = registry.get_parameterization("ld3m")
    kw = {"steps": 3, "noise": "fixed", "quantize": False, "clamp": False, **kw}
    p = cls.build(real.spec, 1, generator=torch.Generator().manual_seed(0), model_path=str(tiny_dir), **kw)
    g = torch.Generator().manual_seed(1)
    imgs = torch.stack([real.sample(int(c), 1, g)[0] for c in p.labels])
    p.init_from_real(imgs, p.labels)
    return p


def test_registry_finds_the_plugin_and_command():
    from splatdd import registry

    from splatdd_ld3m import LatentDiffusionImages
    from splatdd_ld3m.cli import register

    assert registry.get_parameterization("ld3m") is LatentDiffusionImages
    assert registry.get_command("ld3m") is register


def test_dm_end_to_end_with_distilled_file(tiny_dir, tmp_path):
    pytest.importorskip("splatdd.distill")
    from splatdd import distilled_file
    from splatdd.distill import distill

    real = _real()
    param = _param(tiny_dir, real)
    before = param.latents.detach().clone()
    algo = _algo("dm")(real, ipc=1, generator=torch.Generator().manual_seed(2), batch_real=4, dsa=False,
                       net_width=8)
    losses = []
    distill(param, algo, iterations=2, out_dir=tmp_path, checkpoint_every=1, progress=False,
            on_step=lambda step, loss, p, a: losses.append(loss))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(param.latents.detach(), before)
    d = distilled_file.load(tmp_path / "distilled.safetensors")
    assert d.meta["num_bytes"] == param.num_bytes() == 2 * (3 * 8 * 8 + 32) * 4
    torch.testing.assert_close(d.param.latents, param.latents)
    with torch.no_grad():
        torch.testing.assert_close(d.images(), param.decode())
    # resuming the finished run restores the module state, noise counter included
    distill(param, algo, iterations=3, out_dir=tmp_path, resume=True, checkpoint_every=0, progress=False)


@pytest.mark.parametrize("checkpointing", [True, "reentrant"])
def test_dc_end_to_end(tiny_dir, tmp_path, checkpointing):
    pytest.importorskip("splatdd.distill")
    from splatdd.distill import distill

    real = _real()
    param = _param(tiny_dir, real, checkpointing=checkpointing)
    before = param.latents.detach().clone()
    algo = _algo("dc")(real, ipc=1, generator=torch.Generator().manual_seed(3), net_width=8, batch_real=4,
                       outer_loop=1, inner_loop=1, batch_train=4, dsa=False)
    distill(param, algo, iterations=1, out_dir=tmp_path, checkpoint_every=0, progress=False, save_file=False)
    assert torch.isfinite(param.latents).all() and not torch.equal(param.latents.detach(), before)


@pytest.mark.parametrize("checkpointing", [True, "reentrant"])
def test_tm_end_to_end(tiny_dir, tmp_path, checkpointing):
    pytest.importorskip("splatdd.distill")
    pytest.importorskip("splatdd_tm")
    from splatdd.distill import distill
    from splatdd_tm.buffer import train_experts

    real = _real()
    train_experts(real, tmp_path / "buffer", experts=1, model="ConvNet", net_width=4, net_depth=2, epochs=2,
                  lr=0.01, batch_size=8, dsa=False, seed=0, progress=False)
    param = _param(tiny_dir, real, checkpointing=checkpointing)
    before = param.latents.detach().clone()
    algo = _algo("tm")(real, ipc=1, generator=torch.Generator().manual_seed(4), buffer_dir=str(tmp_path / "buffer"),
                       syn_steps=2, max_start_epoch=1, expert_epochs=1, lr_lr=1e-3)
    distill(param, algo, iterations=1, out_dir=tmp_path / "run", checkpoint_every=0, progress=False)
    assert torch.isfinite(param.latents).all() and not torch.equal(param.latents.detach(), before)


def test_cli_distill_and_convert(tiny_dir, tmp_path):
    cli = pytest.importorskip("splatdd.cli")
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("FashionMNIST is not installed")
    out = tmp_path / "run"
    rc = cli.main(["distill", "--param", "ld3m", "--algo", "dm", "--ipc", "1", "--iterations", "1",
                   "--param-opt", f"model_path={tiny_dir}", "--param-opt", "steps=2",
                   "--algo-opt", "batch_real=2", "--algo-opt", "dsa=false", "--algo-opt", "net_width=8",
                   "--eval-runs", "0", "--out", str(out), "--no-progress", "--checkpoint-every", "0"])
    assert rc == 0 and (out / "distilled.safetensors").is_file()
    png = tmp_path / "grid.png"
    assert cli.main(["render", str(out / "distilled.safetensors"), "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    from splatdd_ld3m.tiny import build_tiny_compvis_checkpoint

    ckpt, yml = build_tiny_compvis_checkpoint(tmp_path / "c.ckpt", num_classes=10)
    assert cli.main(["convert-ldm", str(ckpt), str(tmp_path / "conv"), "--config", str(yml)]) == 0
    assert (tmp_path / "conv" / "class_embedder" / "config.json").is_file()
