"""Distilled file: round trip (dtypes, metadata, sha256), rejection of corrupted/truncated files,
exports, atomic writes."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from splatdd import distilled_file as F
from splatdd.io_utils import atomic_open, atomic_write_bytes
from splatdd.plugin_api import DatasetSpec
from splatdd.registry import Registry, UnknownPluginError
from splatdd.testing_hostile import SPEC, TinyBF16, registry


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reg():
    return registry()


@pytest.fixture
def saved(tmp_path, reg):
    p = TinyBF16.build(SPEC, 3, generator=torch.Generator().manual_seed(0))
    path = F.save(tmp_path / "d.safetensors", p, spec=SPEC, ipc=3, algorithm="dm",
                  algo_config={"batch_real": 8}, learned_lr=0.02, extra_meta={"iterations": 5},
                  registry=reg)
    return p, path


def test_round_trip(saved, reg):
    p, path = saved
    d = F.load(path, registry=reg)
    assert isinstance(d.param, TinyBF16)
    assert torch.equal(d.param.decode(), p.decode())
    assert d.tensors["param/values"].dtype == torch.bfloat16        # plugin's storage dtype kept
    assert d.tensors["param/scale"].dtype == torch.float32
    assert d.spec == SPEC and d.ipc == 3 and d.learned_lr == pytest.approx(0.02)
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    m = d.meta
    assert m["format_version"] == F.FORMAT_VERSION
    assert m["parameterization"]["name"] == "tinybf16"
    assert m["parameterization"]["config"] == {"ipc": 3, "note": "tiny"}
    assert m["algorithm"]["name"] == "dm" and m["algorithm"]["config"] == {"batch_real": 8}
    assert m["budget_bytes"] == 2 * 3 * 3 * 4 * 5 * 4 and m["num_bytes"] == p.num_bytes()
    assert m["resolution"] == [4, 5] and m["extra"] == {"iterations": 5}
    assert set(m["sha256"]) == {"labels", "param/values", "param/scale"}
    assert F.read_metadata(path)["sha256"] == m["sha256"]


def _data_start(buf: bytes) -> int:
    return 8 + struct.unpack("<Q", buf[:8])[0]


def test_rejects_flipped_data_byte(saved, reg):
    _, path = saved
    buf = bytearray(path.read_bytes())
    buf[_data_start(bytes(buf)) + 5] ^= 0xFF
    path.write_bytes(bytes(buf))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        F.load(path, registry=reg)


@pytest.mark.parametrize("keep", [0, 5, 20, -1, -100])
def test_rejects_truncated(saved, reg, keep):
    _, path = saved
    buf = path.read_bytes()
    path.write_bytes(buf[:keep] if keep >= 0 else buf[:keep])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        F.load(path, registry=reg)


def test_rejects_trailing_bytes_and_bad_header(saved, reg):
    _, path = saved
    buf = path.read_bytes()
    path.write_bytes(buf + b"junk")
    with pytest.raises(ValueError, match="trailing"):
        F.load(path, registry=reg)
    bad = bytearray(buf)
    bad[9] = ord("\x01")                  # breaks the JSON header
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="header"):
        F.load(path, registry=reg)


def _rewrite_meta(path, mutate):
    """Re-save the file's tensors with mutated metadata (a well-formed but invalid file)."""
    from safetensors.torch import load
    buf = path.read_bytes()
    header = json.loads(buf[8:_data_start(buf)])
    meta = dict(header["__metadata__"])
    mutate(meta)
    meta["splatdd_sha256"] = F.metadata_digest(meta["splatdd"])     # a deliberate edit
    path.write_bytes(st_save(load(buf), metadata=meta))


def test_rejects_newer_format_and_missing_keys(saved, reg):
    _, path = saved
    orig = path.read_bytes()
    _rewrite_meta(path, lambda m: m.update(format_version="99"))
    with pytest.raises(ValueError, match="v99"):
        F.load(path, registry=reg)

    path.write_bytes(orig)

    def drop(m):
        j = json.loads(m["splatdd"])
        del j["ipc"], j["sha256"]
        m["splatdd"] = json.dumps(j)
    _rewrite_meta(path, drop)
    with pytest.raises(ValueError, match="ipc, sha256|ipc"):
        F.load(path, registry=reg)

    path.write_bytes(orig)
    _rewrite_meta(path, lambda m: m.update(splatdd="{not json"))
    with pytest.raises(F.CorruptFile, match="splatdd metadata: not valid JSON"):
        F.load(path, registry=reg)


def test_rejects_foreign_safetensors(tmp_path, reg):
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_save({"a": torch.zeros(3)}))
    with pytest.raises(ValueError, match="not a splatdd distilled file"):
        F.load(path, registry=reg)


def test_from_state_errors_become_valueerror(saved, reg):
    _, path = saved
    from safetensors.torch import load
    buf = path.read_bytes()
    header = json.loads(buf[8:_data_start(buf)])
    meta = header["__metadata__"]
    tensors = {k: v for k, v in load(buf).items() if k != "param/values"}
    j = json.loads(meta["splatdd"])
    j["sha256"] = {k: v for k, v in j["sha256"].items() if k != "param/values"}
    del j["tensors"]["param/values"]
    meta["splatdd"] = json.dumps(j)
    meta["splatdd_sha256"] = F.metadata_digest(meta["splatdd"])
    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(ValueError, match="values"):
        F.load(path, registry=reg)


def test_unknown_plugin_is_named(saved):
    _, path = saved
    with pytest.raises(UnknownPluginError) as e:
        F.load(path, registry=Registry(entry_points=False))
    assert "tinybf16" in str(e.value)


def test_export_png_and_tensor(saved, reg, tmp_path):
    from PIL import Image
    p, path = saved
    d = F.load(path, registry=reg)
    png = d.export_png(tmp_path / "grid.png")
    img = Image.open(png)
    # default layout: one column per class (2), ipc rows (3), 2 px padding
    assert img.size == (2 * (5 + 2) + 2, 3 * (4 + 2) + 2) and img.mode == "RGB"
    F.export_png(d.images(), tmp_path / "grid2.png", nrow=6, spec=SPEC)
    assert Image.open(tmp_path / "grid2.png").size == (6 * 7 + 2, 6 + 2)
    pt = d.export_tensor(tmp_path / "x.pt")
    obj = torch.load(pt)
    assert obj["format"] == "splatdd.images" and obj["normalized"] is True
    assert torch.equal(obj["images"], p.decode().detach())
    assert obj["labels"].tolist() == d.labels.tolist()
    assert torch.allclose(obj["mean"], torch.tensor(SPEC.mean))
    assert obj["learned_lr"] == pytest.approx(0.02)


def test_denormalize():
    x = torch.zeros(1, 3, 2, 2)
    y = F.denormalize(x, SPEC)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor(SPEC.mean))
    z = F.denormalize(torch.randn(2, 3, 4, 4), DatasetSpec("z", 3, 4, 4, 2, zca=True))
    assert z.min() >= 0 and z.max() <= 1 and torch.isclose(z[0].max(), torch.tensor(1.0))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"new partial")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_save_on_a_full_disk_keeps_the_previous_file(saved, reg, monkeypatch):
    import errno

    from splatdd.run_folder import WriteFailed
    p, path = saved
    before = path.read_bytes()

    def full(data_path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(F, "atomic_write_bytes", full)
    with pytest.raises(WriteFailed, match=f"no space left on device.*kept: the previous {path}"):
        F.save(path, p, spec=SPEC, ipc=3, registry=reg)
    assert path.read_bytes() == before


def test_export_to_an_unwritable_place_is_a_clear_error(saved, reg, tmp_path):
    from splatdd.run_folder import WriteFailed
    d = F.load(saved[1], registry=reg)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteFailed, match="cannot write .*grid.png: a file is in the way"):
        d.export_png(blocker / "grid.png")
    with pytest.raises(WriteFailed, match="cannot write .*x.pt: .*choose another --out"):
        d.export_tensor(blocker / "sub" / "x.pt")
