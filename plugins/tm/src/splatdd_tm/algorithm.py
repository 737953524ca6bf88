"""Trajectory matching (MTT; Cazenavette et al., CVPR 2022) as a splatdd algorithm.

Per :meth:`TrajectoryMatching.loss` call: pick a random expert and a random start epoch
``t < max_start_epoch``; starting from the expert's parameters ``theta*_t``, a student network
takes ``syn_steps`` SGD steps on minibatches (``batch_syn``) of the decoded synthetic images, with
DSA and a learnable learning rate; the loss is
``||theta_student - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` with ``M = expert_epochs``.
The student is unrolled functionally (:func:`splatdd_tm.unroll.student_unroll`), so the loss is
differentiable in the decoded images (hence in any parameterization's tensors) and in the lr.

The learning rate is the algorithm's own tensor with its own optimiser (SGD, ``lr_lr`` 1e-5,
momentum 0.5, as MTT), stepped in :meth:`after_step` and then clipped from below at ``lr_min``
(1e-8 by default; MTT does not clip, later TM variants do: a negative lr would make the student
climb the loss). :meth:`learned_lr` returns it (the :class:`splatdd.plugin_api.LearnsEvalLR`
protocol); the core reads it with :func:`splatdd.plugin_api.learned_eval_lr`, stores it in the
distilled file and evaluation uses it.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from splatdd import distributed
from splatdd.augment import DEFAULT_STRATEGY
from splatdd.plugin_api import (PLUGIN_API_VERSION, Algorithm, Parameterization, RealData,
                                draw_seed, reject_unknown_options)

from . import _core
from .buffer import BufferError, ExpertBuffer
from .unroll import (activation_bytes, estimate_unroll_bytes, measure_peak_bytes, param_layout,
                     student_unroll, tm_loss)

__all__ = ["TrajectoryMatching", "FMNIST_DEFAULTS"]

log = logging.getLogger("splatdd.tm")

#: FreD's FashionMNIST settings by IPC: (syn_steps, expert_epochs, max_start_epoch). Used as the
#: defaults (IPC 1 -> the first row, any other IPC -> the IPC 10 row).
FMNIST_DEFAULTS: dict[int, tuple[int, int, int]] = {1: (50, 2, 5), 10: (60, 2, 15)}


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), or None."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except Exception:  # noqa: BLE001 - purely advisory
        return None
    return None


class TrajectoryMatching(Algorithm):
    """Trajectory matching. Options (keyword):

    ``buffer_dir`` (required) -- a directory made by ``splatdd buffer``;
    ``syn_steps`` (50 at IPC 1, else 60), ``expert_epochs`` (2), ``max_start_epoch`` (5 at IPC 1,
    else 15; the start epoch is drawn from ``[min_start_epoch, max_start_epoch)``),
    ``min_start_epoch`` (0), ``batch_syn`` (None: the whole synthetic set per student step),
    ``lr_init`` (0.01), ``lr_lr`` (1e-5), ``lr_momentum`` (0.5), ``lr_min`` (1e-8),
    ``dsa`` (True), ``dsa_strategy``, ``max_experts`` (None: all experts in the buffer).
    """

    name = "tm"
    api_version = PLUGIN_API_VERSION
    regime = "trajectory"
    default_iterations = 5000
    #: Multi-process: every rank unrolls its own expert segment; gradients (and the learned lr's)
    #: are averaged.
    gradient_reduction = "mean"

    def __init__(self, real: RealData, *, ipc: int, generator: torch.Generator,
                 buffer_dir: str | None = None, syn_steps: int | None = None,
                 expert_epochs: int | None = None, max_start_epoch: int | None = None,
                 min_start_epoch: int = 0, batch_syn: int | None = None, lr_init: float = 0.01,
                 lr_lr: float = 1e-5, lr_momentum: float = 0.5, lr_min: float = 1e-8,
                 dsa: bool = True, dsa_strategy: str = DEFAULT_STRATEGY,
                 max_experts: int | None = None, **unknown: Any) -> None:
        reject_unknown_options("tm", unknown, (
            "buffer_dir", "syn_steps", "expert_epochs", "max_start_epoch", "min_start_epoch",
            "batch_syn", "lr_init", "lr_lr", "lr_momentum", "lr_min", "dsa", "dsa_strategy",
            "max_experts"))
        super().__init__(real, ipc=ipc, generator=generator)
        self.buffer = ExpertBuffer.open(buffer_dir)
        self.buffer_dir = str(buffer_dir)
        self._check_dataset(real)
        d_steps, d_m, d_start = FMNIST_DEFAULTS[1 if ipc == 1 else 10]
        self.syn_steps = int(syn_steps) if syn_steps is not None else d_steps
        self.expert_epochs = int(expert_epochs) if expert_epochs is not None else d_m
        self.min_start_epoch = int(min_start_epoch)
        E = self.buffer.epochs
        limit = E - self.expert_epochs + 1        # start + M <= E for every start < max_start
        if max_start_epoch is None:
            self.max_start_epoch = min(d_start, limit)
            if self.max_start_epoch < d_start:
                log.info("tm: max_start_epoch %d (the buffer has %d epochs; default %d)",
                         self.max_start_epoch, E, d_start)
        else:
            self.max_start_epoch = int(max_start_epoch)
            if self.max_start_epoch > limit:
                raise ValueError(f"tm: max_start_epoch {self.max_start_epoch} + expert_epochs "
                                 f"{self.expert_epochs} needs experts with at least "
                                 f"{self.max_start_epoch + self.expert_epochs - 1} epochs; "
                                 f"{self.buffer_dir} has {E}")
        if self.syn_steps < 1 or self.expert_epochs < 1:
            raise ValueError("tm: syn_steps and expert_epochs must be >= 1")
        if not (0 <= self.min_start_epoch < self.max_start_epoch):
            raise ValueError(f"tm: need 0 <= min_start_epoch < max_start_epoch, got "
                             f"{self.min_start_epoch}, {self.max_start_epoch} (buffer epochs {E}, "
                             f"expert_epochs {self.expert_epochs})")
        self.num_experts = self.buffer.num_experts
        if max_experts is not None:
            if int(max_experts) < 1:
                raise ValueError("tm: max_experts must be >= 1")
            self.num_experts = min(self.num_experts, int(max_experts))
        self.batch_syn = None if batch_syn is None else int(batch_syn)
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError("tm: batch_syn must be >= 1")
        for key, val in (("lr_init", lr_init), ("lr_lr", lr_lr), ("lr_min", lr_min)):
            if not (val >= 0 and math.isfinite(val)):
                raise ValueError(f"tm: {key} must be a finite number >= 0, got {val}")
        if lr_init <= 0:
            raise ValueError(f"tm: lr_init must be > 0, got {lr_init}")
        self.lr_init, self.lr_lr = float(lr_init), float(lr_lr)
        self.lr_momentum, self.lr_min = float(lr_momentum), float(lr_min)
        self.dsa = bool(dsa)
        self.dsa_strategy = str(dsa_strategy)
        self.device = torch.device(real.device)

        # The student network: the experts' architecture; its own weights are never used.
        cfg, spec = self.buffer.config, real.spec
        self.net = _core.get_network(cfg["model"], spec.channels, spec.num_classes,
                                     (spec.height, spec.width), width=cfg["width"],
                                     depth=cfg["depth"], seed=0).to(self.device).train()
        names, shapes = param_layout(self.net)
        if names != self.buffer.names or [list(s) for s in shapes] != \
                [list(s) for s in self.buffer.shapes]:
            raise BufferError(f"tm: the network {cfg['model']} built now does not have the "
                              f"parameter layout recorded in {self.buffer_dir}/buffer.json")
        self.names, self.shapes = names, shapes
        for p in self.net.parameters():
            p.requires_grad_(False)

        self.syn_lr = torch.tensor(self.lr_init, device=self.device, requires_grad=True)
        self.lr_opt = torch.optim.SGD([self.syn_lr], lr=self.lr_lr, momentum=self.lr_momentum)
        self.last_loss: float | None = None
        self.memory_estimate = self.estimate_memory()
        est_b = self.memory_estimate["total_bytes"]
        log.info("tm: student unroll keeps ~%.1f MiB until backward (%d steps x (2 x %d params + "
                 "activations of %d images))", est_b / 2**20, self.syn_steps,
                 self.buffer.num_params, self.memory_estimate["batch"])
        avail = _available_bytes(self.device)
        if avail is not None and est_b > 0.8 * avail:
            warnings.warn(f"tm: the student unroll needs ~{est_b / 2**30:.1f} GiB "
                          f"({self.syn_steps} steps x {self.memory_estimate['batch']} images), "
                          f"{avail / 2**30:.1f} GiB is available on {self.device}; lower "
                          f"syn_steps or batch_syn", RuntimeWarning, stacklevel=2)

    @classmethod
    def quick_options(cls, real: RealData, ipc: int, workdir: str | os.PathLike
                      ) -> dict[str, Any]:
        """A buffer of 2 tiny experts (width 4, :func:`splatdd.testing.quick_depth` blocks, 3
        epochs) trained on ``real`` under ``workdir`` (once per dataset shape; later calls reuse
        it), 3 student steps of 1 epoch from start epochs 0..1."""
        from splatdd.testing import quick_depth

        from .buffer import train_experts
        spec = real.spec
        out = Path(workdir) / (f"tm-quick-buffer-{spec.name}-{spec.channels}x{spec.height}x"
                               f"{spec.width}-{spec.num_classes}{'-zca' if spec.zca else ''}")
        train_experts(real, out, experts=2, net_width=4, net_depth=quick_depth(spec), epochs=3,
                      batch_size=16, seed=0, progress=False)
        return {"buffer_dir": str(out), "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2}

    # ---- checks & reports ---------------------------------------------------------------------
    def _check_dataset(self, real: RealData) -> None:
        b, r = self.buffer.spec, real.spec
        wrong = [k for k in ("name", "channels", "height", "width", "num_classes", "zca")
                 if getattr(b, k) != getattr(r, k)]
        if wrong:
            detail = ", ".join(f"{k} {getattr(b, k)!r} vs {getattr(r, k)!r}" for k in wrong)
            raise BufferError(f"tm: the experts in {self.buffer_dir} were trained on other data "
                              f"than the real data given ({detail})")

    def _batch(self, n: int) -> int:
        return n if self.batch_syn is None else min(self.batch_syn, n)

    def estimate_memory(self, n_images: int | None = None) -> dict[str, int]:
        """Estimated bytes the unroll keeps alive (see
        :func:`splatdd_tm.unroll.estimate_unroll_bytes`) for ``n_images`` synthetic images
        (default ``num_classes * ipc``)."""
        spec = self.real.spec
        n = n_images if n_images is not None else spec.num_classes * self.ipc
        b = self._batch(n)
        act = activation_bytes(self.net, (b, spec.channels, spec.height, spec.width))
        est = estimate_unroll_bytes(self.buffer.num_params, self.syn_steps, act)
        est["batch"] = b
        est["activation_bytes_per_forward"] = act
        return est

    def measure_memory(self, param: Parameterization) -> dict[str, Any]:
        """Run one loss + backward and report its measured peak memory next to the estimate
        (see :func:`splatdd_tm.unroll.measure_peak_bytes` for what is measured). Leaves gradients
        in ``param``'s tensors and the lr; the generator advances."""
        def run() -> None:
            self.loss(param, 0).backward()

        measured = measure_peak_bytes(run, self.device)
        est = self.estimate_memory(len(param.labels))
        return {**est, "measured_peak_bytes": measured["peak_bytes"],
                "measured_by": measured["method"]}

    # ---- the loss -------------------------------------------------------------------------------
    def _schedule(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``syn_steps`` minibatches: consecutive chunks of fresh random permutations (MTT)."""
        b = self._batch(n)
        out: list[torch.Tensor] = []
        while len(out) < self.syn_steps:
            perm = torch.randperm(n, generator=generator)
            out.extend(perm.split(b))
        return out[:self.syn_steps]

    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        # one shared draw per step, then this rank's own segment stream: on K processes every
        # rank unrolls a different expert segment (gradients averaged: K x the trajectories)
        g = distributed.item_generator(draw_seed(self.generator), distributed.rank())
        expert = int(torch.randint(0, self.num_experts, (1,), generator=g).item())
        start = int(torch.randint(self.min_start_epoch, self.max_start_epoch, (1,),
                                  generator=g).item())
        rows = self.buffer.read(expert, [start, start + self.expert_epochs]).to(self.device)
        theta_start, theta_target = rows[0], rows[1]

        labels_all = param.labels
        n = len(labels_all)
        if n == 0:
            raise ValueError("tm: the parameterization has no images")
        schedule = self._schedule(n, g)
        used = torch.unique(torch.cat(schedule))                 # decode each image once
        pos = torch.full((n,), -1, dtype=torch.long)
        pos[used] = torch.arange(len(used))
        images = param.decode(used.to(labels_all.device)).to(self.device)
        labels = labels_all.to(self.device).index_select(0, used.to(self.device))
        batches = [pos[b].to(self.device) for b in schedule]
        seeds = [draw_seed(g) for _ in batches] if self.dsa else []

        def augment(x: torch.Tensor, i: int) -> torch.Tensor:
            return _core.dsa(x, self.dsa_strategy, seeds[i], per_sample=True)

        if self.syn_lr.grad is not None:
            self.syn_lr.grad = None
        theta = student_unroll(self.net, self.names, self.shapes, theta_start, images, labels,
                               self.syn_lr, batches, augment if self.dsa else None)
        loss = tm_loss(theta, theta_start, theta_target)
        self.last_loss = float(loss.detach())
        self.last_expert, self.last_start = expert, start
        return loss

    def extra_parameters(self) -> list[torch.Tensor]:
        """The learned lr: averaged over ranks with the images' gradients."""
        return [self.syn_lr]

    def after_step(self, param: Parameterization) -> None:
        """Step the learnable lr's own optimiser and clip it at ``lr_min``."""
        if self.syn_lr.grad is not None:
            self.lr_opt.step()
        self.lr_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.syn_lr.clamp_(min=self.lr_min)

    def learned_lr(self) -> float:
        """The learned student lr, the evaluation lr (:class:`splatdd.plugin_api.LearnsEvalLR`)."""
        return float(self.syn_lr.detach())

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"syn_lr": float(self.syn_lr.detach()), "lr_opt": self.lr_opt.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.syn_lr.fill_(float(state["syn_lr"]))
        if "lr_opt" in state:
            self.lr_opt.load_state_dict(state["lr_opt"])
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def config(self) -> dict[str, Any]:
        return {"buffer_dir": self.buffer_dir, "syn_steps": self.syn_steps,
                "expert_epochs": self.expert_epochs, "max_start_epoch": self.max_start_epoch,
                "min_start_epoch": self.min_start_epoch, "batch_syn": self.batch_syn,
                "lr_init": self.lr_init, "lr_lr": self.lr_lr, "lr_momentum": self.lr_momentum,
                "lr_min": self.lr_min, "dsa": self.dsa, "dsa_strategy": self.dsa_strategy,
                "num_experts": self.num_experts, "expert_model": self.buffer.config["model"],
                "expert_epochs_in_buffer": self.buffer.epochs}
