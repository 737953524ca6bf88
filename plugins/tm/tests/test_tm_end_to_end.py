"""tm end to end, found through the registry, with every installed parameterization (each built with
its own quick_options, never with options keyed on its name), through the core's distill loop; the learned lr lands in the distilled file. And `splatdd buffer` from the CLI."""
import gzip
import struct

import numpy as np
import pytest
import torch

from splatdd.plugin_api import learned_eval_lr
from splatdd.testing import (build_quick, init_from_real_samples, installed_parameterizations,
                             parameterization_class)
from splatdd_tm import ExpertBuffer, TrajectoryMatching


def test_registry_finds_tm_and_buffer_command():
    from splatdd import registry
    assert registry.get_algorithm("tm") is TrajectoryMatching
    from splatdd_tm.cli import register
    assert registry.get_command("tm") is register


@pytest.mark.parametrize("pname", installed_parameterizations())
def test_tm_end_to_end(pname, make_real, tiny_buffer, quick_workdir, tmp_path):
    pytest.importorskip("splatdd.distill")
    from splatdd import distilled_file, registry
    from splatdd.distill import distill

    real = make_real()
    pcls = parameterization_class(pname)
    acls = registry.get_algorithm("tm")
    param = build_quick(pcls, real.spec, 1, quick_workdir)
    init_from_real_samples(param, real, steps=5)
    before = param.decode().detach().clone()
    algo = acls(real, ipc=1, generator=torch.Generator().manual_seed(0),
                buffer_dir=str(tiny_buffer), syn_steps=3, max_start_epoch=2, lr_lr=1e-3)
    distill(param, algo, iterations=3, out_dir=tmp_path, checkpoint_every=2, progress=False)
    after = param.decode().detach()
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
    assert learned_eval_lr(algo) == algo.learned_lr() != pytest.approx(0.01, abs=0)
    d = distilled_file.load(tmp_path / "distilled.safetensors")
    assert d.learned_lr == pytest.approx(algo.learned_lr())
    assert d.algorithm == "tm"


def _write_idx(path, arr, magic_type):
    arr = np.asarray(arr)
    header = struct.pack(">BBBB", 0, 0, magic_type, arr.ndim) + b"".join(
        struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_buffer_command(tmp_path, capsys):
    pytest.importorskip("splatdd.cli")
    pytest.importorskip("splatdd.data")
    from splatdd.cli import main

    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    for split, n in (("train", 40), ("t10k", 10)):
        y = np.arange(n) % 10
        x = rng.integers(0, 255, size=(n, 8, 8))
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", x, 0x08)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", y, 0x08)
    out = tmp_path / "buf"
    args = ["buffer", "--dataset", "mnist", "--data-root", str(root), "--experts", "2",
            "--epochs", "2", "--net-width", "4", "--net-depth", "2", "--batch", "16", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 experts in" in text and "tm student unroll" in text
    buf = ExpertBuffer.open(out)
    assert buf.num_experts == 2 and buf.epochs == 2 and buf.config["lr"] == 0.01
    # running it again resumes: nothing left to train
    assert main(args) == 0
    assert "2 of 2 experts already done" in capsys.readouterr().out
    # a missing buffer is a clean CLI error for distill, not a traceback
    assert main(["buffer", "--dataset", "mnist", "--data-root", str(root), "--experts", "1",
                 "--epochs", "2", "--net-width", "4", "--net-depth", "2", "--lr", "0.5", "--out",
                 str(out), "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err
