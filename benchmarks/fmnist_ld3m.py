"""LD3M end to end on FashionMNIST with a locally trained class-conditional LDM.

Part 1, the model (FID-free evidence that it is a class-conditional generator): ``--per-class``
samples per class from the LDM written by ``splatdd train-ldm`` (``scripts/train_ldm.sh``), plain
DDIM (``--sample-steps``, eta 0) with classifier-free guidance ``--guidance``, are classified by a
ConvNet-3 (width ``--clf-width``, 32: a quarter of the evaluation net's, for CPU time) trained on the
real FashionMNIST train set (``--clf-epochs`` epochs, SGD, no DSA; its
accuracy on the real test set is reported next to it). The accuracy on the samples, with the sample's
intended class as the label, is the evidence (10 % = chance). A 10 x 10 grid of the samples is
written to ``benchmarks/results/fmnist_ld3m.png``.

Part 2, distillation: ``ld3m`` (that LDM, the paper's Eq. 7 sampler with T from the resolution, CFG
3, SGD momentum 0.5 with the paper's DM lr 1e-2) with DM at each ``--ipc``, run through
``splatdd.experiment.run`` with the evaluation before (the initialised set: encoded random real
images decoded through the reverse process) and after distillation, next to the pixel / gaussian /
siren DM cells of ``benchmarks/results/fmnist_table.json`` (their settings quoted). The DM and
evaluation settings default to that table's IPC-1 cells (100 iterations, batch_real 64, ConvNet-3,
3 nets x 150 epochs) so the rows are comparable. Storage: the bytes each set stores against the
pixel budget; the LDM (a shared prior, not counted, as in the paper) is stated separately.

    python benchmarks/fmnist_ld3m.py --model-path runs/ldm-fmnist            # IPC 1
    python benchmarks/fmnist_ld3m.py --model-path runs/ldm-fmnist --ipc 1 10

Writes benchmarks/results/fmnist_ld3m.{md,json,png}. Run with ``heavy`` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TABLE = RESULTS / "fmnist_table.json"        # run(config) cells with before/after (the lead's table run)
TABLE_V1 = RESULTS / "fmnist_table_v1.json"  # the earlier pipeline's cells (fallback, labelled)


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.machine()} Linux, {os.cpu_count()} CPU cores, no GPU; torch {torch.__version__}; "
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start")


def load_parts(model_dir: Path):
    """The raw diffusers parts of a train-ldm model (UNet2DModel taking class indices)."""
    from diffusers import AutoencoderKL, UNet2DModel

    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae"), local_files_only=True).eval()
    unet = UNet2DModel.from_pretrained(str(model_dir / "unet"), local_files_only=True).eval()
    emb_cfg = json.loads((model_dir / "class_embedder" / "config.json").read_text())
    return vae, unet, emb_cfg


def ldm_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*.safetensors"))


def train_classifier(train, test, epochs: int, seed: int, cache: Path | None, width: int = 32,
                     lr: float = 0.05):
    """ConvNet-3 (instance norm, ``width`` channels) on the real train set; cached by settings."""
    from splatdd.evaluate import test_accuracy, train_network
    from splatdd.models import get_network

    net = get_network("ConvNet", 1, 10, 28, width=width, seed=seed)
    key = f"convnet3_w{width}_e{epochs}_lr{lr:g}_s{seed}_n{len(train.labels)}.pt"
    if cache is not None and (cache / key).is_file():
        saved = torch.load(cache / key, weights_only=True)
        net.load_state_dict(saved["state"])
        return net, saved["test_acc"], saved["seconds"], True
    t0 = time.perf_counter()
    train_network(net, train.images, train.labels, epochs=epochs, lr=lr, batch_size=256, dsa=False,
                  seed=seed, schedule="cosine")
    seconds = time.perf_counter() - t0
    acc = test_accuracy(net, test)
    if cache is not None:
        from splatdd.io_utils import atomic_torch_save

        atomic_torch_save({"state": net.state_dict(), "test_acc": acc, "seconds": seconds}, cache / key)
    return net, acc, seconds, False


def sample_quality(args, train, test) -> dict:
    from splatdd_ld3m.train import CLASS_NAMES, sample_images, save_grid

    model = Path(args.model_path)
    vae, unet, emb_cfg = load_parts(model)
    k = int(emb_cfg["num_classes"])
    null = int(emb_cfg["null_class"])
    lat = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.clf_train_images:
        from splatdd.plugin_api import RealData

        n = args.clf_train_images
        train = RealData(train.spec, train.images[:n], train.labels[:n])
    net, clf_test, clf_seconds, cached = train_classifier(train, test, args.clf_epochs, args.seed, cache,
                                                          width=args.clf_width, lr=args.clf_lr)
    print(f"classifier: ConvNet-3, {args.clf_epochs} epochs, real test accuracy {clf_test:.2f} % "
          f"({'cached' if cached else f'{clf_seconds:.0f} s'})", flush=True)
    out = {"classifier": {"model": f"ConvNet-3 (width {args.clf_width}, instance norm)", "epochs": args.clf_epochs,
                          "train_images": len(train.labels),
                          "optimizer": f"SGD momentum 0.9, lr {args.clf_lr:g} cosine, batch 256, weight decay 5e-4, "
                                       "no DSA",
                          "real_test_acc": clf_test, "train_seconds": clf_seconds, "cached": cached},
           "guidance": {}}
    mean = torch.tensor(train.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(train.spec.std).view(1, -1, 1, 1)
    labels = torch.arange(k).repeat_interleave(args.per_class)
    for gscale in args.guidance:
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed)
        x = sample_images(vae, unet, labels, null_class=null, latent_shape=lat,
                          scaling_factor=float(vae.config.scaling_factor), steps=args.sample_steps,
                          guidance=gscale, generator=g)
        x28 = F.interpolate((x + 1) / 2, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        xs = (x28.clamp(0, 1) - mean) / std
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(b).argmax(1) for b in xs.split(256)])
        acc = float((pred == labels).float().mean() * 100)
        per_class = [float((pred[labels == c] == c).float().mean() * 100) for c in range(k)]
        out["guidance"][str(gscale)] = {"acc": acc, "per_class": per_class,
                                        "seconds": time.perf_counter() - t1}
        print(f"samples, guidance {gscale:g}: classifier accuracy {acc:.2f} %", flush=True)
        if gscale == args.guidance[0]:
            per = min(10, args.per_class)
            idx = torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in range(k)])
            names = list(CLASS_NAMES.get("fashion_mnist", [f"class {c}" for c in range(k)]))
            save_grid(x[idx], Path(args.out) / "fmnist_ld3m.png", class_names=names, per_class=per,
                      title=f"class-conditional samples of {model.name} (DDIM {args.sample_steps} steps, "
                            f"guidance {gscale:g}); ConvNet-3 accuracy on {len(labels)} samples: {acc:.1f} %")
    out.update(per_class_samples=args.per_class, sample_steps=args.sample_steps,
               seconds=time.perf_counter() - t0, load_after=os.getloadavg()[0])
    return out


def distill_rows(args) -> list[dict]:
    from splatdd.experiment import ExperimentConfig, run

    rows = []
    for ipc in args.ipc:
        opts = {"model_path": str(Path(args.model_path).resolve())}
        for kv in args.param_opt:
            from splatdd.cli import parse_value

            k, v = kv.split("=", 1)
            opts[k] = parse_value(v)
        cfg = ExperimentConfig.from_dict({
            "name": f"fmnist-ld3m-dm-ipc{ipc}", "ipc": ipc, "parameterization": "ld3m", "algorithm": "dm",
            "iterations": args.iterations, "param_options": opts,
            "algo_options": {"batch_real": args.batch_real}, "seed": args.seed,
            "eval": {"protocol": "paper", "runs": args.eval_runs, "before": True,
                     "options": {"epochs": args.eval_epochs}},
            "out": str(Path(args.runs) / ("ld3m_dm_ipc" + str(ipc) + "".join(
                f"_{k}-{v}" for k, v in sorted(opts.items()) if k != "model_path"))), "threads": args.threads})
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        res = run(cfg, overwrite=True, progress=False)
        d = res.to_dict()
        cfg_file = json.loads((Path(d["out_dir"]) / "results.json").read_text())["config"]

        rows.append({"ipc": ipc, "param": "ld3m", "algo": "dm", "config": cfg_file,
                     "before": d["before"][0] if d["before"] else None,
                     "after": d["after"][0] if d["after"] else None,
                     "budget": d["budget"], "init": d["init"], "distill_seconds": d["distill_seconds"],
                     "final_loss": d["final_loss"], "file": d["distilled_file"],
                     "wall_seconds": time.perf_counter() - t0, "load_at_start": load0})
        a = rows[-1]["after"]
        print(f"ld3m dm ipc {ipc}: after {a['mean']:.2f} +- {a['std']:.2f}", flush=True)
    return rows


def _pooled(cells: list[dict], stage: str) -> dict | None:
    """Mean +- std (population) over seeds x evaluation nets of the equal-epoch rows, as
    ``fmnist_table.py`` pools them."""
    accs = [a for e in cells for r in e.get("rows", {}).get(stage, []) if r.get("mode", "equal epochs")
            == "equal epochs" for a in r["accs"]]
    if not accs:
        return None
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "n": len(accs)}


def table_rows(table: Path = TABLE, table_v1: Path = TABLE_V1, ipcs: tuple[int, ...] = (1, 10)) -> list[dict]:
    """The pixel / gaussian / siren DM cells of ``fmnist_table.json`` (run(config), before/after
    columns; whatever cells exist when this runs), pooled over the seeds measured; a cell missing
    there is taken from ``fmnist_table_v1.json`` (the earlier pipeline, no before column), labelled."""
    new = json.loads(table.read_text()) if table.is_file() else {"cells": []}
    old = json.loads(table_v1.read_text()) if table_v1.is_file() else {"entries": []}
    out = []
    for ipc in ipcs:
        for p in ("pixel", "gaussian", "siren"):
            cells = [e for e in new.get("cells", []) if e.get("ipc") == ipc and e.get("param") == p
                     and e.get("algo") == "dm" and "rows" in e]
            after = _pooled(cells, "after")
            if after is not None:
                c0 = cells[0]
                cfg = c0["identity"]["config"]
                ev = c0.get("eval_settings", {})
                out.append({"ipc": ipc, "param": p, "source": table.name, "seeds": sorted(e["seed"] for e in cells),
                            "iterations": cfg.get("iterations"), "eval_runs": ev.get("runs"),
                            "before": _pooled(cells, "before"), "after": after, "num_images": c0.get("num_images"),
                            "bytes": c0["bytes"], "budget_bytes": c0["budget_bytes"],
                            "finished": [e.get("finished") for e in cells],
                            "settings": f"{cfg.get('iterations')} it, batch_real "
                                        f"{cfg.get('algo_options', {}).get('batch_real')}; eval {ev.get('runs')} x "
                                        f"{ev.get('epochs')} ep per seed, seeds "
                                        + ",".join(str(e["seed"]) for e in cells)})
                continue
            for e in old.get("entries", []):
                if (e.get("algo") == "dm" and e.get("group") == "table" and e.get("param") == p
                        and e.get("ipc") == ipc):
                    out.append({"ipc": ipc, "param": p, "source": table_v1.name, "seeds": [e["settings"].get("seed")],
                                "iterations": e["settings"].get("iterations"),
                                "eval_runs": e["settings"].get("eval", {}).get("runs"),
                                "before": None, "after": {"mean": e["mean"], "std": e["std"], "n": len(e["accs"])},
                                "num_images": e.get("num_images"), "bytes": e["bytes"],
                                "budget_bytes": e["budget_bytes"], "finished": [e.get("finished")],
                                "settings": _settings_text(e)})
                    break
    return out


def table_read_text(rows: list[dict]) -> str:
    """Which comparison cells were read from which file (for the report)."""
    parts = []
    for r in rows:
        fin = ", ".join(f for f in r["finished"] if f)
        parts.append(f"IPC {r['ipc']} {r['param']} seed(s) {','.join(map(str, r['seeds']))} from `{r['source']}`"
                     + (f" (finished {fin})" if fin else ""))
    return "; ".join(parts)


def _settings_text(e: dict) -> str:
    s = e.get("settings", {})
    ev = s.get("eval", {})
    eval_txt = (f"eval {ev.get('runs')} x {ev['epochs']} ep" if "epochs" in ev
                else f"eval {ev.get('runs')} x ~{ev.get('steps')} steps")
    return f"{s.get('iterations')} it, batch_real {s.get('batch_real')}; {eval_txt}"


def write_md(res: dict, path: Path) -> None:
    L = ["# LD3M on FashionMNIST with a locally trained class-conditional LDM\n"]
    L.append(f"Produced by `benchmarks/fmnist_ld3m.py` ({res['threads']} torch thread). Machine: {res['machine']}. "
             "Timings are indicative only (shared cores).\n")
    m = res["model"]
    L.append("## The LDM\n")
    L.append(f"`{m['path']}`, written by `splatdd train-ldm` (`scripts/train_ldm.sh`; not committed: "
             f"{m['bytes'] / 1e6:.1f} MB): {m['summary']}.\n")
    q = res.get("samples")
    if q:
        c = q["classifier"]
        L.append("### Evidence of a class-conditional generator (FID-free)\n")
        L.append(f"{q['per_class_samples']} samples per class (DDIM {q['sample_steps']} steps, eta 0), classified by "
                 f"a {c['model']} trained on the real FashionMNIST train set for {c['epochs']} epochs "
                 f"({c['optimizer']}); that classifier's accuracy on the real test set: **{c['real_test_acc']:.2f} %**. "
                 "Accuracy on the samples = fraction classified as the class they were generated for "
                 "(10 % is chance).\n")
        L.append("| guidance | accuracy on samples (%) | " + " | ".join(m_["short"] for m_ in CLASS_COLS) + " |")
        L.append("|---|---|" + "---|" * len(CLASS_COLS))
        for gs, r in q["guidance"].items():
            L.append(f"| {gs} | **{r['acc']:.2f}** | " + " | ".join(f"{v:.0f}" for v in r["per_class"]) + " |")
        L.append("")
        L.append("![class-conditional samples](fmnist_ld3m.png)\n")
    L.append("## Distillation: DM, ConvNet-3 test accuracy (%)\n")
    L.append("Every row: FashionMNIST 28x28, DM, initialised from random real images, evaluated with the "
             "paper protocol on ConvNet-3 (length in each row's settings; mean +- std over the evaluation nets, and over the "
             "seeds where several were measured). \"before\" = the initialised set, no distillation step "
             "(for ld3m: encoded real images decoded through the reverse process); \"after\" = the distilled "
             "set. The pixel / gaussian / siren rows are read from the file named in their row (the "
             "`fmnist_table.json` cells that existed when this report was written"
             + (f": {res['table_read']}" if res.get("table_read") else "") + "; a cell missing there is "
             "taken from `fmnist_table_v1.json`, the earlier pipeline, which has no before column).\n")
    L.append("| IPC | parameterization | before | after | gain | stored bytes / pixel budget | settings | source |")
    L.append("|---|---|---|---|---|---|---|---|")
    rows = sorted(res["table"] + res["ld3m"], key=lambda r: (r["ipc"], r["param"] != "ld3m", r["param"]))

    def cell(v):
        return "-" if v is None else f"{v['mean']:.2f} +- {v['std']:.2f}"

    for r in rows:
        b, a = r["before"], r["after"]
        gain = "-" if b is None else f"{a['mean'] - b['mean']:+.2f}"
        if r["param"] == "ld3m":
            cfg = r["config"]
            po = cfg.get("param_options", {})
            extra = _extra(r)
            st = (f"{cfg['iterations']} it, batch_real {cfg['algo_options'].get('batch_real')}; eval "
                  f"{cfg['eval']['runs']} x {cfg['eval']['options'].get('epochs')} ep, seed {cfg.get('seed')}; "
                  + ("no reverse process (x = D(Z); Table 6 'w/o diffusion')" if po.get("diffusion") is False else
                     f"T {r.get('steps', '?')}, guidance {r.get('guidance', '?')}, "
                     + {"x0": "the released code's x0 residual", "False": "plain DDIM (no residual)",
                        "false": "plain DDIM (no residual)"}.get(str(po.get("residual", "")), "Eq. 7")
                     + f", eta {po.get('eta', 0)}")
                  + f", SGD lr {r.get('lr', '?')}")
            label = "**ld3m** (this LDM)" + (f", {extra}" if extra else "")
            used, allowed = r["budget"]["used"], r["budget"]["allowed"]
            L.append(f"| {r['ipc']} | {label} | {cell(b)} | **{cell(a)}** | {gain} | {used:,} / {allowed:,} "
                     f"({100 * used / allowed:.0f} %) | {st} | this run |")
        else:
            L.append(f"| {r['ipc']} | {r['param']} ({r['num_images']} images) | {cell(b)} | {cell(a)} | {gain} | "
                     f"{r['bytes']:,} / {r['budget_bytes']:,} ({100 * r['bytes'] / r['budget_bytes']:.0f} %) | "
                     f"{r['settings']} | `{r['source']}` |")
    L.append("")
    for line in res.get("not_run", []):
        L.append(f"Not run: {line}\n")
    L.append(f"ld3m's storage: the latents Z and class embeddings c of every distilled image (fp32; without "
             f"diffusion only Z). The LDM itself ({m['bytes'] / 1e6:.1f} MB of weights) is a shared prior and is "
             "not counted, as in the LD3M paper (and as GLaD's generator); the pixel budget counts ipc fp32 "
             "28x28 images per class.\n")
    parts = []
    if q and q.get("seconds") is not None:
        parts.append(f"sample classification {q['seconds']:.0f} s")
    for r in res["ld3m"]:
        if r.get("wall_seconds") is not None:
            parts.append(f"ld3m IPC {r['ipc']}{(' ' + _extra(r)) if _extra(r) else ''} {r['wall_seconds']:.0f} s "
                         f"(distillation {r['distill_seconds']:.0f} s + before/after evaluation; load average "
                         f"{r['load_at_start']:.1f} at its start)")
    if parts:
        total = (q.get("seconds", 0) if q else 0) + sum(r.get("wall_seconds", 0) for r in res["ld3m"])
        L.append(f"Compute of this report's runs (wall time, {res['threads']} torch thread, shared 2-core "
                 f"machine): " + "; ".join(parts) + f"; total {total / 60:.1f} min.\n")
    L.append("## Reading\n")
    L += [f"- {n}" for n in res.get("notes", [])]
    path.write_text("\n".join(L) + "\n")


CLASS_COLS = [{"short": s} for s in ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                     "Sneaker", "Bag", "Boot")]


def _extra(r: dict) -> str:
    po = {k: v for k, v in r["config"].get("param_options", {}).items() if k != "model_path"}
    return ", ".join(f"{k}={v}" for k, v in po.items())


def _model_label(summary: str) -> str:
    """A short name for an earlier model in the notes (its full description is in the JSON)."""
    m = re.search(r"UNet stopped after (\d+) of (\d+) scheduled steps", summary or "")
    return (f"the early export, UNet stopped after {m.group(1)} of {m.group(2)} scheduled steps" if m
            else "an earlier model")


def notes(res: dict) -> list[str]:
    """Plain-language reading computed from the results (no hand-typed figures)."""
    out = []
    q = res.get("samples")
    m = res.get("model", {})
    hist = m.get("history") or []
    if q:
        best = max(q["guidance"].items(), key=lambda kv: kv[1]["acc"])
        out.append(f"The LDM's class-conditional samples are recognised as their class {best[1]['acc']:.1f} % of "
                   f"the time at guidance {best[0]} by a ConvNet-3 that scores "
                   f"{q['classifier']['real_test_acc']:.1f} % on real test images (chance: 10 %); per guidance: "
                   + ", ".join(f"{g} -> {v['acc']:.1f} %" for g, v in q["guidance"].items()) + ".")
        prev = q.get("previous")
        if prev:
            out.append(f"The same measurement on {_model_label(prev['model'])}: "
                       + ", ".join(f"guidance {g} -> {v:.1f} %" for g, v in prev["acc"].items()) + ".")
    tab = {(r["ipc"], r["param"]): r for r in res["table"]}
    plain = {r["ipc"]: r for r in res["ld3m"] if not _extra(r)}
    for r in res["ld3m"]:
        a, b = r["after"], r["before"]
        gain = a["mean"] - b["mean"]
        extra = _extra(r)
        tag = f" ({extra})" if extra else ""
        line = (f"IPC {r['ipc']}: ld3m{tag} + DM {b['mean']:.2f} -> {a['mean']:.2f} "
                f"({gain:+.2f} points from distillation)")
        if extra and r["ipc"] in plain:
            line += f"; the plain ld3m row: {plain[r['ipc']]['after']['mean']:.2f} after"
        comps = []
        for p in ("pixel", "gaussian", "siren"):
            t = tab.get((r["ipc"], p))
            if t:
                bt = f"before {t['before']['mean']:.2f}, " if t["before"] else ""
                comps.append(f"{p} {bt}after {t['after']['mean']:.2f} (ld3m after minus it: "
                             f"{a['mean'] - t['after']['mean']:+.2f}; `{t['source']}`)")
        if comps:
            line += "; the table's DM cells: " + ", ".join(comps)
        line += (f". Distillation took {r['distill_seconds']:.0f} s for {r['config']['iterations']} iterations "
                 f"(1 thread, load average {r['load_at_start']:.1f} at the start of the run)")
        out.append(line + ".")
    for r in res["ld3m"]:
        t = tab.get((r["ipc"], "pixel"))
        if t and t["before"] and not _extra(r):
            d = r["before"]["mean"] - t["before"]["mean"]
            out.append(f"Before distillation, at IPC {r['ipc']}: ld3m's initialised set (real images encoded, "
                       f"then decoded through the reverse process from z_T) scores {r['before']['mean']:.2f}, "
                       f"random real images (pixel before) {t['before']['mean']:.2f}: the reverse process "
                       f"{'costs' if d < 0 else 'adds'} {abs(d):.2f} points before any distillation step "
                       f"(z_T = sqrt(a_T) Z + sqrt(1 - a_T) eps carries Z with weight sqrt(a_T) = "
                       f"{r.get('sqrt_alpha_T', float('nan')):.3f} at the first of the T = {r.get('steps', '?')} "
                       "DDIM timesteps of the cin256 schedule, so the images are largely the LDM's own "
                       "class-conditional samples, steered by c and Eq. 7's residual).")
    for ipc, r in plain.items():
        nod = [x for x in res["ld3m"] if x["ipc"] == ipc and x["config"].get("param_options", {}).get("diffusion")
               is False]
        if nod:
            d = nod[-1]["after"]["mean"] - r["after"]["mean"]
            out.append(f"Table 6 ablation at IPC {ipc}: without the reverse process (x = D(Z), Z only) ld3m + DM "
                       f"reaches {nod[-1]['after']['mean']:.2f} against {r['after']['mean']:.2f} with it: the "
                       f"diffusion process {'costs' if d > 0 else 'adds'} {abs(d):.2f} points with this LDM (one "
                       "seed; the paper's Table 6 figures are not in docs/references.md, so no comparison is made "
                       "here).")
    for r in res["ld3m"]:
        comp = [t for t in res["table"] if t["ipc"] == r["ipc"]]
        its = sorted({t.get("iterations") for t in comp if t.get("iterations")})
        runs = sorted({t.get("eval_runs") for t in comp if t.get("eval_runs")})
        mine_it, mine_runs = r["config"]["iterations"], r["config"]["eval"]["runs"]
        if comp and (any(mine_it < i for i in its) or any(mine_runs < n for n in runs)):
            out.append(f"IPC {r['ipc']} ld3m{(' (' + _extra(r) + ')') if _extra(r) else ''} ran lighter settings "
                       f"than the comparison cells: {mine_it} DM iterations (theirs: {', '.join(map(str, its))}), "
                       f"{mine_runs} evaluation nets (theirs: {', '.join(map(str, runs))}), for this benchmark's CPU "
                       "budget; its gain from distillation is not comparable with theirs.")
    for pr in res.get("previous_model_rows", []):
        out.append(f"With {_model_label(pr['model'])}: IPC {pr['ipc']} ld3m"
                   + (f" ({pr['options']})" if pr["options"] else "")
                   + f" + DM {pr['before']:.2f} -> {pr['after']:.2f} ({pr['iterations']} it, "
                   f"{pr['eval_runs']} eval nets).")
    stop = [h for h in hist if h.get("phase") == "unet" and "stopped_at" in h]
    sessions = [h for h in hist if h.get("phase") == "unet-session"]
    if stop and not m.get("stop_unet_at"):
        out.append(f"Model history: trained to UNet step {stop[0]['stopped_at']}, exported early, then resumed "
                   f"from its checkpoint to the end of the {stop[0]['of']}-step schedule (the model used here).")
    for h in sessions:
        la = h.get("load_start") or [float("nan")]
        lb = h.get("load_end") or [float("nan")]
        out.append(f"UNet training run, steps {h['from']} -> {h['to']}: {h['seconds']:.0f} s wall "
                   f"({(h['to'] - h['from']) / h['seconds']:.2f} steps/s, {h['threads']} thread, load average "
                   f"{la[0]:.1f} at the start, {lb[0]:.1f} at the end).")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default="runs/ldm-fmnist")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--runs", default="runs/fmnist_ld3m", help="folder of the distillation runs")
    ap.add_argument("--cache", default="runs/fmnist_ld3m/cache", help="classifier cache ('' for none)")
    ap.add_argument("--ipc", type=int, nargs="*", default=[1])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch-real", type=int, default=64)
    ap.add_argument("--eval-runs", type=int, default=3)
    ap.add_argument("--eval-epochs", type=int, default=150)
    ap.add_argument("--param-opt", action="append", default=[], help="extra ld3m option K=V")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0, 1.0])
    ap.add_argument("--clf-epochs", type=int, default=2)
    ap.add_argument("--clf-train-images", type=int, default=None, help="train the classifier on the first N only")
    ap.add_argument("--clf-width", type=int, default=32, help="classifier ConvNet-3 width (128 is the eval net's)")
    ap.add_argument("--clf-lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-samples", action="store_true", help="keep part 1 from the previous JSON")
    ap.add_argument("--skip-distill", action="store_true", help="keep part 2 from the previous JSON")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the previous JSON")
    ap.add_argument("--append", action="store_true", help="keep the previous JSON's ld3m rows and add these")
    ap.add_argument("--not-run", action="append", default=None, metavar="TEXT",
                    help="a row that was not run and why (printed in the report; repeatable)")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from splatdd.data import load_dataset
    from splatdd_ld3m.ldm import load_ldm

    out = Path(args.out)
    prev_path = out / "fmnist_ld3m.json"
    prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {}
    model = Path(args.model_path)
    ldm = load_ldm(model)
    man = json.loads((model / "splatdd_ld3m.json").read_text())
    tr = man.get("train", {})
    res = {"machine": machine(), "threads": args.threads,
           "model": {"path": str(model), "bytes": ldm_bytes(model), "train": tr, "history": man.get("history"),
                     "stop_unet_at": man.get("stop_unet_at"),
                     "summary": (f"KL autoencoder f{ldm.vae_factor}, {ldm.latent_channels} latent channels "
                                 f"({ldm.image_size} px -> {ldm.latent_size}x{ldm.latent_size}), "
                                 f"UNet2DModel {tr.get('unet_channels')} with class embeddings "
                                 f"(D = {ldm.class_embedder.embed_dim}, + null class for guidance); autoencoder "
                                 f"{tr.get('ae_steps')} steps of {tr.get('ae_batch_size')}, UNet "
                                 + (f"stopped after {man['stop_unet_at']} of {tr.get('unet_steps')} scheduled "
                                    if man.get("stop_unet_at") else f"{tr.get('unet_steps')} ")
                                 + f"steps of {tr.get('unet_batch_size')} latents, EMA "
                                 f"{tr.get('ema_decay')}; cin256 noise schedule")}}
    if args.report_only:
        prev["model"] = res["model"]
        prev["table"] = table_rows()
        prev["table_read"] = table_read_text(prev["table"])
        if args.not_run is not None:
            prev["not_run"] = list(args.not_run)
        prev["notes"] = notes(prev)
        from splatdd.io_utils import atomic_write_json

        atomic_write_json(prev_path, prev)
        write_md(prev, out / "fmnist_ld3m.md")
        print(f"wrote {out / 'fmnist_ld3m.md'} (report only)")
        return 0
    train, test = load_dataset("fashion_mnist", progress=False)
    if args.skip_samples:
        res["samples"] = prev.get("samples")
    else:
        res["samples"] = sample_quality(args, train, test)
    if args.skip_distill:
        res["ld3m"] = prev.get("ld3m", [])
    else:
        rows = distill_rows(args)
        for r in rows:
            from splatdd_ld3m import LatentDiffusionImages

            p = LatentDiffusionImages.build(train.spec, r["ipc"], model_path=str(model))
            r.update(steps=p.steps, guidance=p.guidance, lr=p.optimizer_spec("distribution").params[0]["lr"],
                     sqrt_alpha_T=p._schedule[0].alpha ** 0.5)
        res["ld3m"] = (list(prev.get("ld3m", [])) if args.append else []) + rows
    res["table"] = table_rows()
    res["table_read"] = table_read_text(res["table"])
    res["not_run"] = list(args.not_run or [])
    if prev.get("model") and prev["model"].get("summary") != res["model"]["summary"]:
        # the previous results were made with another model (e.g. the early export): keep its figures
        if prev.get("samples") and res.get("samples") and "previous" not in res["samples"]:
            res["samples"]["previous"] = {"model": prev["model"]["summary"],
                                          "acc": {g: v["acc"] for g, v in prev["samples"]["guidance"].items()}}
        res["previous_model_rows"] = [{"model": prev["model"]["summary"], "ipc": r["ipc"], "options": _extra(r),
                                       "before": r["before"]["mean"], "after": r["after"]["mean"],
                                       "iterations": r["config"]["iterations"], "eval_runs": r["config"]["eval"]["runs"]}
                                      for r in prev.get("ld3m", [])]
    elif prev.get("previous_model_rows"):
        res["previous_model_rows"] = prev["previous_model_rows"]
    res["notes"] = notes(res)
    from splatdd.io_utils import atomic_write_json

    atomic_write_json(prev_path, res)
    write_md(res, out / "fmnist_ld3m.md")
    print(f"wrote {out / 'fmnist_ld3m.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
