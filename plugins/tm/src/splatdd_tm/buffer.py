"""Expert trajectories for trajectory matching (MTT's ``buffer.py``), written and read.

A buffer is a directory::

    DIR/buffer.json                 settings shared by every expert (dataset, network, training,
                                    parameter layout); see :func:`buffer_config`
    DIR/expert_00000.safetensors    one file per expert: tensor ``trajectory`` (epochs + 1, P)
    DIR/expert_00001.safetensors    float32, row e = the flattened parameters after e epochs
    ...                             (row 0 = the random initialisation)

Experts are trained as in MTT: a fresh network, plain SGD (lr 0.01, momentum 0, weight decay 0),
batch 256, DSA on every batch (per-sample random transforms) unless disabled, cross-entropy, one
snapshot per epoch. Every expert file is written atomically when its expert is done; the expert
in progress is saved after every epoch (``expert_NNNNN.partial.pt``: its snapshots, network,
optimiser and generator state; removed when the expert file is written), so an interrupted or
killed run loses at most the epoch in progress, and running the same command again skips the
finished experts and continues the partial one. Expert ``i``'s randomness (initialisation,
shuffling, augmentation) comes only from ``(seed, i)``, so a resumed run writes the same bytes as an
uninterrupted one.

On K processes (``torchrun ... -m splatdd buffer``) the experts to train are spread over the ranks
(expert ``todo[j]`` on rank ``j mod K``, :func:`splatdd.distributed.owned`); each rank writes the
files of the experts it trained, and the files are the ones one process writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from splatdd import distributed
from splatdd.augment import DEFAULT_STRATEGY
from splatdd.plugin_api import DatasetSpec, RealData, draw_seed

from . import _core
from .unroll import flatten_params, param_layout

__all__ = ["BUFFER_FORMAT", "BUFFER_VERSION", "ExpertBuffer", "BufferError", "BufferInterrupted",
           "buffer_config", "train_experts", "expert_seed", "expert_path", "partial_path",
           "expert_metadata"]

BUFFER_FORMAT = "splatdd-expert-buffer"
BUFFER_VERSION = 1
CONFIG_NAME = "buffer.json"
META_KEY = "splatdd_expert"
_EXPERT_RE = re.compile(r"^expert_(\d{5,})\.safetensors$")


class BufferError(ValueError):
    """A buffer directory is missing, empty, inconsistent or was made with other settings."""


class BufferInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`train_experts`; ``message`` says what is saved and how to resume."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def expert_path(out_dir: str | os.PathLike, i: int) -> Path:
    return Path(out_dir) / f"expert_{i:05d}.safetensors"


def partial_path(out_dir: str | os.PathLike, i: int) -> Path:
    """Where expert ``i``'s state is saved after each epoch while it trains."""
    return Path(out_dir) / f"expert_{i:05d}.partial.pt"


def expert_seed(seed: int, i: int) -> int:
    """The 63-bit seed of expert ``i`` of a run seeded ``seed`` (independent streams per expert)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int(i)]).generate_state(
        2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)


def _spec_dict(spec: DatasetSpec) -> dict[str, Any]:
    return {"name": spec.name, "channels": spec.channels, "height": spec.height,
            "width": spec.width, "num_classes": spec.num_classes, "mean": list(spec.mean),
            "std": list(spec.std), "zca": bool(spec.zca)}


def buffer_config(spec: DatasetSpec, *, model: str = "ConvNet", net_width: int = 128,
                  net_depth: int | None = None, epochs: int = 50, lr: float = 0.01,
                  batch_size: int = 256, dsa: bool = True,
                  dsa_strategy: str = DEFAULT_STRATEGY, seed: int = 0) -> dict[str, Any]:
    """The settings recorded in ``buffer.json`` (plus the parameter layout, added on training).
    The file keeps its version-1 keys ``width``/``depth`` for the network's ``net_width``/
    ``net_depth``, so buffers trained before the options were renamed still open."""
    return {"format": BUFFER_FORMAT, "version": BUFFER_VERSION, "dataset": _spec_dict(spec),
            "model": model, "width": int(net_width),
            "depth": None if net_depth is None else int(net_depth),
            "epochs": int(epochs), "lr": float(lr), "momentum": 0.0, "weight_decay": 0.0,
            "batch_size": int(batch_size), "dsa": bool(dsa),
            "dsa_strategy": dsa_strategy if dsa else "none", "seed": int(seed)}


def _config_sha(cfg: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
@dataclass
class ExpertBuffer:
    """A directory of expert trajectories, read lazily (one row of one file at a time)."""

    directory: Path
    config: dict[str, Any]
    files: list[Path]

    @classmethod
    def open(cls, directory: str | os.PathLike | None) -> "ExpertBuffer":
        if directory is None or str(directory) == "":
            raise BufferError("tm needs buffer_dir: a directory of expert trajectories made by "
                              "`splatdd buffer --out DIR`")
        d = Path(str(directory))
        if not d.is_dir():
            raise BufferError(f"expert buffer {d} does not exist; make it with "
                              f"`splatdd buffer --out {d}`")
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            raise BufferError(f"expert buffer {d} has no {CONFIG_NAME}: not made by "
                              f"`splatdd buffer`, or empty")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BufferError(f"{cfg_path} is unreadable: {exc}") from exc
        if cfg.get("format") != BUFFER_FORMAT or cfg.get("version") != BUFFER_VERSION:
            raise BufferError(f"{cfg_path} is not a {BUFFER_FORMAT} v{BUFFER_VERSION} file")
        files = sorted((p for p in d.iterdir() if _EXPERT_RE.match(p.name)),
                       key=lambda p: int(_EXPERT_RE.match(p.name).group(1)))
        if not files:
            raise BufferError(f"expert buffer {d} is empty (no expert_*.safetensors yet); run "
                              f"`splatdd buffer --out {d}` to train experts")
        return cls(d, cfg, files)

    @property
    def num_experts(self) -> int:
        return len(self.files)

    @property
    def epochs(self) -> int:
        return int(self.config["epochs"])

    @property
    def num_params(self) -> int:
        return int(self.config["num_params"])

    @property
    def names(self) -> list[str]:
        return list(self.config["param_names"])

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.config["param_shapes"]]

    @property
    def spec(self) -> DatasetSpec:
        d = self.config["dataset"]
        return DatasetSpec(name=d["name"], channels=d["channels"], height=d["height"],
                           width=d["width"], num_classes=d["num_classes"],
                           mean=tuple(d["mean"]), std=tuple(d["std"]), zca=bool(d["zca"]))

    def read(self, expert: int, epochs: int | list[int]) -> torch.Tensor:
        """Row(s) of expert ``expert``'s trajectory: ``(P,)`` for one epoch, ``(k, P)`` for a list."""
        from safetensors import safe_open

        path = self.files[expert]
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice("trajectory")
            shape = sl.get_shape()
            if list(shape) != [self.epochs + 1, self.num_params]:
                raise BufferError(f"{path}: trajectory shape {shape}, expected "
                                  f"[{self.epochs + 1}, {self.num_params}]")
            if isinstance(epochs, int):
                return sl[epochs:epochs + 1].reshape(-1)
            return torch.stack([sl[e:e + 1].reshape(-1) for e in epochs])


def _valid_expert_file(path: Path, rows: int, num_params: int, cfg_sha: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            shape = f.get_slice("trajectory").get_shape()
    except Exception:  # noqa: BLE001 - unreadable: train it again
        return False
    return list(shape) == [rows, num_params] and meta.get("config_sha256") == cfg_sha


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _accuracy(net: torch.nn.Module, data: RealData, batch: int = 1024) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(data.labels), batch):
        x = data.images[i:i + batch].to(data.device)
        y = data.labels[i:i + batch].to(data.device)
        correct += int((net(x).argmax(1) == y).sum())
    net.train()
    return correct / max(len(data.labels), 1)


PARTIAL_FORMAT = "splatdd-expert-partial"


def _load_partial(path: Path, cfg_sha: str, seed: int, epochs: int) -> dict[str, Any] | None:
    """The saved state of an expert in progress, or None (absent, unreadable, other settings)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: start the expert again
        return None
    if (not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT
            or state.get("config_sha256") != cfg_sha or state.get("seed") != seed
            or not 0 < int(state.get("epochs_done", 0)) < epochs):
        return None
    return state


def _train_one_expert(train: RealData, cfg: Mapping[str, Any], seed: int, *,
                      on_epoch: Callable[[int, float], None] | None = None,
                      partial: Path | None = None, cfg_sha: str = "",
                      saved: Callable[[int], None] | None = None,
                      restored: Callable[[int], None] | None = None,
                      on_batch: Callable[[], None] | None = None,
                      ) -> tuple[torch.Tensor, torch.nn.Module, float]:
    """Train one expert. With ``partial``, continue from the state saved there (if it is this
    expert's, with these settings: ``restored(epochs_done)`` is called) and save the state after
    every epoch but the last (``saved(epochs_done)`` is called after each save)."""
    g = torch.Generator().manual_seed(seed)
    spec = train.spec
    net_seed = draw_seed(g, 2**62)
    net = _core.get_network(cfg["model"], spec.channels, spec.num_classes,
                            (spec.height, spec.width), width=cfg["width"], depth=cfg["depth"],
                            seed=net_seed).to(train.device)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.0, weight_decay=0.0)
    snapshots = [flatten_params(net).cpu().clone()]
    last_loss = float("nan")
    start = 0
    state = _load_partial(partial, cfg_sha, seed, cfg["epochs"]) if partial is not None else None
    if state is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        snapshots = list(state["snapshots"].unbind(0))
        start, last_loss = int(state["epochs_done"]), float(state["last_loss"])
        if restored is not None:
            restored(start)
    for e in range(start, cfg["epochs"]):
        total, count = 0.0, 0
        for x, y in train.batches(cfg["batch_size"], generator=g):
            if cfg["dsa"]:
                s = draw_seed(g)
                x = _core.dsa(x, cfg["dsa_strategy"], s, per_sample=True)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            if on_batch is not None:
                on_batch()
        last_loss = total / max(count, 1)
        snapshots.append(flatten_params(net).cpu().clone())
        if partial is not None and e + 1 < cfg["epochs"]:
            from splatdd.io_utils import atomic_torch_save
            atomic_torch_save({"format": PARTIAL_FORMAT, "config_sha256": cfg_sha, "seed": seed,
                               "epochs_done": e + 1, "last_loss": last_loss,
                               "snapshots": torch.stack(snapshots),
                               "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                               "optimizer": opt.state_dict(), "generator": g.get_state()},
                              partial)
            if saved is not None:
                saved(e + 1)
        if on_epoch is not None:
            on_epoch(e, last_loss)
    return torch.stack(snapshots), net, last_loss


def _save_expert(path: Path, trajectory: torch.Tensor, meta: Mapping[str, Any]) -> None:
    """Atomic write. The metadata is ONE safetensors key holding sorted JSON, because safetensors
    writes several keys in hash order, which changes between processes (same content, other bytes)."""
    from safetensors.torch import save

    from splatdd.io_utils import atomic_write_bytes

    blob = {META_KEY: json.dumps(dict(meta), sort_keys=True)}
    atomic_write_bytes(path, save({"trajectory": trajectory.contiguous()}, metadata=blob))


def expert_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of one expert file (seed, train loss, test accuracy, config hash)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(META_KEY, "{}"))


def _check_same_config(old: Mapping[str, Any], new: Mapping[str, Any], directory: Path) -> None:
    keys = sorted(set(old) | set(new))
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
        raise BufferError(f"expert buffer {directory} was made with other settings ({detail}); "
                          f"use another --out or the same settings to resume")


def train_experts(train: RealData, out_dir: str | os.PathLike, *, experts: int,
                  test: RealData | None = None, model: str = "ConvNet", net_width: int = 128,
                  net_depth: int | None = None, epochs: int = 50, lr: float = 0.01,
                  batch_size: int = 256, dsa: bool = True,
                  dsa_strategy: str = DEFAULT_STRATEGY, seed: int = 0,
                  progress: bool = True,
                  on_epoch: Callable[[int, int, float], None] | None = None,
                  log: Callable[[str], None] | None = None) -> list[Path]:
    """Train experts ``0 .. experts-1`` into ``out_dir`` (resuming: finished ones are skipped,
    the one in progress continues from its last saved epoch).

    ``on_epoch(expert, epoch, train_loss)`` is called after every epoch (tests use it to interrupt
    a run). Returns the paths of all ``experts`` files. Under torchrun the experts are spread over
    the ranks (every rank must call it; each writes the files of its experts; ``log`` lines of
    other ranks than 0 say their rank). Ctrl-C raises :class:`BufferInterrupted` whose message
    says what is saved.

    Example::

        train_experts(train, "buffers/fmnist", experts=10, epochs=50, progress=False)
    """
    if experts < 1 or epochs < 1:
        raise ValueError(f"need experts >= 1 and epochs >= 1, got {experts}, {epochs}")
    if not (lr > 0):
        raise ValueError(f"lr must be > 0, got {lr}")
    out = Path(out_dir)
    cfg = buffer_config(train.spec, model=model, net_width=net_width, net_depth=net_depth,
                        epochs=epochs, lr=lr,
                        batch_size=batch_size, dsa=dsa, dsa_strategy=dsa_strategy, seed=seed)
    probe = _core.get_network(model, train.spec.channels, train.spec.num_classes,
                              (train.spec.height, train.spec.width), width=net_width,
                              depth=net_depth,
                              seed=0)
    names, shapes = param_layout(probe)
    cfg["param_names"] = names
    cfg["param_shapes"] = [list(s) for s in shapes]
    cfg["num_params"] = int(sum(int(torch.Size(s).numel()) for s in shapes))
    sha = _config_sha(cfg)
    paths = [expert_path(out, i) for i in range(experts)]
    # rank 0 checks the folder and decides what is left; every rank gets the same list
    error, todo = None, []
    if distributed.is_main():
        try:
            _prepare_folder(out, cfg)
        except BufferError as exc:
            error = str(exc)
        else:
            todo = [i for i in range(experts)
                    if not _valid_expert_file(paths[i], epochs + 1, cfg["num_params"], sha)]
            for i in sorted(set(range(experts)) - set(todo)):   # killed before its removal
                partial_path(out, i).unlink(missing_ok=True)
    error, todo = distributed.broadcast_object((error, todo))
    if error is not None:
        raise BufferError(error)
    k, rank = distributed.world_size(), distributed.rank()
    tag = f"[rank {rank}] " if k > 1 else ""
    say = log if log is not None else (lambda s: None)
    mine = distributed.owned(todo)
    if distributed.is_main():
        say(f"expert buffer {out}: {experts - len(todo)} of {experts} experts already done, "
            f"{len(todo)} to train ({epochs} epochs each, {cfg['num_params']:,} parameters)"
            + (f", spread over {k} processes" if k > 1 else ""))
    bar = None
    n_batches = -(-len(train.labels) // batch_size)
    if progress and mine and distributed.is_main():     # per batch: an ETA within the epoch
        from splatdd.progress import progress_bar
        bar = progress_bar(total=len(mine) * epochs * n_batches, unit="batch", desc="experts")
    current: dict[str, Any] = {"expert": None, "saved": 0}
    try:
        for n_done, i in enumerate(mine):
            s = expert_seed(seed, i)
            current.update(expert=i, saved=0)

            def _epoch(e: int, loss: float, i: int = i, n_done: int = n_done) -> None:
                if bar is not None:
                    bar.set_description(f"expert {n_done + 1}/{len(mine)} (#{i}), "
                                        f"{e + 1}/{epochs} epochs done")
                    bar.set_postfix(loss=f"{loss:.3f}")
                if on_epoch is not None:
                    on_epoch(i, e, loss)

            def _saved(done: int) -> None:
                current["saved"] = done

            def _restored(done: int) -> None:
                current["saved"] = done
                if bar is not None:
                    bar.update(done * n_batches)       # epochs restored from the partial file
                say(f"{tag}expert {i}: continuing after epoch {done} "
                    f"({partial_path(out, i).name})")

            traj, net, last_loss = _train_one_expert(train, cfg, s, on_epoch=_epoch,
                                                     partial=partial_path(out, i), cfg_sha=sha,
                                                     saved=_saved, restored=_restored,
                                                     on_batch=None if bar is None
                                                     else (lambda: bar.update(1)))
            meta: dict[str, Any] = {"expert": i, "seed": s, "config_sha256": sha,
                                    "train_loss": round(last_loss, 6)}
            msg = f"{tag}expert {i}: train loss {last_loss:.4f}"
            if test is not None:
                acc = _accuracy(net, test)
                meta["test_acc"] = round(acc, 6)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.3f}", test_acc=f"{acc:.4f}")
                msg += f", test accuracy {acc:.4f}"
            _save_expert(paths[i], traj, meta)
            partial_path(out, i).unlink(missing_ok=True)
            current.update(expert=None, saved=0)
            if bar is not None and log is not None:
                bar.write(msg)
            else:
                say(msg)
    except KeyboardInterrupt as exc:
        if isinstance(exc, BufferInterrupted):
            raise
        raise BufferInterrupted(_interrupt_message(out, experts, current, epochs, tag)) from None
    finally:
        if bar is not None:
            bar.close()
    distributed.wait_for_all()                     # every rank's files exist before returning
    return paths


def _interrupt_message(out: Path, experts: int, current: Mapping[str, Any], epochs: int,
                       tag: str) -> str:
    done = sum(expert_path(out, i).is_file() for i in range(experts))
    msg = f"{tag}interrupted: {done} of {experts} expert files are in {out}"
    i = current.get("expert")
    if i is not None and current.get("saved"):
        msg += (f"; expert {i} has {current['saved']} of {epochs} epochs saved in "
                f"{partial_path(out, i)}")
    elif i is not None:
        msg += f"; expert {i} had no finished epoch (it starts again)"
    return msg + "; run the same command again to resume"


def _prepare_folder(out: Path, cfg: Mapping[str, Any]) -> None:
    """Create ``out``, check (or write) its ``buffer.json``, remove temporary files a killed write
    left."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / CONFIG_NAME
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise BufferError(f"{cfg_path} is unreadable: {exc}") from exc
        _check_same_config(old, cfg, out)
    else:
        from splatdd.io_utils import atomic_write_json
        atomic_write_json(cfg_path, dict(cfg))
    for stale in out.glob(".expert_*.tmp"):       # left by a run killed while writing
        stale.unlink(missing_ok=True)
