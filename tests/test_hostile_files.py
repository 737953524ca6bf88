"""Hostile distilled files: every case of the corpus (splatdd/testing_hostile.py) raises its specific
``DistilledFileError`` subclass naming the field, fast and without allocating what the metadata
claims; random byte mutations of a valid file give a clean error or an unchanged decode."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splatdd import distilled_file as F
from splatdd import testing_hostile as H
from splatdd.testing import parameterization_class


pytestmark = pytest.mark.usefixtures("one_thread")

CASES = H.corpus()


def _load_with_timeout(path: Path, reg, timeout: float = 20.0):
    """``F.load`` in a daemon thread: a hang fails the test instead of blocking the suite."""
    box: dict = {}

    def run():
        try:
            box["value"] = F.load(path, registry=reg)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"load({path}) still running after {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_corpus_ids_are_unique_and_cover_every_category():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c.category for c in CASES} == {"corrupted", "truncated", "metadata", "tensors",
                                           "sizes", "special"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_file(case, tmp_path):
    reg = H.registry()
    path = case.make(H.valid_file(tmp_path / "d.safetensors", reg=reg))
    H.TinyBF16.calls.clear()
    with pytest.raises(case.error) as info:
        _load_with_timeout(path, reg)
    err = info.value
    assert isinstance(err, F.DistilledFileError) and isinstance(err, ValueError)
    assert err.field and re.search(case.field, str(err)), str(err)
    assert str(err).startswith(f"{path}: {err.field}: ")
    # the plugin never ran on real tensors for a file that is refused before or in the dry run
    assert "cpu" not in H.TinyBF16.calls or case.id in ("labels-wrong-order",)


def test_read_metadata_refuses_the_header_cases(tmp_path):
    """read_metadata reads only the header but validates it like load (digest included)."""
    for case in CASES:
        if case.category not in ("metadata", "special", "truncated") or case.id in (
                "num-bytes-edit", "edit-data-stale", "truncate-data", "truncate-half",
                "trailing-bytes"):
            continue
        path = case.make(H.valid_file(tmp_path / f"{case.id}.safetensors"))
        with pytest.raises(case.error):
            F.read_metadata(path)


def test_v1_files_still_load_with_the_same_decode(tmp_path):
    reg = H.registry()
    path = H.valid_file(tmp_path / "d.safetensors", reg=reg)
    new = F.load(path, registry=reg)
    old = F.load(H.as_v1(path), registry=reg)
    assert old.meta["format_version"] == 1 and "tensors" not in old.meta
    assert torch.equal(old.images(), new.images()) and torch.equal(old.labels, new.labels)
    # documented weakness of v1: an in-range metadata edit is not detected
    H.rewrite(path, meta=lambda j: j["extra"].update(iterations=6), refresh=False)
    assert F.load(path, registry=reg).meta["extra"]["iterations"] == 6


def test_dry_run_never_allocates_what_the_config_claims(tmp_path):
    """ipc 500000 in the config: the plugin's shape check runs on the meta device only."""
    reg = H.registry()
    path = H.rewrite(H.valid_file(tmp_path / "d.safetensors", reg=reg),
                     meta=lambda j: j["parameterization"]["config"].update(ipc=500000))
    H.TinyBF16.calls.clear()
    with pytest.raises(F.InvalidTensorData, match="expected \\(1000000, 3, 4, 5\\)"):
        F.load(path, registry=reg)
    assert H.TinyBF16.calls == ["meta"]


def test_memory_limit_counts_the_rebuilt_parameterization(tmp_path):
    reg = H.registry()
    path = H.rewrite(H.valid_file(tmp_path / "d.safetensors", reg=reg),
                     meta=lambda j: j["parameterization"]["config"].update(cache=10_000))
    # fp32 cache 10000 + values 6*3*4*5 + scale 6: allowed with 1 MB, refused with 20 kB
    assert F.load(path, registry=reg, max_bytes=10**6).param.cache == 10_000
    with pytest.raises(F.ImplausibleSize, match="would allocate 41,464 bytes"):  # 4*(10000+360+6)
        F.load(path, registry=reg, max_bytes=20_000)
    with pytest.raises(F.ImplausibleSize, match="tensor data"):
        F.load(path, registry=reg, max_bytes=100)


def test_gaussian_points_500000_is_refused_before_allocating(tmp_path):
    """The issue's reproducer: a 33 KB gaussian file whose config says points=500000 (5.3 GB)."""
    cls = parameterization_class("gaussian")
    from splatdd.plugin_api import DatasetSpec
    from splatdd.registry import Registry
    spec = DatasetSpec("fashion_mnist", 1, 28, 28, 10, mean=(0.2861,), std=(0.353,))
    reg = Registry(entry_points=False)
    reg.register("parameterization", cls)
    p = cls.build(spec, 1, generator=torch.Generator().manual_seed(0))
    path = F.save(tmp_path / "g.safetensors", p, spec=spec, ipc=1, registry=reg)
    assert path.stat().st_size < 40_000
    H.rewrite(path, meta=lambda j: j["parameterization"]["config"].update(points=500000))
    with pytest.raises(F.InvalidTensorData, match="parameterization gaussian.*500000"):
        F.load(path, registry=reg, max_bytes=10**9)      # 5.3 GB real allocation would fail here


def test_save_refuses_what_load_would_refuse(tmp_path):
    reg = H.registry()
    p = H.TinyBF16.build(H.SPEC, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(F.InvalidMetadata, match="learned_lr"):
        F.save(tmp_path / "a", p, spec=H.SPEC, ipc=3, learned_lr=-1.0, registry=reg)
    with pytest.raises(F.InvalidMetadata, match="ipc"):
        F.save(tmp_path / "a", p, spec=H.SPEC, ipc=0, registry=reg)
    with torch.no_grad():
        p.scale[1] = float("nan")
    with pytest.raises(F.InvalidTensorData, match="param/scale"):
        F.save(tmp_path / "a", p, spec=H.SPEC, ipc=3, registry=reg)
    assert not (tmp_path / "a").exists()


def _decode(d: F.Distilled) -> tuple:
    return (d.images(), d.labels, json.dumps(d.meta, sort_keys=True), d.learned_lr, d.spec)


_VALID_CACHE: dict[str, bytes] = {}


def _valid_bytes(tmp: Path) -> bytes:
    if "b" not in _VALID_CACHE:
        _VALID_CACHE["b"] = H.valid_file(tmp / "valid.safetensors").read_bytes()
    return _VALID_CACHE["b"]


@settings(max_examples=300, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_mutations_give_a_clean_error_or_the_same_decode(tmp_path, data):
    reg = H.registry()
    buf = _valid_bytes(tmp_path)
    if "ref" not in _VALID_CACHE:
        (tmp_path / "ref.safetensors").write_bytes(buf)
        _VALID_CACHE["ref"] = _decode(F.load(tmp_path / "ref.safetensors", registry=reg))
    ref = _VALID_CACHE["ref"]
    hs = H.data_start(buf)
    # half the mutations land in the header (where the parsing logic is), half anywhere
    pos = st.one_of(st.integers(0, hs - 1), st.integers(0, len(buf) - 1))
    muts = data.draw(st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=4))
    b = bytearray(buf)
    for i, v in muts:
        b[i] = v
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(b))
    try:
        got = F.load(path, registry=reg)
    except F.DistilledFileError as exc:
        assert str(exc).startswith(f"{path}: {exc.field}: ")
        return
    out = _decode(got)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert out[2:] == ref[2:], "a mutated file decoded to different metadata"
