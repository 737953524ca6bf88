"""Seconds per dc outer step (loss + backward + after_step) on FashionMNIST at IPC 1 and 10,
ConvNet-3 width 128, pixels initialised from real images.

    python plugins/dc/scripts/measure_step.py [--threads 2] [--steps 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from splatdd.data import load_dataset
from splatdd_dc import GradientMatching


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--ipcs", default="1,10")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, _ = load_dataset("fashion_mnist", device=args.device, progress=False)
    for ipc in [int(s) for s in args.ipcs.split(",")]:
        g = torch.Generator().manual_seed(0)
        imgs = torch.cat([train.sample(c, ipc, g) for c in range(10)]).cpu()
        x = imgs.clone().to(args.device).requires_grad_(True)
        labels = torch.arange(10).repeat_interleave(ipc).to(args.device)

        class P:  # the three things an algorithm may use
            @property
            def labels(self):
                return labels

            def decode(self, indices=None, *, resolution=None):
                return x if indices is None else x[indices]

            def class_indices(self, c):
                return torch.nonzero(labels == c).flatten()

        algo = GradientMatching(train, ipc=ipc, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD([x], lr=0.1, momentum=0.5)
        times = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            param = P()
            loss = algo.loss(param, step)
            t_loss = time.perf_counter() - t0
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            algo.after_step(param)
            times.append((t_loss, t1 - t0, time.perf_counter() - t1))
        print(json.dumps({"ipc": ipc, "outer_loop": algo.outer_loop,
                          "inner_loop": algo.inner_loop, "device": args.device,
                          "threads": torch.get_num_threads(),
                          "loss_seconds": round(min(t[0] for t in times), 2),
                          "loss_backward_seconds": round(min(t[1] for t in times), 2),
                          "after_step_seconds": round(max(t[2] for t in times), 2),
                          "loss": loss.item()}), flush=True)


if __name__ == "__main__":
    main()
