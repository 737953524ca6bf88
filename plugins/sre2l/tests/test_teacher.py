"""Teacher training (resume is bit-exact), the teacher file's validation, and the CLI's errors."""
import shutil
from dataclasses import replace

import pytest
import torch

from splatdd.io_utils import atomic_torch_save
from splatdd.testing import TINY_SPEC, make_tiny_real
from splatdd_sre2l import teacher as teacher_mod
from splatdd_sre2l.teacher import (TeacherError, build_teacher, load_teacher, teacher_path,
                                   train_teacher)

KW = dict(model="ConvNetD2", width=4, epochs=2, lr=0.05, batch_size=32, seed=3)


def test_teacher_file_records_and_loads(tiny_teacher):
    net, info = load_teacher(tiny_teacher, spec=TINY_SPEC)
    assert info["model"] == "ConvNetD2" and info["norm"] == "batchnorm"
    assert info["dataset"]["mean"] == [0.0] and info["dataset"]["height"] == 8
    assert 0.0 <= info["test_accuracy"] <= 100.0
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    real = make_tiny_real(20)
    a = tmp_path / "a"
    train_teacher(real, None, a, progress=False, **KW)
    ref, _ = load_teacher(a)

    b = tmp_path / "b"
    calls = {"n": 0}
    orig = teacher_mod._augment

    def failing(x, g):
        calls["n"] += 1
        if calls["n"] == 3:                      # epoch 2 (2 batches per epoch)
            raise KeyboardInterrupt
        return orig(x, g)
    monkeypatch.setattr(teacher_mod, "_augment", failing)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(real, None, b, progress=False, **KW)
    assert (b / teacher_mod.CHECKPOINT_NAME).is_file() and not teacher_path(b).exists()
    monkeypatch.setattr(teacher_mod, "_augment", orig)
    train_teacher(real, None, b, progress=False, **KW)
    got, _ = load_teacher(b)
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not (b / teacher_mod.CHECKPOINT_NAME).exists()
    # same settings again: returned as is; other settings: refused
    assert train_teacher(real, None, b, progress=False, **KW)["training"]["epochs"] == 2
    with pytest.raises(TeacherError, match="other settings"):
        train_teacher(real, None, b, progress=False, **{**KW, "epochs": 3})


def test_corrupt_and_mismatched_files(tiny_teacher, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_teacher, d)
    path = teacher_path(d)
    good = torch.load(path, weights_only=True)

    with pytest.raises(TeacherError, match="trained on other data: .*mean"):
        load_teacher(d, spec=replace(TINY_SPEC, mean=(0.5,)))
    with pytest.raises(TeacherError, match="num_classes"):
        load_teacher(d, spec=replace(TINY_SPEC, num_classes=4))

    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TeacherError, match="cannot read"):
        load_teacher(d)
    atomic_torch_save({"format": "something else"}, path)
    with pytest.raises(TeacherError, match="not a splatdd teacher"):
        load_teacher(d)
    atomic_torch_save({k: v for k, v in good.items() if k != "dataset"}, path)
    with pytest.raises(TeacherError, match="lacks dataset"):
        load_teacher(d)
    atomic_torch_save({**good, "model_kwargs": {"width": 16, "depth": None}}, path)
    with pytest.raises(TeacherError, match="weights do not fit"):
        load_teacher(d)
    atomic_torch_save({**good, "version": 99}, path)
    with pytest.raises(TeacherError, match="version"):
        load_teacher(d)
    path.unlink()
    with pytest.raises(TeacherError, match="no teacher file"):
        load_teacher(d)


def test_build_teacher_models():
    with pytest.raises(ValueError, match="teacher model"):
        build_teacher("ViT", TINY_SPEC)
    big = replace(TINY_SPEC, height=96, width=96, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    rn = build_teacher("ResNet18", big, seed=0)
    assert isinstance(rn.maxpool, torch.nn.MaxPool2d)          # ImageNet stem above 64 px
    assert rn.base.conv1.kernel_size == (7, 7) and rn.base.conv1.stride == (2, 2)
    with torch.no_grad():
        assert rn.eval()(torch.zeros(1, 3, 96, 96)).shape == (1, 3)
    small = build_teacher("ResNet18", replace(TINY_SPEC, height=32, width=32), seed=0)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert all(not isinstance(m, torch.nn.GroupNorm) for m in small.modules())
    a, b = build_teacher("ConvNetD1", TINY_SPEC, seed=1), build_teacher("ConvNetD1", TINY_SPEC, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_settings(tmp_path):
    real = make_tiny_real(5)
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            train_teacher(real, None, tmp_path, progress=False, **{**KW, **bad})


def test_cli_errors(capsys):
    from splatdd.cli import main
    assert main(["teacher", "--model", "ViT", "--out", "x"]) == 2
    assert "splatdd: error: --model must be" in capsys.readouterr().err
    assert main(["teacher", "--dataset", "nosuch", "--out", "x", "--no-progress"]) == 2
    assert "cannot load dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["teacher", "--epochs", "0", "--out", "x"])
    assert exc.value.code == 2
