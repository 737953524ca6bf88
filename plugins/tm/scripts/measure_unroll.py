"""Measure the tm student unroll on FashionMNIST-sized problems: memory (estimate vs measured
peak) and seconds per iteration, for FreD's IPC 1 / IPC 10 settings.

    python plugins/tm/scripts/measure_unroll.py [--device cpu] [--threads 2] [--width 128]
        [--syn-steps N] [--ipcs 1,10] [--iters 2]

The expert buffer is a stand-in with random trajectories (memory and time do not depend on the
values); the synthetic set is plain pixels. Prints one JSON line per setting.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from splatdd.models import get_network
from splatdd.plugin_api import DatasetSpec, OptimizerSpec, Parameterization, RealData
from splatdd_tm import TrajectoryMatching
from splatdd_tm.buffer import _save_expert, buffer_config, expert_path
from splatdd_tm.unroll import param_layout

SPEC = DatasetSpec(name="fashion_mnist", channels=1, height=28, width=28, num_classes=10,
                   mean=(0.2861,), std=(0.3530,))


class Pixels(Parameterization):
    name = "bench-pixels"

    def __init__(self, n_per_class):
        super().__init__()
        self.x = torch.nn.Parameter(torch.randn(10 * n_per_class, 1, 28, 28))
        self._y = torch.arange(10).repeat_interleave(n_per_class)

    @classmethod
    def build(cls, spec, ipc, *, generator=None, **o):
        return cls(ipc)

    def init_from_real(self, images, labels, *, steps=None, progress=False):
        return {}

    @property
    def labels(self):
        return self._y

    def decode(self, indices=None, *, resolution=None):
        return self.x if indices is None else self.x[indices.to(self.x.device)]

    def optimizer_spec(self, regime, lr=None):
        return OptimizerSpec([{"params": [self.x], "lr": lr or 100.0}], kind="sgd")

    def num_bytes(self):
        return self.x.numel() * 4

    def state_tensors(self):
        return {"x": self.x.detach().cpu()}

    def config(self):
        return {}

    @classmethod
    def from_state(cls, spec, tensors, config):
        raise NotImplementedError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--syn-steps", type=int, default=None,
                    help="override FreD's syn_steps (memory and time are linear in it)")
    ap.add_argument("--ipcs", default="1,10")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = get_network("ConvNet", 1, 10, (28, 28), width=args.width, seed=0)
    names, shapes = param_layout(net)
    P = sum(int(torch.Size(s).numel()) for s in shapes)
    with tempfile.TemporaryDirectory() as d:
        cfg = buffer_config(SPEC, net_width=args.width, epochs=20)
        cfg.update(param_names=names, param_shapes=[list(s) for s in shapes], num_params=P)
        with open(f"{d}/buffer.json", "w") as f:
            json.dump(cfg, f)
        g = torch.Generator().manual_seed(0)
        base = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        traj = base + 0.01 * torch.randn(21, P, generator=g).cumsum(0)
        _save_expert(expert_path(d, 0), traj, {"expert": 0})
        real = RealData(spec=SPEC, images=torch.zeros(10, 1, 28, 28),
                        labels=torch.arange(10), device=torch.device(args.device))
        for ipc in [int(v) for v in args.ipcs.split(",")]:
            algo = TrajectoryMatching(real, ipc=ipc, generator=torch.Generator().manual_seed(0),
                                      buffer_dir=d, syn_steps=args.syn_steps)
            param = Pixels(ipc).to(args.device)
            rep = algo.measure_memory(param)
            t0 = time.perf_counter()
            for i in range(args.iters):
                loss = algo.loss(param, i)
                loss.backward()
                algo.after_step(param)
            sec = (time.perf_counter() - t0) / args.iters
            print(json.dumps({
                "ipc": ipc, "syn_steps": algo.syn_steps, "batch_syn": rep["batch"],
                "num_params": P, "device": args.device, "threads": torch.get_num_threads(),
                "estimate_MiB": round(rep["total_bytes"] / 2**20, 1),
                "estimate_params_MiB": round(rep["params_bytes"] / 2**20, 1),
                "estimate_activations_MiB": round(rep["activation_bytes"] / 2**20, 1),
                "measured_peak_MiB": round(rep["measured_peak_bytes"] / 2**20, 1),
                "measured_by": rep["measured_by"], "seconds_per_iteration": round(sec, 2)}),
                flush=True)


if __name__ == "__main__":
    main()
