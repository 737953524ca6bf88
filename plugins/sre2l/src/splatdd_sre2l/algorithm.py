"""``sre2l``: the recover stage of SRe2L (Yin, Xing & Shen, "Squeeze, Recover and Relabel: Dataset
Condensation at ImageNet Scale From A New Perspective", NeurIPS 2023).

The real data are never read: a BatchNorm teacher trained on them (``splatdd teacher``) stands in.
Each step decodes the parameterization's images, augments them (random resized crop + flip, one
draw shared by each batch as SRe2L does, or per image), and minimises::

    CE(teacher(aug(x)), y) + r_bn * sum_l w_l (||mean_l(x) - running_mean_l||_2
                                              + ||var_l(x) - running_var_l||_2)

with the teacher frozen in eval mode and the batch statistics taken by forward hooks
(:class:`splatdd_sre2l.bn.BNStatistics`) that are removed before the step returns. ``w_0`` is
``first_bn_multiplier`` (SRe2L: 10), every other ``w_l`` is 1.

Class-batched as SRe2L: the decoded images are split into batches of one image per class (batch
``g`` holds the ``g``-th image of every class); each batch gets its own BN statistics and its own
crop, and the loss is the mean over batches of ``CE_batch + r_bn * BN_batch``. ``batches_per_step``
picks that many batches at random each step (all by default).

Options: ``teacher`` (directory written by ``splatdd teacher``, required), ``r_bn`` (0.01),
``first_bn_multiplier`` (10.0), ``crop_scale`` ((0.08, 1.0)), ``flip`` (True), ``per_image_aug``
(False), ``batches_per_step`` (None: all). SRe2L runs 1k-4k iterations with Adam lr 0.25,
betas (0.5, 0.9) and a cosine learning rate (``regime = "recover"``, ``lr_schedule = "cosine"``:
the parameterization picks its optimiser for the regime and the core applies the schedule).
Unlike SRe2L, the images are not clipped to the valid pixel range after each step (the algorithm
only sees ``decode()``), and there is no random jitter (roll) on top of the crop.

Example::

    algo = SRe2L(real, ipc=1, generator=torch.Generator().manual_seed(0), teacher="teachers/fm")
    loss = algo.loss(param, step=0)
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from splatdd.plugin_api import (PLUGIN_API_VERSION, Algorithm, Parameterization, RealData,
                                reject_unknown_options)

from .augment import apply_crops, expand_groups, sample_crops
from .bn import BNStatistics

__all__ = ["SRe2L", "class_batches"]


def class_batches(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of SRe2L's batches: batch ``g`` holds the ``g``-th image of every class that has
    more than ``g`` images, in class order.

    >>> [b.tolist() for b in class_batches(torch.tensor([0, 0, 1, 1, 1]), 2)]
    [[0, 2], [1, 3], [4]]
    """
    per_class = [torch.nonzero(labels == c, as_tuple=False).flatten() for c in range(num_classes)]
    depth = max((len(p) for p in per_class), default=0)
    return [torch.stack([p[g] for p in per_class if len(p) > g]) for g in range(depth)]


class SRe2L(Algorithm):
    """Recover images from a BatchNorm teacher: cross-entropy plus BN-statistic matching."""

    name = "sre2l"
    api_version = PLUGIN_API_VERSION
    default_iterations = 1000
    regime: ClassVar[str] = "recover"
    lr_schedule: ClassVar[str] = "cosine"

    OPTIONS: dict[str, Any] = {"teacher": None, "r_bn": 0.01, "first_bn_multiplier": 10.0,
                               "crop_scale": (0.08, 1.0), "flip": True, "per_image_aug": False,
                               "batches_per_step": None}

    def __init__(self, real: RealData, *, ipc: int, generator: torch.Generator,
                 **options: Any) -> None:
        super().__init__(real, ipc=ipc, generator=generator)
        reject_unknown_options("sre2l", options, self.OPTIONS)
        opts = {**self.OPTIONS, **options}
        if opts["teacher"] is None:
            raise TypeError("sre2l: the option teacher=DIR is required (a directory written by "
                            "`splatdd teacher`)")
        from .teacher import load_teacher
        self.teacher_dir = str(opts["teacher"])
        self.teacher, info = load_teacher(self.teacher_dir, spec=real.spec)
        self.teacher_info = {k: info[k] for k in ("model", "model_kwargs", "test_accuracy")}
        self.r_bn = float(opts["r_bn"])
        if not self.r_bn >= 0:
            raise ValueError(f"sre2l: r_bn must be >= 0, got {opts['r_bn']!r}")
        self.first_bn_multiplier = float(opts["first_bn_multiplier"])
        scale = opts["crop_scale"]
        if not (isinstance(scale, Sequence) and len(scale) == 2):
            raise ValueError(f"sre2l: crop_scale must be [min, max], got {scale!r}")
        self.crop_scale = (float(scale[0]), float(scale[1]))
        sample_crops(1, torch.Generator(), scale=self.crop_scale)    # validates the range
        self.flip = bool(opts["flip"])
        self.per_image_aug = bool(opts["per_image_aug"])
        b = opts["batches_per_step"]
        if b is not None and (isinstance(b, bool) or int(b) != b or int(b) < 1):
            raise ValueError(f"sre2l: batches_per_step must be a positive integer, got {b!r}")
        self.batches_per_step = None if b is None else int(b)

    @classmethod
    def quick_options(cls, real: RealData, ipc: int, workdir: Any) -> dict[str, Any]:
        """For other plugins' quick tests: a tiny BatchNorm teacher (width 8, 2 epochs) trained on
        ``real`` once under ``workdir``."""
        from pathlib import Path

        from splatdd.testing import quick_depth

        from .teacher import train_teacher
        spec = real.spec
        out = Path(workdir) / (f"sre2l-quick-teacher-{spec.name}-{spec.channels}x{spec.height}x"
                               f"{spec.width}-{spec.num_classes}")
        train_teacher(real, None, out, model="ConvNet", width=8, depth=quick_depth(spec),
                      epochs=2, lr=0.05, batch_size=32, seed=0, progress=False)
        return {"teacher": str(out)}

    def config(self) -> dict[str, Any]:
        return {"teacher": self.teacher_dir, "teacher_info": self.teacher_info, "r_bn": self.r_bn,
                "first_bn_multiplier": self.first_bn_multiplier,
                "crop_scale": list(self.crop_scale), "flip": self.flip,
                "per_image_aug": self.per_image_aug, "batches_per_step": self.batches_per_step}

    def after_step(self, param: Parameterization | None = None) -> None:
        """Nothing to do: the teacher is frozen and the hooks are gone."""

    # ---- the objective ------------------------------------------------------------------------
    def _pick_batches(self, labels: torch.Tensor) -> list[torch.Tensor]:
        batches = class_batches(labels.cpu(), self.real.spec.num_classes)
        if not batches:
            raise ValueError("sre2l: the parameterization has no images of any dataset class")
        if self.batches_per_step is not None and self.batches_per_step < len(batches):
            pick = torch.randperm(len(batches), generator=self.generator)[:self.batches_per_step]
            batches = [batches[int(i)] for i in pick.sort().values]
        return batches

    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        batches = self._pick_batches(param.labels)
        order = torch.cat(batches)
        sizes = [len(b) for b in batches]
        x = param.decode(order)             # only the images of this step's batches
        dev = x.device
        y = param.labels.to(dev)[order.to(dev)]
        if self.per_image_aug:
            crops = sample_crops(len(order), self.generator, scale=self.crop_scale,
                                 flip=self.flip)
        else:
            crops = expand_groups(sample_crops(len(batches), self.generator,
                                               scale=self.crop_scale, flip=self.flip), sizes)
        x_aug = apply_crops(x, crops)
        if next(self.teacher.parameters()).device != dev:
            self.teacher = self.teacher.to(dev)
        with BNStatistics(self.teacher, sizes=sizes,
                          first_bn_multiplier=self.first_bn_multiplier) as bn:
            logits = self.teacher(x_aug)
            bn_loss = bn.loss()
        ce = torch.stack([F.cross_entropy(lg, yy)
                          for lg, yy in zip(logits.split(sizes), y.split(sizes))]).mean()
        return ce + self.r_bn * bn_loss
