"""``splatdd train-ldm`` (splatdd_ld3m.train) on a tiny synthetic IDX dataset: a few steps write a
loadable diffusers directory, an interrupted run resumes bit-exactly, bad settings are refused."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from splatdd_ld3m.train import TrainLDMConfig, train_ldm


def _write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    head = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    """40 train / 10 test 28x28 images of 10 classes (class k: a bright square at a k-dependent place)."""
    root = tmp_path_factory.mktemp("fmnist_tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 10)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            r, c = 2 + 2 * k, 4 + k
            x[i, r:r + 8, c:c + 8] = 230
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", y.astype(np.uint8))
    return root


def _cfg(out: Path, root: Path, **kw) -> TrainLDMConfig:
    base = dict(out_dir=str(out), data_root=str(root), ae_channels=(8, 8, 8), unet_channels=(16, 16),
                latent_channels=3, ae_steps=3, ae_batch_size=4, unet_steps=5, unet_batch_size=4,
                warmup_steps=2, checkpoint_every=2, sample_every=4, sample_steps=2, samples_per_class=1)
    base.update(kw)
    return TrainLDMConfig(**base)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for comp in ("vae", "unet", "class_embedder"):
        for k, v in load_file(str(model_dir / comp / "diffusion_pytorch_model.safetensors")).items():
            out[f"{comp}.{k}"] = v
    return out


def test_train_writes_a_loadable_ldm_the_parameterization_uses(tmp_path, idx_root):
    from splatdd.plugin_api import DatasetSpec
    from splatdd_ld3m import LatentDiffusionImages
    from splatdd_ld3m.ldm import load_ldm

    out = tmp_path / "ldm"
    lines: list[str] = []
    train_ldm(_cfg(out, idx_root), log=lines.append, log_every=1)
    ldm = load_ldm(out)
    assert (ldm.vae_kind, ldm.conditioning, ldm.latent_size, ldm.image_size) == ("kl", "time_embedding", 8, 32)
    assert ldm.class_embedder.num_classes == 10 and ldm.class_embedder.null_class == 10
    manifest = json.loads((out / "splatdd_ld3m.json").read_text())
    assert manifest["train"]["unet_steps"] == 5 and manifest["dataset"] == "fashion_mnist"
    # the saved scaling factor whitens the encoded train latents (1 / their std)
    std = manifest["history"][0]["latent_std"]
    assert ldm.scale_factor == pytest.approx(1.0 / std, rel=1e-6)
    # progress lines with an ETA; grids during training and at the end
    assert any(line.startswith("[unet] step 5/5") and "ETA" in line for line in lines)
    work = tmp_path / "ldm.work"
    assert (work / "samples" / "unet-step000004.png").stat().st_size > 0
    assert (work / "samples" / "final.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the ld3m parameterization runs on it (model_path=DIR), gradients reach Z and c
    spec = DatasetSpec("fashion_mnist", 1, 28, 28, 10, (0.2861,), (0.3530,))
    p = LatentDiffusionImages.build(spec, 1, model_path=str(out), steps=3)
    x = p.decode()
    assert x.shape == (10, 1, 28, 28) and torch.isfinite(x).all()
    x.square().mean().backward()
    assert p.latents.grad.abs().sum() > 0 and p.class_embeddings.grad.abs().sum() > 0
    assert p.class_embeddings.shape[1] == ldm.class_embedder.embed_dim == 64


class _Stop(Exception):
    pass


def _stop_when(prefix: str):
    """A log callback that interrupts training at the progress line starting with ``prefix``."""
    def log(line: str) -> None:
        if line.startswith(prefix):
            raise _Stop
    return log


def test_interrupted_training_resumes_bit_exactly(tmp_path, idx_root):
    """Stop after UNet step 3 (checkpoint at step 2), rerun: the final weights equal an uninterrupted
    run's exactly."""
    full = tmp_path / "full"
    train_ldm(_cfg(full, idx_root), log=lambda s: None, log_every=1)

    cut = tmp_path / "cut"

    with pytest.raises(_Stop):
        train_ldm(_cfg(cut, idx_root), log=_stop_when("[unet] step 3/"), log_every=1)
    assert not cut.exists() and (tmp_path / "cut.work" / "checkpoint.pt").is_file()
    lines: list[str] = []
    train_ldm(_cfg(cut, idx_root), log=lines.append, log_every=1)
    assert lines[0].startswith("resumed from") and "phase unet, step 2" in lines[0]
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_unet_at_exports_early_and_a_rerun_continues_the_schedule(tmp_path, idx_root):
    """stop_unet_at=4 of 5 writes a model (recorded in its manifest) and keeps the checkpoint
    resumable; rerunning without it continues to step 5 and equals an uninterrupted run."""
    full = tmp_path / "full"
    train_ldm(_cfg(full, idx_root, checkpoint_every=1), log=lambda s: None)
    early = tmp_path / "early"
    train_ldm(_cfg(early, idx_root, checkpoint_every=1, stop_unet_at=4), log=lambda s: None)
    man = json.loads((early / "splatdd_ld3m.json").read_text())
    assert man["stop_unet_at"] == 4 and man["history"][-1] == {"phase": "unet", "stopped_at": 4, "of": 5}
    a4 = _weights(early)
    # the directory holds an early export of these same settings: the rerun may replace it without
    # overwrite (scripts/train_ldm.sh resumes with the same command)
    lines: list[str] = []
    train_ldm(_cfg(early, idx_root, checkpoint_every=1), log=lines.append, log_every=1)
    assert "phase unet, step 4" in lines[0]
    a, b = _weights(full), _weights(early)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a4[k], b[k]) for k in a)      # step 5 changed the EMA weights
    man = json.loads((early / "splatdd_ld3m.json").read_text())
    assert man["stop_unet_at"] is None
    # each run's UNet steps are recorded with their wall time and load (the timing record)
    sessions = [h for h in man["history"] if h["phase"] == "unet-session"]
    assert [(h["from"], h["to"]) for h in sessions] == [(0, 4), (4, 5)]
    assert all(h["seconds"] >= 0 and h["threads"] >= 1 for h in sessions)
    # a finished model is not an early export: rerunning into it still needs overwrite
    with pytest.raises(FileExistsError, match="not empty"):
        train_ldm(_cfg(early, idx_root, checkpoint_every=1), log=lambda s: None)
    # nor is an early export written with other settings
    other = tmp_path / "other"
    train_ldm(_cfg(other, idx_root, checkpoint_every=1, stop_unet_at=2, unet_lr=5e-4), log=lambda s: None)
    with pytest.raises(FileExistsError, match="not empty"):
        train_ldm(_cfg(other, idx_root, checkpoint_every=1, work_dir=str(tmp_path / "w2")), log=lambda s: None)
    with pytest.raises(ValueError, match="stop_unet_at"):
        train_ldm(_cfg(tmp_path / "x", idx_root, stop_unet_at=9))


def test_resume_with_other_settings_and_bad_settings_are_refused(tmp_path, idx_root):
    out = tmp_path / "m"
    with pytest.raises(_Stop):
        train_ldm(_cfg(out, idx_root), log=_stop_when("[ae] step 3/"), log_every=1)
    with pytest.raises(ValueError, match="unet_lr"):
        train_ldm(_cfg(out, idx_root, unet_lr=5e-4), log=lambda s: None)
    with pytest.raises(ValueError, match="image_size"):
        train_ldm(_cfg(tmp_path / "x", idx_root, image_size=30))
    with pytest.raises(ValueError, match="unet_channels"):
        train_ldm(_cfg(tmp_path / "x", idx_root, unet_channels=(8, 16)))
    with pytest.raises(ValueError, match="label_dropout"):
        train_ldm(_cfg(tmp_path / "x", idx_root, label_dropout=1.5))
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        train_ldm(_cfg(full, idx_root))


def test_cli_train_ldm_errors_exit_2(tmp_path, idx_root, capsys):
    from splatdd.cli import main

    rc = main(["train-ldm", str(tmp_path / "o"), "--data-root", str(idx_root), "--image-size", "30"])
    assert rc == 2
    assert "splatdd: error: image_size must be a multiple of 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train-ldm", str(tmp_path / "o"), "--unet-steps", "-3"])
    assert e.value.code == 2


def _script_args(tmp_path: Path, *args: str) -> list[str]:
    """The arguments scripts/train_ldm.sh hands to `splatdd` (a stand-in `splatdd` on PATH records them)."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[3] / "scripts" / "train_ldm.sh"
    assert script.is_file(), f"{script} is missing"
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "splatdd"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / "args.txt"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", ARGS_OUT=str(out))
    subprocess.run(["bash", str(script), *args], check=True, env=env)
    return out.read_text().splitlines()


def test_train_ldm_script_runs_the_full_schedule_and_later_flags_override(tmp_path):
    """scripts/train_ldm.sh: default OUT_DIR, the full --unet-steps schedule (no --stop-unet-at), and
    options after OUT_DIR come last, so the train-ldm parser takes them over the script's own."""
    import argparse

    from splatdd_ld3m.cli import add_train_parser

    ap = argparse.ArgumentParser()
    add_train_parser(ap.add_subparsers(dest="command"))
    args = _script_args(tmp_path)
    assert args[:2] == ["train-ldm", "runs/ldm-fmnist"]
    ns = ap.parse_args(args)
    assert ns.stop_unet_at is None and ns.unet_steps == 1500 and ns.threads == 1
    ns = ap.parse_args(_script_args(tmp_path, "m", "--stop-unet-at", "500", "--threads", "2"))
    assert ns.out_dir == "m" and ns.stop_unet_at == 500 and ns.threads == 2
