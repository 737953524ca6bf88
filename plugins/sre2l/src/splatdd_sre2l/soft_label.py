"""The ``soft-label`` evaluation protocol (SRe2L's relabel, FKD style).

A fresh student is trained on the distilled images only, but never sees their integer labels: every
step draws a random resized crop (and flip) per image, asks the teacher for its logits on exactly
that crop, and minimises ``KL(softmax(teacher / T) || softmax(student / T))`` (``batchmean``, no
``T**2`` factor, as SRe2L's code) with AdamW and a cosine learning rate to 0. The student is then
tested on the real test set (hard accuracy, as every protocol).

What it costs: the teacher is needed at evaluation time (one teacher forward per student step), so
the distilled set alone no longer suffices, and its accuracies are not comparable with the
hard-label protocols' (``paper``, ``cross-arch``): results must be reported separately, or side by
side only when labelled as different protocols.

Options (``SoftLabelProtocol(**options)``): ``teacher`` (directory written by ``splatdd teacher``,
required), ``temperature`` (20, SRe2L's ImageNet setting; its CIFAR script uses 30), ``epochs`` (300,
SRe2L ImageNet), ``steps`` (None: ``epochs`` worth; else a fixed number of optimiser steps,
overriding ``epochs``), ``lr`` (1e-3), ``weight_decay`` (0.01), ``batch_size`` (128),
``crop_scale`` ((0.08, 1.0)), ``flip`` (True), ``norm`` and ``width`` (None: the student network's
defaults, e.g. ConvNet's instance norm and width 128).
The learned learning rate of trajectory matching does not apply and is ignored.

Example::

    proto = SoftLabelProtocol(teacher="teachers/fmnist", epochs=50)
    res = proto.evaluate(images, labels, test, model="ConvNet", runs=1, seed=0)
    print(proto.describe(), res.mean)
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from splatdd.plugin_api import PLUGIN_API_VERSION, RealData, reject_unknown_options
from splatdd.protocols import EvalProtocol

from .augment import apply_crops, sample_crops

__all__ = ["SoftLabelProtocol", "train_student", "soft_label_kl"]

_DEFAULTS: dict[str, Any] = {"teacher": None, "temperature": 20.0, "epochs": 300, "steps": None,
                             "lr": 1e-3, "weight_decay": 0.01, "batch_size": 128,
                             "crop_scale": (0.08, 1.0), "flip": True, "norm": None,
                             "width": None}


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` averaged over the batch (``batchmean``).

    >>> x = torch.randn(4, 3)
    >>> float(soft_label_kl(x, x, 2.0)) == 0.0
    True
    """
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean",
                    log_target=True)


def train_student(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, teacher: nn.Module,
                  *, soft: bool = True, temperature: float = 20.0, steps: int = 100,
                  lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 128,
                  crop_scale: Sequence[float] = (0.08, 1.0), flip: bool = True, seed: int = 0,
                  device: str | torch.device = "cpu", progress: bool = False,
                  desc: str = "student") -> nn.Module:
    """Train ``net`` in place for ``steps`` AdamW steps on random crops of ``images``: with
    ``soft`` the targets are the teacher's logits on the same crop (KL at ``temperature``), else
    the integer ``labels`` (cross-entropy; the hard-label control). Returns ``net``."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    device = torch.device(device)
    net = net.to(device).train()
    teacher = teacher.to(device).eval()
    x_all = images.detach().to(device, torch.float32)
    y_all = labels.detach().to(device, torch.long)
    n = len(x_all)
    if n == 0 or len(y_all) != n:
        raise ValueError(f"need as many labels as images (>0), got {n} and {len(y_all)}")
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = None
    if progress:
        from splatdd.progress import progress_bar
        bar = progress_bar(total=steps, desc=desc, unit="step", leave=False)
    perm, pos = torch.randperm(n, generator=g), 0
    try:
        for _ in range(steps):
            if pos >= n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + batch_size].to(device)
            pos += batch_size
            crops = sample_crops(len(idx), g, scale=crop_scale, flip=flip)
            xb = apply_crops(x_all[idx], crops)
            out = net(xb)
            if soft:
                with torch.no_grad():
                    target = teacher(xb)
                loss = soft_label_kl(out, target, temperature)
            else:
                loss = F.cross_entropy(out, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return net


class SoftLabelProtocol(EvalProtocol):
    """SRe2L/FKD evaluation: a student trained on per-crop teacher soft labels."""

    name = "soft-label"
    api_version = PLUGIN_API_VERSION
    label_kind = "soft"

    def __init__(self, **options: Any) -> None:
        reject_unknown_options(f"protocol {self.name}", options, _DEFAULTS)
        opts = {**_DEFAULTS, **options}
        if opts["teacher"] is None:
            raise TypeError("protocol soft-label: the option teacher=DIR is required (a "
                            "directory written by `splatdd teacher`)")
        self.teacher_dir = str(opts["teacher"])
        self.temperature = float(opts["temperature"])
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"protocol soft-label: temperature must be > 0, got "
                             f"{opts['temperature']!r}")
        self.epochs = self._positive("epochs", opts["epochs"])
        self.steps = None if opts["steps"] is None else self._positive("steps", opts["steps"])
        self.lr = float(opts["lr"])
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"protocol soft-label: lr must be > 0, got {opts['lr']!r}")
        self.weight_decay = float(opts["weight_decay"])
        self.batch_size = self._positive("batch_size", opts["batch_size"])
        scale = opts["crop_scale"]
        if not (isinstance(scale, Sequence) and len(scale) == 2):
            raise ValueError(f"protocol soft-label: crop_scale must be [min, max], got {scale!r}")
        self.crop_scale = (float(scale[0]), float(scale[1]))
        sample_crops(1, torch.Generator(), scale=self.crop_scale)    # validates the range
        self.flip = bool(opts["flip"])
        self.norm = None if opts["norm"] is None else str(opts["norm"])
        self.width = None if opts["width"] is None else self._positive("width", opts["width"])

    @staticmethod
    def _positive(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
                or int(value) < 1:
            raise ValueError(f"protocol soft-label: {name} must be a positive integer, got "
                             f"{value!r}")
        return int(value)

    def config(self) -> dict[str, Any]:
        return {"teacher": self.teacher_dir, "temperature": self.temperature,
                "epochs": self.epochs, "steps": self.steps, "lr": self.lr,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                "crop_scale": list(self.crop_scale), "flip": self.flip, "norm": self.norm,
                "width": self.width}

    def num_steps(self, n_images: int) -> int:
        """Optimiser steps for ``n_images`` distilled images: ``steps``, or ``epochs`` epochs."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(n_images / self.batch_size)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, test: RealData, *,
                 model: str = "ConvNet", runs: int = 3, seed: int = 0,
                 learned_lr: float | None = None, progress: bool = False,
                 train: RealData | None = None) -> Any:
        from splatdd.evaluate import EvalResult, run_seed, test_accuracy
        from splatdd.models import get_network

        from .teacher import load_teacher

        if images.dim() != 4 or tuple(images.shape[-2:]) != tuple(test.images.shape[-2:]):
            raise ValueError(f"images must be (n, C, H, W) at the test resolution "
                             f"{tuple(test.images.shape[-2:])}, got {tuple(images.shape)}")
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        spec = test.spec
        teacher, _ = load_teacher(self.teacher_dir, spec=spec, device=test.device)
        steps = self.num_steps(len(images))
        kw: dict[str, Any] = {} if self.norm is None else {"norm": self.norm}
        if self.width is not None:
            kw["width"] = self.width
        accs: list[float] = []
        t_train = t_test = 0.0
        for r in range(runs):
            s = run_seed(seed, r)
            net = get_network(model, spec.channels, spec.num_classes, tuple(images.shape[-2:]),
                              seed=s, device=test.device, **kw)
            t0 = time.perf_counter()
            train_student(net, images, labels, teacher, soft=True, temperature=self.temperature,
                          steps=steps, lr=self.lr, weight_decay=self.weight_decay,
                          batch_size=self.batch_size, crop_scale=self.crop_scale,
                          flip=self.flip, seed=s, device=test.device, progress=progress,
                          desc=f"soft-label run {r + 1}/{runs}")
            t1 = time.perf_counter()
            accs.append(test_accuracy(net, test))
            t_test += time.perf_counter() - t1
            t_train += t1 - t0
        t = torch.tensor(accs, dtype=torch.float64)
        return EvalResult(mean=float(t.mean()), std=float(t.std(unbiased=False)), accs=accs,
                          train_seconds=t_train, test_seconds=t_test, model=model,
                          epochs=math.ceil(steps * self.batch_size / max(len(images), 1)),
                          lr=self.lr)

