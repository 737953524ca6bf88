"""Squeeze: train a BatchNorm teacher on the real training set, save and load it (validated).

A teacher directory holds ``teacher.pt`` (the finished teacher) and, while training,
``checkpoint.pt`` (resumable state after every epoch); both are written atomically. ``teacher.pt``
records the model and its settings, the dataset (name, channels, resolution, classes,
normalisation, ZCA), the test accuracy and the training settings, next to the weights; it is read
with ``torch.load(weights_only=True)`` and checked on load (:func:`load_teacher`).

Models: ``ConvNet`` (or ``ConvNetD<k>``) with BatchNorm at the dataset's depth, and ``ResNet18``
with BatchNorm sized for the resolution: up to 64 px DC's 3x3 stride-1 stem without max-pool
(SRe2L's CIFAR/Tiny teacher), above 64 px the ImageNet stem (7x7 stride-2 conv and 3x3 stride-2
max-pool, SRe2L's ImageNet teacher).

Training: SGD momentum 0.9, weight decay 5e-4, cosine learning rate from ``lr`` to 0 over all
steps, cross-entropy, random crop (zero padding of 1/8 of the size) and horizontal flip per image.

Example::

    from splatdd.data import load_dataset
    from splatdd_sre2l.teacher import train_teacher, load_teacher
    train, test = load_dataset("fashion_mnist")
    info = train_teacher(train, test, "teachers/fmnist", model="ConvNet", epochs=5)
    net, info = load_teacher("teachers/fmnist", spec=train.spec)
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from splatdd.io_utils import atomic_torch_save
from splatdd.plugin_api import DatasetSpec, RealData

__all__ = ["TEACHER_NAME", "CHECKPOINT_NAME", "TeacherError", "build_teacher", "train_teacher",
           "load_teacher", "teacher_path", "spec_record", "check_spec"]

TEACHER_NAME = "teacher.pt"
CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "splatdd-teacher"
VERSION = 1
IMAGENET_STEM_ABOVE = 64


class TeacherError(ValueError):
    """A teacher file is missing, unreadable, corrupt, or does not match the dataset."""


class _ImageNetStemResNet18(nn.Module):
    """ResNet-18 (BN) with the ImageNet stem, wrapping splatdd's ResNet18 blocks and head."""

    def __init__(self, base: nn.Module, channels: int) -> None:
        super().__init__()
        self.base = base
        base.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        out = self.maxpool(F.relu(b.bn1(b.conv1(x))))
        out = b.layer4(b.layer3(b.layer2(b.layer1(out))))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.classifier(self.embed(x))


def build_teacher(model: str, spec: DatasetSpec, *, width: int = 128, depth: int | None = None,
                  seed: int | None = None) -> nn.Module:
    """A BatchNorm teacher ``model`` (``ConvNet``, ``ConvNetD<k>`` or ``ResNet18``) for ``spec``.

    >>> from splatdd.testing import TINY_SPEC
    >>> net = build_teacher("ConvNetD1", TINY_SPEC, width=8, seed=0)
    >>> any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    True
    """
    from splatdd.models import get_network

    if not (model.startswith("ConvNet") or model == "ResNet18"):
        raise ValueError(f"teacher model must be ConvNet, ConvNetD<k> or ResNet18, got {model!r}")
    hw = (spec.height, spec.width)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        if seed is not None:
            torch.default_generator.manual_seed(int(seed))
        net = get_network(model, spec.channels, spec.num_classes, hw, width=width, depth=depth,
                          norm="batchnorm")
        if model == "ResNet18" and max(hw) > IMAGENET_STEM_ABOVE:
            net = _ImageNetStemResNet18(net, spec.channels)
    return net


def teacher_path(directory: str | os.PathLike) -> Path:
    """``directory/teacher.pt``."""
    return Path(directory) / TEACHER_NAME


def spec_record(spec: DatasetSpec) -> dict[str, Any]:
    """What a teacher file records about its dataset."""
    return {"name": spec.name, "channels": spec.channels, "height": spec.height,
            "width": spec.width, "num_classes": spec.num_classes,
            "mean": [float(m) for m in spec.mean], "std": [float(s) for s in spec.std],
            "zca": bool(spec.zca)}


def check_spec(recorded: Mapping[str, Any], spec: DatasetSpec, *, where: str = "teacher") -> None:
    """Raise :class:`TeacherError` naming every field in which ``spec`` differs from the teacher's
    recorded dataset (the teacher only knows images normalised as it was trained)."""
    mine = spec_record(spec)
    diffs = []
    for key, value in mine.items():
        theirs = recorded.get(key)
        if key in ("mean", "std"):
            same = theirs is not None and len(theirs) == len(value) and all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(theirs, value))
        else:
            same = theirs == value
        if not same:
            diffs.append(f"{key} {theirs!r} (teacher) vs {value!r} (data)")
    if diffs:
        raise TeacherError(f"{where} was trained on other data: {'; '.join(diffs)}")


# ---- training -------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding of 1/8 of the size, and horizontal flip, per image."""
    n, _, h, w = x.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(x, (pw, pw, ph, ph))
    oy = torch.randint(0, 2 * ph + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pw + 1, (n,), generator=g)
    rows = (oy[:, None] + torch.arange(h)[None]).to(x.device)       # (n, h)
    cols = (ox[:, None] + torch.arange(w)[None]).to(x.device)       # (n, w)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]
    out = out.permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_teacher(train: RealData, test: RealData | None, out_dir: str | os.PathLike, *,
                  model: str = "ConvNet", epochs: int = 10, lr: float = 0.01,
                  batch_size: int = 256, width: int = 128, depth: int | None = None,
                  seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                  log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Train a teacher on ``train``, resumable from ``out_dir/checkpoint.pt``; write
    ``out_dir/teacher.pt`` with its test accuracy on ``test`` and return its metadata.

    Running it again after an interruption continues from the last finished epoch; when
    ``teacher.pt`` already exists with the same settings it is returned as is.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("width", width)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = train.spec
    settings = {"model": model, "width": int(width), "depth": depth, "epochs": int(epochs),
                "lr": float(lr), "batch_size": int(batch_size), "seed": int(seed)}
    say = log or (lambda s: None)
    if teacher_path(out).is_file():
        net, info = load_teacher(out, spec=spec)
        if info["training"] == settings:
            acc = info["test_accuracy"]
            say(f"teacher already trained: {teacher_path(out)} (test accuracy "
                f"{'not measured' if acc is None else f'{acc:.2f} %'})")
            return info
        raise TeacherError(f"{teacher_path(out)} exists with other settings "
                           f"{info['training']} (asked {settings}); use another --out")
    device = torch.device(device)
    net = build_teacher(model, spec, width=width, depth=depth, seed=seed).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(train.labels) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(int(seed))
    start = 0
    ckpt_file = out / CHECKPOINT_NAME
    if ckpt_file.is_file():
        try:
            ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise TeacherError(f"cannot read teacher checkpoint {ckpt_file}: {exc}") from exc
        if ckpt.get("settings") != settings or ckpt.get("dataset") != spec_record(spec):
            raise TeacherError(f"{ckpt_file} is from another run ({ckpt.get('settings')}); "
                               f"use another --out or delete it")
        net.load_state_dict(ckpt["net"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        g.set_state(ckpt["generator"])
        start = int(ckpt["epoch"])
        say(f"resuming teacher training at epoch {start + 1}/{epochs}")
    bar = None
    if progress and start < epochs:
        from splatdd.progress import progress_bar
        bar = progress_bar(total=epochs, initial=start, desc=f"teacher {model}", unit="ep")
    try:
        for ep in range(start, epochs):
            net.train()
            run_loss, seen = 0.0, 0
            for x, y in train.batches(batch_size, g):
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(net(_augment(x, g)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                run_loss += float(loss.detach()) * len(y)
                seen += len(y)
            atomic_torch_save({"settings": settings, "dataset": spec_record(spec),
                               "epoch": ep + 1, "net": net.state_dict(),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "generator": g.get_state()}, ckpt_file)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{run_loss / max(seen, 1):.4f}")
    finally:
        if bar is not None:
            bar.close()
    acc = None
    if test is not None:
        from splatdd.evaluate import test_accuracy
        check_spec(spec_record(test.spec), spec, where="the test set")
        acc = test_accuracy(net, test, device=device)
        say(f"teacher test accuracy: {acc:.2f} %")
    info = {"format": FORMAT, "version": VERSION, "model": model,
            "model_kwargs": {"width": int(width), "depth": depth}, "norm": "batchnorm",
            "dataset": spec_record(spec), "test_accuracy": acc, "training": settings,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    atomic_torch_save(info, teacher_path(out))
    ckpt_file.unlink(missing_ok=True)
    return {k: v for k, v in info.items() if k != "state_dict"}


# ---- loading --------------------------------------------------------------------------------------
_REQUIRED = ("format", "version", "model", "model_kwargs", "dataset", "test_accuracy", "training",
             "state_dict")


def load_teacher(directory: str | os.PathLike, *, spec: DatasetSpec | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The teacher in ``directory`` (frozen, eval mode, on ``device``) and its metadata.

    Raises :class:`TeacherError` when the file is missing, unreadable, not a teacher file, lacks a
    field, has weights that do not fit its recorded model, or (with ``spec``) was trained on a
    dataset with another name, shape, class count or normalisation.
    """
    path = teacher_path(directory)
    if not path.is_file():
        raise TeacherError(f"no teacher file at {path}; train one with `splatdd teacher --out "
                           f"{directory}`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"cannot read teacher file {path}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TeacherError(f"{path} is not a splatdd teacher file")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise TeacherError(f"teacher file {path} lacks {', '.join(missing)}")
    if obj["version"] != VERSION:
        raise TeacherError(f"teacher file {path} has version {obj['version']}, expected {VERSION}")
    rec = obj["dataset"]
    try:
        own = DatasetSpec(str(rec["name"]), int(rec["channels"]), int(rec["height"]),
                          int(rec["width"]), int(rec["num_classes"]), tuple(rec["mean"]),
                          tuple(rec["std"]), bool(rec["zca"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TeacherError(f"teacher file {path}: bad dataset record {rec!r}") from exc
    if spec is not None:
        check_spec(rec, spec, where=f"teacher {path}")
    kw = obj["model_kwargs"]
    try:
        net = build_teacher(str(obj["model"]), own, width=int(kw["width"]), depth=kw["depth"])
        net.load_state_dict(obj["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TeacherError(f"teacher file {path}: weights do not fit model {obj['model']!r} "
                           f"{kw}: {exc}") from exc
    net = net.to(device).eval()
    net.requires_grad_(False)
    return net, {k: v for k, v in obj.items() if k != "state_dict"}
