"""Networks of the dataset-distillation protocol: ConvNet-D (DC/DSA/DM/MTT) and the
cross-architecture nets AlexNet, VGG11, ResNet18 and a small ViT, for 1 or 3 channels and
28..256 px.

All are plain ``nn.Module``s with no in-place tricks, so ``torch.func.functional_call`` works
(trajectory matching relies on it). Default normalisation is "instance norm" implemented as
``GroupNorm(C, C, affine=True)`` like the reference code; ``norm="batchnorm"`` gives BatchNorm2d
(running stats are buffers) and ``norm="none"`` none.

Differences from DC's ``networks.py`` (documented so results are comparable):

* ConvNet: identical layer stack. DC pads 28 px single-channel input to 32 implicitly through
  ``padding=3`` on the first conv; we do exactly that (only for 1 channel at 28x28). Other sizes
  use their own feature-map size (floor-halved per pooling).
* AlexNet / VGG11: DC's instance-norm-free AlexNet and instance-norm VGG11 (``VGG11`` in DC) with
  the same 28 px padding trick; before the head we add an adaptive average pool (to 4x4 for
  AlexNet, 1x1 for VGG11), which is the identity at 28/32 px and lets 64..256 px inputs work with
  the same head size.
* ResNet18: DC's instance-norm ResNet18 (3x3 stem, stride 1, no max-pool) with a global average
  pool before the head (DC's 4x4 average pool is the same thing at 32 px).
* ViT: not in DC; a small pre-norm ViT (dim 128, depth 4, 4 heads, MLP 256, class token, learned
  position embeddings) with patch size 4 up to 32 px, 8 up to 64, 16 up to 128, 32 above, the
  input zero-padded to a multiple of the patch size.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm_act_pool import (CONV_FUSED_MAX_CIN, conv_instance_norm_act_pool, fused_available,
                            instance_norm_act_pool)
from .winograd import (WinogradWorkspace, conv3x3_winograd, winograd_available,
                       winograd_weight)
from .winograd_train import MAX_TRAIN_PADDING, winograd_conv_first_order, winograd_grad_weight

__all__ = ["get_network", "default_depth", "NETWORKS", "ConvNet", "AlexNet", "VGG11", "ResNet18",
           "ViT", "first_order", "set_first_order"]

#: Largest graph-free conv output (values) a ConvNet keeps as a buffer between calls (16 MB):
#: passes of a few images (the test pass, dm's real batches) then map no fresh pages per call.
SCRATCH_MAX_VALUES = 1 << 22

NETWORKS = ("ConvNet", "ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4", "ConvNetD5",
            "ConvNetD6", "AlexNet", "VGG11", "ResNet18", "ViT")


def _hw(im_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(im_size, int):
        return im_size, im_size
    h, w = (int(v) for v in im_size)
    return h, w


def default_depth(im_size: int | Sequence[int]) -> int:
    """ConvNet depth by resolution: 3 up to 32 px, 4 up to 64, 5 up to 128, 6 above."""
    s = max(_hw(im_size))
    return 3 if s <= 32 else 4 if s <= 64 else 5 if s <= 128 else 6


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(c)
    if kind == "groupnorm":
        return nn.GroupNorm(4 if c % 4 == 0 else 1, c, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected instancenorm, batchnorm, groupnorm or none")


def _act(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01)
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {kind!r}; expected relu, leakyrelu, sigmoid or gelu")


def _pool(kind: str) -> nn.Module | None:
    kind = {"avg": "avgpooling", "max": "maxpooling"}.get(kind, kind)
    if kind == "avgpooling":
        return nn.AvgPool2d(2, 2)
    if kind == "maxpooling":
        return nn.MaxPool2d(2, 2)
    if kind == "none":
        return None
    raise ValueError(f"unknown pool {kind!r}; expected avgpooling, maxpooling or none")


def _mnist_pad(channels: int, h: int, w: int) -> int:
    """DC's implicit 28 -> 32 padding: first conv gets padding 3 instead of 1."""
    return 3 if channels == 1 and (h, w) == (28, 28) else 1


@contextlib.contextmanager
def first_order(net: nn.Module) -> Iterator[nn.Module]:
    """Promise that no second derivative is taken through ``net`` inside the block, which lets its
    ConvNets run their fused (first-order) instance-norm blocks under a graph too; restored on exit.

    >>> net = get_network("ConvNet", 1, 10, 28)
    >>> with first_order(net):
    ...     net(torch.zeros(2, 1, 28, 28)).sum().backward()
    >>> net.first_order_only
    False
    """
    saved = set_first_order(net, True)
    try:
        yield net
    finally:
        for m, v in saved:
            m.first_order_only = v


def set_first_order(net: nn.Module, value: bool) -> list[tuple[nn.Module, bool]]:
    """Set every ConvNet in ``net`` to ``first_order_only = value`` (for good: a net its owner
    only ever differentiates once, like dm's embedder); returns ``(module, previous value)``
    pairs. :func:`first_order` is the scoped form.

    >>> net = get_network("ConvNet", 1, 10, 28)
    >>> set_first_order(net, True) == [(net, False)] and net.first_order_only
    True
    """
    saved = [(m, m.first_order_only) for m in net.modules() if isinstance(m, ConvNet)]
    for m, _ in saved:
        m.first_order_only = value
    return saved


# ------------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """depth x [conv3x3(width) -> norm -> act -> pool] -> flatten -> linear."""

    def __init__(self, channels: int, num_classes: int, im_size=(32, 32), *, width: int = 128,
                 depth: int = 3, norm: str = "instancenorm", act: str = "relu",
                 pool: str = "avgpooling") -> None:
        super().__init__()
        h, w = _hw(im_size)
        layers: list[nn.Module] = []
        c_in = channels
        for d in range(depth):
            pad = _mnist_pad(channels, *_hw(im_size)) if d == 0 else 1
            layers.append(nn.Conv2d(c_in, width, 3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            if norm != "none":
                layers.append(_norm(norm, width))
            layers.append(_act(act))
            p = _pool(pool)
            if p is not None:
                layers.append(p)
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(f"ConvNet depth {depth} is too deep for {_hw(im_size)} images")
            c_in = width
        self.features = nn.Sequential(*layers)
        self.feature_shape = (width, h, w)
        self.classifier = nn.Linear(width * h * w, num_classes)
        # instance norm -> ReLU -> avg pool blocks run fused on the CPU (splatdd.norm_act_pool);
        # under a graph only inside first_order() (the fused backward is first-order only)
        self._fusable = norm == "instancenorm" and act == "relu" and pool in (
            "avgpooling", "avg", "none")
        self._pool = "none" if pool == "none" else "avg"
        self.first_order_only = False
        # layer -> (the weight's values, U, Ut or None): splatdd.winograd_train.winograd_filters
        self._winograd_cache: dict[int, tuple] = {}
        self._scratch_bufs: dict[tuple[int, int], torch.Tensor] = {}   # (thread, layer) -> out
        self._workspaces: dict[tuple[int, int], WinogradWorkspace] = {}  # (thread, layer)

    def _fused_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """The feature stack through the fused blocks, or None where they do not apply."""
        grad = torch.is_grad_enabled()
        if not self._fusable or (grad and not self.first_order_only) or not fused_available(
                x, grad=grad):
            return None
        for i, conv, norm in self.blocks():
            if conv.in_channels <= CONV_FUSED_MAX_CIN:   # the image's few channels: one call
                x = conv_instance_norm_act_pool(x, conv.weight, conv.bias, norm.weight, norm.bias,
                                                padding=conv.padding[0], eps=norm.eps, act="relu",
                                                pool=self._pool)
                continue
            x = instance_norm_act_pool(self._conv(i, conv, x), norm.weight, norm.bias,
                                       eps=norm.eps, act="relu", pool=self._pool)
        return x

    def blocks(self) -> list[tuple[int, nn.Module, nn.Module]]:
        """``(i, conv, norm)`` per block: ``self.features[i]`` is its convolution, the module after
        it its normalisation (with ``norm="instancenorm"``, the blocks the fused paths run).

        >>> [i for i, _, _ in get_network("ConvNet", 1, 10, 28, width=16).blocks()]
        [0, 4, 8]
        """
        mods = list(self.features)
        step = 3 if self._pool == "none" else 4
        return [(i, mods[i], mods[i + 1]) for i in range(0, len(mods), step)]

    def _conv(self, i: int, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)``; on the CPU by Winograd F(4x4, 3x3) (splatdd.winograd): without a graph,
        or under one inside first_order (splatdd.winograd_train); the transformed filters are
        cached per layer until the weight changes."""
        grad = torch.is_grad_enabled()
        if not winograd_available(x, conv.weight, grad=False, stride=conv.stride,
                                  dilation=conv.dilation, groups=conv.groups) \
                or conv.padding_mode != "zeros" or conv.padding[0] != conv.padding[1] \
                or (grad and conv.padding[0] > MAX_TRAIN_PADDING):
            return conv(x)
        U, Ut = self.winograd_filters(i, grad=grad)
        ws = self.workspace(i)
        if grad:
            return winograd_conv_first_order(x, conv.weight, conv.bias, U, Ut,
                                             padding=conv.padding[0], workspace=ws)
        return conv3x3_winograd(x, U, conv.bias, padding=conv.padding[0],
                                out=self._scratch(i, x, conv), workspace=ws)

    def winograd_filters(self, i: int, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(U, Ut)`` of the convolution ``self.features[i]`` (``Ut``, the input gradient's
        filters, only with ``grad``, else None): :func:`splatdd.winograd_train.winograd_filters`,
        cached while the weight's values stay equal to those it was computed from (compared in
        full on every call: in-place updates that autograd's version counter does not see, such
        as torch's fused optimizers or ``.data`` writes, cannot leave it stale).

        >>> net = get_network("ConvNet", 1, 10, 28, width=16)
        >>> U, Ut = net.winograd_filters(4, grad=True)
        >>> U.shape, Ut.shape
        (torch.Size([36, 16, 16]), torch.Size([36, 16, 16]))
        """
        w = self.features[i].weight.detach()
        hit = self._winograd_cache.get(i)
        if hit is None or hit[0].shape != w.shape or not torch.equal(hit[0], w):
            hit = (w.clone(), winograd_weight(w), None)
        if grad and hit[2] is None:                  # the input gradient's filters, when needed
            hit = (hit[0], hit[1], winograd_grad_weight(w))
        self._winograd_cache[i] = hit
        return hit[1], hit[2]

    def workspace(self, key) -> WinogradWorkspace:
        """This thread's :class:`~splatdd.winograd.WinogradWorkspace` named ``key`` (a layer's
        index, or a name), kept between calls.

        >>> net = get_network("ConvNet", 1, 10, 28, width=16)
        >>> net.workspace("step") is net.workspace("step")
        True
        """
        return self._workspaces.setdefault((threading.get_ident(), key), WinogradWorkspace())

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` leave out the filter cache and the per-thread buffers
        (rebuilt on first use; tens of megabytes after a training pass, which dm's bf16 copy of
        its embedder would otherwise copy every step)."""
        state = dict(super().__getstate__())
        state.update(_winograd_cache={}, _scratch_bufs={}, _workspaces={})
        return state

    def _scratch(self, i: int, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor | None:
        """A graph-free conv output buffer of layer ``i`` kept between calls (per thread; the
        fused block consumes it at once), so passes of a few images map no fresh pages; None
        (a new tensor) above :data:`SCRATCH_MAX_VALUES`."""
        p = conv.padding[0]
        shape = (x.shape[0], conv.out_channels, x.shape[2] + 2 * p - 2, x.shape[3] + 2 * p - 2)
        if math.prod(shape) > SCRATCH_MAX_VALUES:
            return None
        key = (threading.get_ident(), i)
        buf = self._scratch_bufs.get(key)
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.empty(shape, dtype=torch.float32)
            self._scratch_bufs[key] = buf
        return buf

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the head (what DM matches)."""
        fused = self._fused_features(x)
        if fused is not None:
            return fused.flatten(1)
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class AlexNet(nn.Module):
    """DC's AlexNet (no normalisation layers), adaptive 4x4 pool before the head."""

    def __init__(self, channels: int, num_classes: int, im_size=(32, 32)) -> None:
        super().__init__()
        pad = 4 if _mnist_pad(channels, *_hw(im_size)) == 3 else 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.AdaptiveAvgPool2d((4, 4)),
        )
        self.fc = nn.Linear(192 * 4 * 4, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


class VGG11(nn.Module):
    """DC's VGG11 with instance norm (GroupNorm(C, C)), adaptive 1x1 pool before the head."""

    cfg = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, channels: int, num_classes: int, im_size=(32, 32), *,
                 norm: str = "instancenorm") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i, v in enumerate(self.cfg):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                pad = _mnist_pad(channels, *_hw(im_size)) if i == 0 else 1
                layers += [nn.Conv2d(c_in, v, 3, padding=pad), _norm(norm, v), nn.ReLU()]
                c_in = v
        layers.append(nn.AdaptiveAvgPool2d((1, 1)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """DC's ResNet18 (instance norm by default), global average pool before the head."""

    def __init__(self, channels: int, num_classes: int, im_size=(32, 32), *,
                 norm: str = "instancenorm") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks.append(nn.Sequential(_BasicBlock(c_in, c_out, stride, norm),
                                        _BasicBlock(c_out, c_out, 1, norm)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def vit_patch_size(im_size) -> int:
    s = max(_hw(im_size))
    return 4 if s <= 32 else 8 if s <= 64 else 16 if s <= 128 else 32


class ViT(nn.Module):
    """Small pre-norm ViT with a class token (attention written out so functional_call and
    double-backward work; no fused fast paths)."""

    def __init__(self, channels: int, num_classes: int, im_size=(32, 32), *, dim: int = 128,
                 depth: int = 4, heads: int = 4, mlp: int = 256, patch: int | None = None) -> None:
        super().__init__()
        h, w = _hw(im_size)
        self.patch = patch or vit_patch_size((h, w))
        gh, gw = -(-h // self.patch), -(-w // self.patch)
        self.pad = (0, gw * self.patch - w, 0, gh * self.patch - h)
        self.patch_embed = nn.Conv2d(channels, dim, self.patch, stride=self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, gh * gw + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.norm(self.blocks(t))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


# ------------------------------------------------------------------------------------------------
def _build(name: str, channels: int, num_classes: int, hw: tuple[int, int], *, width, depth,
           norm, act, pool) -> nn.Module:
    m = re.fullmatch(r"ConvNet(?:D(\d+))?", name)
    if m:
        d = int(m.group(1)) if m.group(1) else (depth if depth is not None else default_depth(hw))
        return ConvNet(channels, num_classes, hw, width=width, depth=d, norm=norm, act=act,
                       pool=pool)
    if name == "AlexNet":
        return AlexNet(channels, num_classes, hw)
    if name == "VGG11":
        return VGG11(channels, num_classes, hw, norm=norm)
    if name == "ResNet18":
        return ResNet18(channels, num_classes, hw, norm=norm)
    if name == "ViT":
        return ViT(channels, num_classes, hw, depth=depth if depth is not None else 4)
    raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORKS)}")


def get_network(name: str, channels: int, num_classes: int, im_size: int | Sequence[int], *,
                width: int = 128, depth: int | None = None, norm: str = "instancenorm",
                act: str = "relu", pool: str = "avgpooling", seed: int | None = None,
                device: str | torch.device | None = None) -> nn.Module:
    """Build a network by name (see :data:`NETWORKS`).

    ``depth`` overrides the ConvNet depth (default by resolution, :func:`default_depth`; the
    ``ConvNetD<k>`` names fix it) and the ViT depth. ``width``/``act``/``pool`` apply to ConvNet,
    ``norm`` to ConvNet, VGG11 and ResNet18. With ``seed`` the initialisation is deterministic and
    the global RNG is left untouched (built under ``torch.random.fork_rng``); without it the
    global RNG is used as usual.
    """
    hw = _hw(im_size)
    if channels < 1 or num_classes < 1 or min(hw) < 1:
        raise ValueError(f"bad network shape: channels={channels} num_classes={num_classes} "
                         f"im_size={im_size}")
    kw = dict(width=width, depth=depth, norm=norm, act=act, pool=pool)
    if seed is None:
        net = _build(name, channels, num_classes, hw, **kw)
    else:
        with torch.random.fork_rng(devices=[]):
            # CPU generator only (modules initialise on the CPU); torch.manual_seed would also
            # reseed every CUDA device, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(int(seed))
            net = _build(name, channels, num_classes, hw, **kw)
    if device is not None:
        net = net.to(device)
    return net
