"""`splatdd buffer` / train_experts: file layout, resumption after an interruption or a kill
(same bytes as an uninterrupted run), and clear errors for missing or empty buffers."""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from splatdd_tm import BufferError, ExpertBuffer, TrajectoryMatching, train_experts
from splatdd_tm.buffer import expert_path



def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def test_buffer_layout(tiny_buffer):
    buf = ExpertBuffer.open(tiny_buffer)
    assert buf.num_experts == 2 and buf.epochs == 4
    cfg = json.loads((tiny_buffer / "buffer.json").read_text())
    assert cfg["lr"] == 0.01 and cfg["momentum"] == 0.0 and cfg["dsa"] is True
    traj = buf.read(0, list(range(5)))
    assert traj.shape == (5, buf.num_params) and traj.dtype == torch.float32
    assert all(not torch.equal(traj[e], traj[e + 1]) for e in range(4))   # it trained
    assert torch.equal(buf.read(1, 2), buf.read(1, [2])[0])
    assert not torch.equal(buf.read(0, 0), buf.read(1, 0))               # different inits


def _interrupt_after(k):
    def on_epoch(expert, epoch, loss):
        if expert == k + 1 and epoch == 0:
            raise KeyboardInterrupt
    return on_epoch


def test_resume_after_interrupt_gives_identical_files(tmp_path, make_real, buffer_kw):
    real, test = make_real(), make_real(5, seed=1)
    kw = dict(buffer_kw, epochs=2)
    full, part = tmp_path / "full", tmp_path / "part"
    train_experts(real, full, experts=3, test=test, progress=False, **kw)
    with pytest.raises(KeyboardInterrupt):
        train_experts(real, part, experts=3, test=test, progress=False,
                      on_epoch=_interrupt_after(0), **kw)
    assert expert_path(part, 0).exists() and not expert_path(part, 1).exists()
    (part / ".expert_00001.safetensors.abc.tmp").write_bytes(b"torn")   # a killed write
    seen = []
    train_experts(real, part, experts=3, test=test, progress=False,
                  on_epoch=lambda e, ep, loss: seen.append(e), **kw)
    assert sorted(set(seen)) == [1, 2]                                   # expert 0 was kept
    assert _files(part) == _files(full)
    assert not list(part.glob(".*.tmp"))
    # asking for more experts later extends the buffer
    train_experts(real, part, experts=4, test=test, progress=False, **kw)
    assert ExpertBuffer.open(part).num_experts == 4


def test_interrupted_expert_continues_from_its_last_epoch(tmp_path, make_real, buffer_kw):
    """Ctrl-C inside expert 1 after 3 of 4 epochs: its state is on disk, the message says so,
    the rerun trains only its 4th epoch and then expert 2, and the files are the bytes of an
    uninterrupted run (the oracle); no partial file is left."""
    from splatdd_tm.buffer import BufferInterrupted, partial_path
    real, test = make_real(), make_real(5, seed=1)
    full, part = tmp_path / "full", tmp_path / "part"
    train_experts(real, full, experts=3, test=test, progress=False, **buffer_kw)

    def stop(expert, epoch, loss):
        if (expert, epoch) == (1, 2):
            raise KeyboardInterrupt
    with pytest.raises(BufferInterrupted) as info:
        train_experts(real, part, experts=3, test=test, progress=False, on_epoch=stop,
                      **buffer_kw)
    msg = info.value.message
    assert "1 of 3 expert files" in msg and "expert 1 has 3 of 4 epochs saved" in msg, msg
    assert str(partial_path(part, 1)) in msg
    saved = torch.load(partial_path(part, 1), weights_only=True)
    assert saved["epochs_done"] == 3 and saved["snapshots"].shape[0] == 4
    seen, lines = [], []
    train_experts(real, part, experts=3, test=test, progress=False, log=lines.append,
                  on_epoch=lambda e, ep, loss: seen.append((e, ep)), **buffer_kw)
    assert seen == [(1, 3)] + [(2, e) for e in range(4)]
    assert any("expert 1: continuing after epoch 3" in line for line in lines), lines
    assert not partial_path(part, 1).exists()
    assert _files(part) == _files(full)


def test_partial_state_of_other_settings_is_ignored(tmp_path, make_real, buffer_kw):
    """A partial file that is not this expert's (another seed) is not resumed: the expert starts
    again and ends as in an uninterrupted run."""
    from splatdd_tm.buffer import partial_path
    real = make_real()
    kw = dict(buffer_kw, epochs=2)
    full, part = tmp_path / "full", tmp_path / "part"
    train_experts(real, full, experts=1, progress=False, **kw)
    part.mkdir()
    torch.save({"format": "splatdd-expert-partial", "seed": 1, "epochs_done": 1},
               partial_path(part, 0))
    seen = []
    train_experts(real, part, experts=1, progress=False,
                  on_epoch=lambda e, ep, loss: seen.append(ep), **kw)
    assert seen == [0, 1] and _files(part) == _files(full)


def test_resume_with_other_settings_is_refused(tmp_path, make_real, buffer_kw):
    real = make_real()
    kw = dict(buffer_kw, epochs=1)
    train_experts(real, tmp_path, experts=1, progress=False, **kw)
    with pytest.raises(BufferError, match="lr"):
        train_experts(real, tmp_path, experts=1, progress=False, **dict(kw, lr=0.02))


def _has(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not (_has("splatdd.models") and _has("splatdd.augment")),
                    reason="needs the core's networks and DSA in a subprocess")
def test_resume_after_sigkill_gives_identical_files(tmp_path, make_real, buffer_kw):
    """A real SIGKILL in the middle of expert 2 (of 3) of a separate process: experts 0 and 1
    survive, and resuming produces the same bytes as an uninterrupted run."""
    here = os.path.dirname(__file__)
    script = textwrap.dedent(f"""
        import importlib.util, os, signal, sys, torch
        torch.set_num_threads(1)
        spec = importlib.util.spec_from_file_location("tm_test_helpers",
                                                      os.path.join({here!r}, "conftest.py"))
        helpers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(helpers)
        make_real, BUFFER_KW = helpers.make_real, helpers.BUFFER_KW
        from splatdd_tm import train_experts
        kill = int(sys.argv[2])
        def on_epoch(expert, epoch, loss):
            if expert == kill and epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        train_experts(make_real(), sys.argv[1], experts=3, progress=False,
                      on_epoch=on_epoch, **dict(BUFFER_KW, epochs=2))
    """)
    full, part = tmp_path / "full", tmp_path / "part"
    train_experts(make_real(), full, experts=3, progress=False, **dict(buffer_kw, epochs=2))
    r = subprocess.run([sys.executable, "-c", script, str(part), "2"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -9, r.stderr                    # killed, not a clean exit
    assert expert_path(part, 1).exists() and not expert_path(part, 2).exists()
    seen = []
    train_experts(make_real(), part, experts=3, progress=False,
                  on_epoch=lambda e, ep, loss: seen.append(e), **dict(buffer_kw, epochs=2))
    assert sorted(set(seen)) == [2]                        # only the expert in progress was lost
    assert _files(part) == _files(full)


def test_missing_or_empty_buffer_errors(tmp_path, tiny_buffer, make_real):
    real = make_real()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(BufferError, match="buffer_dir"):
        TrajectoryMatching(real, ipc=1, generator=g)
    with pytest.raises(BufferError, match="does not exist"):
        TrajectoryMatching(real, ipc=1, generator=g, buffer_dir=str(tmp_path / "nope"))
    with pytest.raises(BufferError, match="no buffer.json"):
        TrajectoryMatching(real, ipc=1, generator=g, buffer_dir=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "buffer.json").write_text((tiny_buffer / "buffer.json").read_text())
    with pytest.raises(BufferError, match="empty"):
        TrajectoryMatching(real, ipc=1, generator=g, buffer_dir=str(empty))
    assert issubclass(BufferError, ValueError)   # the CLI reports ValueErrors as user errors
