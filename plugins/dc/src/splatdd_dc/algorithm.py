"""Dataset condensation by gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021), with DSA.

Per outer step and per class ``c``, a real batch of class ``c`` and the synthetic images of class
``c`` go through the same network (with the same DSA transform: one shared seed); the loss is the
layer-wise distance between the two gradients of the cross-entropy with respect to the network's
weights (:func:`layer_distance`). The algorithm only ever calls ``param.decode``, ``param.labels``
and ``param.class_indices``: it works with any parameterization.

Mapping of the paper's loops onto :class:`splatdd.plugin_api.Algorithm`:

* one :meth:`GradientMatching.loss` call is one *outer* step: the matching loss summed over classes;
* a fresh randomly initialised network is drawn (from the algorithm's generator) every
  ``outer_loop`` calls, i.e. at the start of each of the paper's "iterations";
* :meth:`GradientMatching.after_step` (which receives the parameterization) trains that network on
  the (detached, freshly decoded) synthetic set for ``inner_loop`` epochs (SGD lr 0.01, momentum 0.5, batch 256, DSA), except after
  the last outer step of a group, where the paper breaks out of the loop (the network is discarded).

So the paper's ``Iteration = 1000`` is ``1000 * outer_loop`` calls of :meth:`loss` here; the class's
``default_iterations`` (1000) counts calls, see ``docs/dc.md``.

Randomness and multi-process runs (``docs/distributed.md``): the algorithm's generator (saved in
checkpoints) draws the network's seed, one step seed per outer step and the inner training's
shuffles and DSA seeds; class ``c``'s real batch and siamese DSA seed come from
:func:`splatdd.distributed.item_generator` (step seed, ``c``). On K processes each rank computes the
matching terms of the classes :func:`splatdd.distributed.owned` gives it and the parameterization's
gradients are summed (``gradient_reduction = "sum"``); every rank then holds the same synthetic set,
so the inner training, which draws only from the shared generator, updates every rank's network
identically: no network gradient is communicated, and K processes take the steps one process takes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from splatdd import distributed
from splatdd.augment import DEFAULT_STRATEGY, dsa
from splatdd.models import get_network
from splatdd.plugin_api import (PLUGIN_API_VERSION, Algorithm, Parameterization, RealData,
                                draw_seed, reject_unknown_options)

__all__ = ["GradientMatching", "layer_distance", "match_loss", "dc_loops"]

#: The DC code base's (outer_loop, inner_loop) by images per class (``utils.get_loops``).
DC_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20),
                                        40: (40, 15), 50: (50, 10)}

#: Real images per forward/backward pass of the real-batch gradient on the CPU (issue 15): the
#: gradient of the batch-mean loss is accumulated over passes, which keeps activations small
#: (no per-call mapping of ~100 MB buffers); the same gradient up to float rounding, since the
#: matching network is per-sample here (instance norm, or batch norm frozen to eval mode).
REAL_CHUNK = 8

#: Added to the product of the row norms, as in the DC code (``distance_wb``).
COS_EPS = 1e-6


def dc_loops(ipc: int) -> tuple[int, int]:
    """``(outer_loop, inner_loop)`` for ``ipc`` images per class.

    The DC table for IPC 1, 10, 20, 30, 40, 50; for any other IPC (the paper defines none):
    ``outer_loop = clip(ipc, 1, 50)`` and ``inner_loop = clip(round(500 / ipc), 1, 50)``, which
    reproduces 10/50, 20/25 and 50/10 and keeps roughly 500 synthetic-image passes per outer loop.
    """
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc]
    return min(max(ipc, 1), 50), min(max(int(round(500 / ipc)), 1), 50)


# ------------------------------------------------------------------------------------------------
# the layer-wise gradient distance
# ------------------------------------------------------------------------------------------------
def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """DC's distance between two gradients of one parameter tensor.

    Tensors with more than one dimension are reshaped to ``(out_rows, -1)`` and the distance is
    ``sum over rows of (1 - cos(g_real_row, g_syn_row))`` (``eps`` added to the product of the
    norms). One-dimensional tensors (biases, normalisation scales/shifts) give 0: the paper ignores
    them.
    """
    if g_real.shape != g_syn.shape:
        raise ValueError(f"gradient shapes differ: {tuple(g_real.shape)} vs {tuple(g_syn.shape)}")
    if g_real.dim() <= 1:
        return g_syn.new_zeros(())
    a = g_real.reshape(g_real.shape[0], -1)
    b = g_syn.reshape(g_syn.shape[0], -1)
    cos = (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)
    return (1.0 - cos).sum()


def match_loss(g_real: Sequence[torch.Tensor], g_syn: Sequence[torch.Tensor],
               eps: float = COS_EPS) -> torch.Tensor:
    """Sum of :func:`layer_distance` over parameter tensors (1-D ones contribute nothing)."""
    if len(g_real) != len(g_syn):
        raise ValueError(f"{len(g_real)} real gradients vs {len(g_syn)} synthetic ones")
    if len(g_syn) == 0:
        raise ValueError("no gradients to match")
    total = g_syn[0].new_zeros(())
    for gr, gs in zip(g_real, g_syn):
        total = total + layer_distance(gr, gs, eps)
    return total


def _is_batchnorm(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm)


class GradientMatching(Algorithm):
    """Gradient matching (DC) with DSA. Options (all keyword):

    ``model`` ("ConvNet"), ``net_width`` (128), ``net_depth`` (None: by resolution), ``net_norm``
    ("instancenorm") -- the matching network, from :func:`splatdd.models.get_network` (the same
    ``net_*`` names as dm);
    ``batch_real`` (256) real images per class per outer step;
    ``outer_loop`` / ``inner_loop`` (None: :func:`dc_loops` of ``ipc``);
    ``lr_net`` (0.01), ``momentum_net`` (0.5), ``batch_train`` (256) -- the inner network's training;
    ``dsa`` (True), ``dsa_strategy`` (:data:`splatdd.augment.DEFAULT_STRATEGY`).
    """

    name = "dc"
    api_version = PLUGIN_API_VERSION
    regime = "gradient"
    default_iterations = 1000
    #: Multi-process: each rank matches its classes' gradients; the parameterization's gradients
    #: are summed (the inner network is trained identically on every rank).
    gradient_reduction = "sum"

    def __init__(self, real: RealData, *, ipc: int, generator: torch.Generator,
                 model: str = "ConvNet", net_width: int = 128, net_depth: int | None = None,
                 net_norm: str = "instancenorm", batch_real: int = 256, outer_loop: int | None = None,
                 inner_loop: int | None = None, lr_net: float = 0.01, momentum_net: float = 0.5,
                 batch_train: int = 256, dsa: bool = True,
                 dsa_strategy: str = DEFAULT_STRATEGY, **unknown: Any) -> None:
        reject_unknown_options("dc", unknown, ("model", "net_width", "net_depth", "net_norm",
                                               "batch_real",
                                               "outer_loop", "inner_loop", "lr_net",
                                               "momentum_net", "batch_train", "dsa",
                                               "dsa_strategy"))
        super().__init__(real, ipc=ipc, generator=generator)
        d_outer, d_inner = dc_loops(ipc)
        self.outer_loop = int(outer_loop) if outer_loop is not None else d_outer
        self.inner_loop = int(inner_loop) if inner_loop is not None else d_inner
        for key, val in (("outer_loop", self.outer_loop), ("inner_loop", self.inner_loop),
                         ("batch_real", batch_real), ("batch_train", batch_train),
                         ("net_width", net_width)):
            if int(val) < 1:
                raise ValueError(f"dc: {key} must be >= 1, got {val}")
        if not (lr_net > 0 and math.isfinite(lr_net)):
            raise ValueError(f"dc: lr_net must be a positive number, got {lr_net}")
        self.model = str(model)
        self.net_width = int(net_width)
        self.net_depth = None if net_depth is None else int(net_depth)
        self.net_norm = str(net_norm)
        self.batch_real = int(batch_real)
        self.batch_train = int(batch_train)
        self.lr_net = float(lr_net)
        self.momentum_net = float(momentum_net)
        self.dsa = bool(dsa)
        self.dsa_strategy = str(dsa_strategy)
        self.spec = real.spec
        self.device = torch.device(real.device)
        # state
        self._net: torch.nn.Module | None = None
        self._net_opt: torch.optim.Optimizer | None = None
        self._pos = 0                     # outer step within the current group, 0..outer_loop-1
        self.last_loss: float | None = None

    @classmethod
    def quick_options(cls, real: RealData, ipc: int, workdir: Any = None) -> dict[str, Any]:
        """A width-8 network (:func:`splatdd.testing.quick_depth` blocks), real batches of 8, two
        inner epochs."""
        from splatdd.testing import quick_depth
        return {"net_width": 8, "net_depth": quick_depth(real.spec), "batch_real": 8,
                "inner_loop": 2}

    # ---- the network ----------------------------------------------------------------------------
    def _new_network(self) -> None:
        seed = draw_seed(self.generator, 2**62)
        net = get_network(self.model, self.spec.channels, self.spec.num_classes,
                          (self.spec.height, self.spec.width), width=self.net_width,
                          depth=self.net_depth, norm=self.net_norm, seed=seed)
        self._net = net.to(self.device).train()
        self._net_opt = torch.optim.SGD(self._net.parameters(), lr=self.lr_net,
                                        momentum=self.momentum_net)

    def _weights(self) -> list[torch.Tensor]:
        assert self._net is not None
        return [p for p in self._net.parameters() if p.requires_grad and p.dim() > 1]

    def _freeze_batchnorm(self) -> None:
        """As DC: BatchNorm statistics from 16 real images per class, then frozen (eval)."""
        net = self._net
        assert net is not None
        if not any(_is_batchnorm(m) for m in net.modules()):
            return
        net.train()
        with torch.no_grad():
            x = torch.cat([self.real.sample(c, 16, self.generator)
                           for c in range(self.spec.num_classes)])
            net(x.to(self.device))
        for m in net.modules():
            if _is_batchnorm(m):
                m.eval()

    # ---- Algorithm ------------------------------------------------------------------------------
    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        if self._net is None or self._pos == 0:
            self._new_network()
        total = self.matching_loss(param)
        self.last_loss = float(total.detach())
        return total

    def matching_loss(self, param: Parameterization) -> torch.Tensor:
        """The gradient-matching loss, summed over the classes this rank owns (all of them in one
        process), for the current network (no change of network, no inner training)."""
        if self._net is None:
            self._new_network()
        net = self._net
        assert net is not None
        self._freeze_batchnorm()
        weights = self._weights()
        images = param.decode()
        labels = param.labels.to(images.device)
        step_seed = draw_seed(self.generator)          # shared by every rank
        indices = {c: param.class_indices(c).to(images.device)
                   for c in range(self.spec.num_classes)}
        present = [c for c, idx in indices.items() if idx.numel() > 0]
        if not present:
            raise ValueError("dc: the parameterization has no images of any class")
        total = images.new_zeros(())
        mine = distributed.owned(present)
        if not mine:                                   # a rank with no class: a zero gradient
            return images.sum() * 0.0
        for c in mine:
            idx = indices[c]
            g = distributed.item_generator(step_seed, c)
            img_real = self.real.sample(c, self.batch_real, g).to(self.device)
            img_syn = images.index_select(0, idx).to(self.device)
            if self.dsa:
                seed = draw_seed(g)                    # siamese: one transform for both batches
                img_real = dsa(img_real, self.dsa_strategy, seed=seed, per_sample=False)
                img_syn = dsa(img_syn, self.dsa_strategy, seed=seed, per_sample=False)
            lab_real = torch.full((img_real.shape[0],), c, dtype=torch.long, device=self.device)
            lab_syn = labels.index_select(0, idx).to(self.device)
            g_real = self.real_gradient(net, weights, img_real, lab_real)
            loss_syn = F.cross_entropy(net(img_syn), lab_syn)
            g_syn = torch.autograd.grad(loss_syn, weights, create_graph=True)
            total = total + match_loss(g_real, g_syn)
        return total

    def real_gradient(self, net: torch.nn.Module, weights: Sequence[torch.Tensor],
                      x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Gradient of ``CE(net(x), y)`` (batch mean) w.r.t. ``weights``, detached; on the CPU
        accumulated over passes of :data:`REAL_CHUNK` images."""
        n = x.shape[0]
        chunk = REAL_CHUNK if x.device.type == "cpu" else n
        total: list[torch.Tensor] | None = None
        for i in range(0, n, chunk):
            loss = F.cross_entropy(net(x[i:i + chunk]), y[i:i + chunk], reduction="sum") / n
            grads = torch.autograd.grad(loss, weights)
            total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
        assert total is not None
        return [g.detach() for g in total]

    def after_step(self, param: Parameterization) -> None:
        """End of one outer step: train the network on ``param``'s updated images, or discard it
        at the end of the paper's outer loop."""
        if self._net is None:                # no loss() since the last network was discarded
            return
        self._pos += 1
        if self._pos >= self.outer_loop:     # end of the paper's outer loop: no inner training,
            self._pos = 0                    # a fresh network at the next loss() call
            self._net = None
            self._net_opt = None
            return
        self._train_inner(param)

    @torch.no_grad()
    def _decode_detached(self, param: Parameterization) -> tuple[torch.Tensor, torch.Tensor]:
        images = param.decode().detach().to(self.device)
        labels = param.labels.to(self.device)
        return images, labels

    def _train_inner(self, param: Parameterization) -> None:
        """``inner_loop`` epochs of SGD on the synthetic set (as DC's ``epoch('train', ...)``)."""
        net, opt = self._net, self._net_opt
        assert net is not None and opt is not None
        images, labels = self._decode_detached(param)
        net.train()
        n = images.shape[0]
        for _ in range(self.inner_loop):
            perm = torch.randperm(n, generator=self.generator).to(self.device)
            for i in range(0, n, self.batch_train):
                b = perm[i:i + self.batch_train]
                x, y = images[b], labels[b]
                if self.dsa:
                    x = dsa(x, self.dsa_strategy, seed=draw_seed(self.generator), per_sample=True)
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"pos": self._pos, "generator": self.generator.get_state()}
        if self._net is not None and self._pos > 0:
            assert self._net_opt is not None
            state["net"] = {k: v.detach().cpu().clone() for k, v in self._net.state_dict().items()}
            state["net_opt"] = self._net_opt.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pos = int(state.get("pos", 0))
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._net, self._net_opt = None, None
        if self._pos > 0:
            if "net" not in state:
                raise ValueError("dc: checkpoint is inside an outer loop but has no network state")
            # Rebuild the architecture without consuming the restored generator state.
            g_state = self.generator.get_state()
            self._new_network()
            self.generator.set_state(g_state)
            assert self._net is not None and self._net_opt is not None
            self._net.load_state_dict(state["net"])
            self._net_opt.load_state_dict(state["net_opt"])

    def config(self) -> dict[str, Any]:
        return {"model": self.model, "net_width": self.net_width, "net_depth": self.net_depth,
                "net_norm": self.net_norm, "batch_real": self.batch_real, "outer_loop": self.outer_loop,
                "inner_loop": self.inner_loop, "lr_net": self.lr_net,
                "momentum_net": self.momentum_net, "batch_train": self.batch_train,
                "dsa": self.dsa, "dsa_strategy": self.dsa_strategy}
