"""distill's checkpoints against damage and misuse: empty/truncated/garbage/directory checkpoints
are refused with a clear CorruptCheckpoint, a resume with changed settings names the differing
keys, and a full disk during a checkpoint write says what was kept; resuming after it ends in
the same state as an uninterrupted run."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from splatdd import distill as D
from splatdd import io_utils
from splatdd.run_folder import WriteFailed
from splatdd.testing import TINY_SPEC, TinyPixels, ToyProjection, make_tiny_real

pytestmark = pytest.mark.usefixtures("one_thread")


def _make(seed: int = 0):
    real = make_tiny_real(8)
    p = TinyPixels.build(TINY_SPEC, 1, generator=torch.Generator().manual_seed(1))
    return p, ToyProjection(real, ipc=1, generator=torch.Generator().manual_seed(seed))


def _run(out, iterations, *, seed=0, lr=None, resume=False, p_a=None, **kw):
    p, a = p_a or _make(seed)
    D.distill(p, a, iterations=iterations, out_dir=out, progress=False, plot=False,
              save_file=False, seed=seed, lr=lr, resume=resume, checkpoint_every=2, **kw)
    return p


@pytest.fixture
def run_dir(tmp_path):
    _run(tmp_path / "run", 4)
    return tmp_path / "run"


def _garbage(p):
    p.write_bytes(b"\x80\x04garbage that is not a checkpoint" * 10)


def _truncate(p):
    b = p.read_bytes()
    p.write_bytes(b[:len(b) // 2])


def _directory(p):
    p.unlink()
    p.mkdir()


def _not_dict(p):
    torch.save([1, 2, 3], p)


def _missing_keys(p):
    ck = torch.load(p, weights_only=False)
    del ck["optimizer"], ck["rng"]
    torch.save(ck, p)


def _bad_step(p):
    ck = torch.load(p, weights_only=False)
    ck["step"] = 7
    torch.save(ck, p)


def _format_only(p):
    torch.save({"format": 1}, p)


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b""), "is empty \\(0 bytes\\)"),
    (_truncate, "is truncated or corrupt"),
    (_garbage, "is truncated or corrupt"),
    (_directory, "is a directory"),
    (_not_dict, "is not a splatdd checkpoint"),
    (_format_only, "lacks step, identity"),
    (_missing_keys, "lacks optimizer, rng"),
    (_bad_step, "4 losses for step 7"),
], ids=["empty", "truncated", "garbage", "directory", "not-a-dict", "format-only",
        "missing-keys", "step-vs-losses"])
def test_damaged_checkpoint_is_refused_on_resume(run_dir, damage, message):
    path = run_dir / D.CHECKPOINT_NAME
    damage(path)
    with pytest.raises(D.CorruptCheckpoint, match=message) as e:
        _run(run_dir, 6, resume=True)
    assert str(path) in str(e.value) and "delete" in str(e.value)
    assert isinstance(e.value, D.CheckpointError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("change,keys", [
    (dict(seed=1), ["seed: 0 -> 1"]),
    (dict(lr=0.5), ["lr: None -> 0.5"]),
    (dict(seed=3, lr=0.25), ["lr: None -> 0.25", "seed: 0 -> 3"]),
    (dict(config={"init": "noise"}), ["init: '<unset>' -> 'noise'"]),
])
def test_resume_with_changed_settings_names_the_keys(run_dir, change, keys):
    kw = dict(change)
    seed = kw.pop("seed", 0)
    with pytest.raises(D.CheckpointMismatch) as e:
        _run(run_dir, 6, resume=True, p_a=_make(0), **{"seed": seed, **kw})
    msg = str(e.value)
    assert "changed settings (" + "; ".join(keys) + ")" in msg, msg
    assert "param_config" not in msg and "{" not in msg          # no dict dumps
    assert torch.load(run_dir / D.CHECKPOINT_NAME, weights_only=False)["step"] == 4  # untouched


def test_resume_may_change_the_data_location(run_dir):
    """``dataset_root`` (RESUME_MAY_CHANGE) is where the data lives, not a setting."""
    _run(run_dir / "b", 4, config={"dataset_root": "/a"})
    _run(run_dir / "b", 6, resume=True, config={"dataset_root": "/b"})
    assert torch.load(run_dir / "b" / D.CHECKPOINT_NAME, weights_only=False)["step"] == 6


def test_other_identity_lists_the_differences(run_dir):
    real = make_tiny_real(8)
    p = TinyPixels.build(TINY_SPEC, 2, generator=torch.Generator().manual_seed(1))
    a = ToyProjection(real, ipc=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(D.CheckpointMismatch, match=r"different run \(.*ipc: 1 -> 2") as e:
        _run(run_dir, 6, resume=True, p_a=(p, a))
    assert "param_config.ipc: 1 -> 2" in str(e.value)


def test_disk_full_during_a_checkpoint_then_resume_is_bit_identical(tmp_path, monkeypatch):
    reference = _run(tmp_path / "ref", 6)
    out = tmp_path / "run"
    real_fdopen = os.fdopen
    calls = {"n": 0}

    def fdopen(fd, mode):
        calls["n"] += 1
        f = real_fdopen(fd, mode)
        if calls["n"] == 2:                         # the second checkpoint (step 4) hits ENOSPC
            def write(b, _w=f.write):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = write
        return f
    monkeypatch.setattr(io_utils.os, "fdopen", fdopen)
    with pytest.raises(WriteFailed) as e:
        _run(out, 6)
    msg = str(e.value)
    assert f"checkpoint {out / D.CHECKPOINT_NAME} (step 4)" in msg
    assert f"kept: the previous checkpoint {out / D.CHECKPOINT_NAME} (step 2)" in msg
    assert "--resume" in msg
    monkeypatch.undo()
    assert [q.name for q in out.iterdir() if q.name != ".lock"] == [D.CHECKPOINT_NAME]   # no temp file
    assert torch.load(out / D.CHECKPOINT_NAME, weights_only=False)["step"] == 2
    resumed = _run(out, 6, resume=True)
    assert torch.equal(resumed.images, reference.images)


def test_checkpoint_path_blocked_by_a_directory_on_a_fresh_run(tmp_path):
    out = tmp_path / "run"
    (out / D.CHECKPOINT_NAME).mkdir(parents=True)
    with pytest.raises(WriteFailed, match="a directory is in the way"):
        _run(out, 2)
