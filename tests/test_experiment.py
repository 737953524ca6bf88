"""splatdd.experiment: typed configs (TOML round trip, validation), presets against the papers'
tables, every preset running on tiny stand-in data, and bit-identical re-runs from a results
folder's own config.toml."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splatdd import cli
from splatdd.experiment import (ConfigError, ExperimentConfig, list_presets, load_config,
                                load_preset, run)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- config ------------------------------------------------------------------------------------
_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
_scalars = st.one_of(st.integers(-10**6, 10**6), st.booleans(), _names,
                     st.floats(allow_nan=False, allow_infinity=False, width=64))


@settings(max_examples=40, deadline=None)
@given(ipc=st.integers(1, 50), iterations=st.none() | st.integers(0, 10**6),
       lr=st.none() | st.floats(1e-8, 1e3), seed=st.integers(0, 2**62),
       popts=st.dictionaries(_names, _scalars, max_size=4),
       aopts=st.dictionaries(_names, st.lists(st.integers(0, 9), max_size=3) | _scalars,
                             max_size=4),
       models=st.lists(_names, min_size=1, max_size=3), runs=st.integers(0, 9),
       resolution=st.none() | st.lists(st.integers(1, 512), min_size=2, max_size=2))
def test_toml_round_trip(ipc, iterations, lr, seed, popts, aopts, models, runs, resolution):
    cfg = ExperimentConfig(ipc=ipc, iterations=iterations, lr=lr, seed=seed,
                           param_options=popts, algo_options=aopts)
    cfg.eval.models, cfg.eval.runs, cfg.dataset.resolution = models, runs, resolution
    again = ExperimentConfig.from_toml(cfg.to_toml())
    assert again == cfg


@pytest.mark.parametrize("override,needle", [
    ("ipc=0", "ipc must be an integer >= 1"),
    ("ipc=\"one\"", "ipc must be an integer >= 1, got 'one'"),
    ("iterations=-1", "iterations must be an integer >= 0"),
    ("lr=-0.1", "lr must be a positive number"),
    ("seed=-3", "seed must be an integer"),
    ("init=\"zeros\"", "init must be one of real, noise"),
    ("eval.runs=-1", "eval.runs must be an integer >= 0"),
    ("eval.models=[]", "eval.models must be a non-empty list"),
    ("dataset.resolution=[0,28]", "dataset.resolution must be [H, W]"),
    ("dataset.zca=1", "dataset.zca must be true or false"),
    ("bogus=1", "unknown key(s) bogus"),
    ("eval.bogus=1", "[eval]: unknown key(s) bogus"),
    ("ipc.x=1", "'ipc' is a value, not a table"),
    ("novalue", "key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig().with_overrides([override])
    assert needle in str(e.value)


def test_overrides_and_plugin_option_tables():
    cfg = load_preset("fmnist-main").with_overrides(
        ["iterations=7", "param_options.gpc=3", "eval.options.epochs=5", "dataset.resolution=[32,32]",
         "algo_options.batch_real=None"])
    assert cfg.iterations == 7 and cfg.param_options == {"gpc": 3}
    assert cfg.eval.options == {"epochs": 5} and cfg.dataset.resolution == [32, 32]
    assert "batch_real" not in cfg.algo_options          # None removes a key
    assert load_preset("fmnist-main").algo_options == {"batch_real": 64}   # presets unchanged


def test_bad_toml_file(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("ipc = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


# ---- presets against the papers' tables --------------------------------------------------------
# GSDD appendix A, Tables 7-12 (docs/references.md): (gpc, points) and algorithm settings.
GSDD = {
    "gsdd-cifar10-tm-ipc1": (30, 22, {"syn_steps": 60, "max_start_epoch": 30, "batch_syn": 300}),
    "gsdd-cifar10-tm-ipc10": (160, 42, {"syn_steps": 60, "max_start_epoch": 30, "batch_syn": 380}),
    "gsdd-cifar10-tm-ipc50": (250, 136, {"syn_steps": 60, "max_start_epoch": 30, "batch_syn": 360}),
    "gsdd-cifar100-tm-ipc1": (30, 22, {"syn_steps": 60, "batch_syn": 512}),
    "gsdd-cifar100-tm-ipc10": (80, 85, {"syn_steps": 60, "batch_syn": 512}),
    "gsdd-cifar100-tm-ipc50": (400, 85, {"syn_steps": 60, "batch_syn": 640}),
    "gsdd-imagenet128-tm-ipc1": (64, 170, {"syn_steps": 20, "max_start_epoch": 40,
                                           "lr_lr": 1e-6, "batch_syn": 150}),
    "gsdd-imagenet128-tm-ipc10": (640, 170, {"syn_steps": 20, "lr_lr": 1e-5, "batch_syn": 160}),
    "gsdd-imagenet128-dm-ipc1": (200, 54, {"batch_real": 1024}),
    "gsdd-imagenet256-dm-ipc1": (120, 364, {"batch_real": 512}),
    "gsdd-imagenet128-dc-ipc1": (200, 54, {"batch_real": 720}),
}
# LD3M appendix C: (T, lr, iterations) by resolution and algorithm.
LD3M = {(128, "dc"): (10, 1e-3, 5000), (128, "dm"): (10, 1e-2, 5000), (128, "tm"): (10, 10.0, 5000),
        (256, "dc"): (20, 1e-3, 10000), (256, "dm"): (20, 1e-2, 10000)}


def test_preset_list_cites_tables():
    presets = list_presets()
    assert len(presets) >= 20
    for p in presets:
        assert ("Table" in p.source or "splatdd" in p.source or "FashionMNIST" in p.source), p
    names = {p.name for p in presets}
    assert set(GSDD) <= names


@pytest.mark.parametrize("name", sorted(GSDD))
def test_gsdd_presets_match_the_paper(name):
    gpc, points, algo = GSDD[name]
    cfg = load_preset(name)
    assert cfg.param_options["gpc"] == gpc and cfg.param_options["points"] == points
    for k, v in algo.items():
        assert cfg.algo_options[k] == v, k
    # Adam lr 1e-2 on pixel-unit Cholesky entries == lr 1e-2 * 2 / W on normalised ones
    width = cfg.dataset.resolution[1] if cfg.dataset.resolution else 32
    assert cfg.param_options["lr"] == 1e-2
    assert math.isclose(cfg.param_options["lr_cholesky"], 1e-2 * 2 / width, rel_tol=1e-12)
    assert cfg.dataset.zca == name.startswith("gsdd-cifar")


def test_ld3m_presets_match_the_paper():
    seen = set()
    for p in list_presets():
        if not p.name.startswith("ld3m-"):
            continue
        cfg = load_preset(p.name)
        res = cfg.dataset.resolution[0]
        steps, lr, iters = LD3M[(res, cfg.algorithm)]
        assert (cfg.param_options["steps"], cfg.lr, cfg.iterations) == (steps, lr, iters)
        assert cfg.param_options["guidance"] == 3.0 and cfg.param_options["residual"] is True
        seen.add((res, cfg.algorithm))
    assert seen == set(LD3M)


def test_config_command(capsys):
    assert cli.main(["config", "list"]) == 0
    out = capsys.readouterr().out
    assert "gsdd-cifar10-tm-ipc1" in out and "Table 7" in out
    assert cli.main(["config", "show", "gsdd-imagenet128-dm-ipc1"]) == 0
    shown = capsys.readouterr().out
    assert ExperimentConfig.from_toml(shown) == load_preset("gsdd-imagenet128-dm-ipc1")
    assert cli.main(["config", "show", "gsdd-imagenet128-dn-ipc1"]) == 2
    assert "did you mean gsdd-imagenet128-dm-ipc1" in capsys.readouterr().err


# ---- every preset runs (tiny stand-in data, 2 iterations) -------------------------------------
def _tiny(cfg: ExperimentConfig, roots, buffers, tmp_path) -> ExperimentConfig:
    """The preset with its data replaced by tiny stand-ins and its networks shrunk; everything the
    preset says about the parameterization (GPC, points, lr) is kept."""
    if cfg.dataset.zca and cfg.name not in ZCA_KEPT:
        cfg = cfg.with_overrides({"dataset.zca": False})   # one 3072 x 3072 eigh is enough
    d = cfg.dataset.name
    sets: dict = {"iterations": 2, "eval.runs": 0, "checkpoint_every": 0,
                  "out": str(tmp_path / cfg.name), "init_steps": 2}
    sets["dataset.root"] = str(roots[d])
    if cfg.algorithm in ("dm", "dc"):
        sets.update({"algo_options.batch_real": 2, "algo_options.net_width": 4})
    if cfg.algorithm == "dc":
        sets.update({"algo_options.outer_loop": 1, "algo_options.inner_loop": 1,
                     "algo_options.batch_train": 8})
    if cfg.algorithm == "tm":
        sets.update({"algo_options.buffer_dir": str(buffers(cfg)), "algo_options.syn_steps": 2,
                     "algo_options.max_start_epoch": 1, "algo_options.expert_epochs": 1,
                     "algo_options.batch_syn": 8})
    if cfg.parameterization == "ld3m":
        sets.update({"param_options.model_path": "tiny", "param_options.steps": 2})
    return cfg.with_overrides(sets)


#: The one ZCA preset run with its whitening on (the others reuse the same code path without it).
ZCA_KEPT = {"gsdd-cifar10-tm-ipc1"}


@pytest.fixture(scope="module")
def roots(fmnist_root, cifar_roots, imagefolder_root):
    return {"fashion_mnist": fmnist_root, **cifar_roots, "imagefolder": imagefolder_root}


@pytest.fixture(scope="module")
def buffers(roots, tmp_path_factory):
    """A one-expert, two-epoch, width-4 buffer per (dataset, resolution, zca), made on demand."""
    tm_buffer = pytest.importorskip("splatdd_tm.buffer")
    from splatdd.data import load_dataset
    made: dict = {}

    def get(cfg: ExperimentConfig):
        d = cfg.dataset
        key = (d.name, tuple(d.resolution or ()), d.zca)
        if key not in made:
            train, _ = load_dataset(d.name, str(roots[d.name]), resolution=d.resolution,
                                    zca=d.zca, progress=False)
            out = tmp_path_factory.mktemp("buffer")
            tm_buffer.train_experts(train, out, experts=1, epochs=2, net_width=4, batch_size=8,
                                    progress=False)
            made[key] = out
        return made[key]
    return get


def _installed(name: str, kind: str) -> bool:
    from splatdd.registry import default_registry
    return name in default_registry().names(kind)


def _needs_teacher(name: str) -> bool:
    """Presets whose `requires` trains a teacher (sre2l): tests/test_experiment_sre2l.py runs them
    with a tiny teacher."""
    return any(r.startswith("splatdd teacher ") for r in load_preset(name).requires)


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in list_presets() if not _needs_teacher(p.name)])
def test_every_preset_runs_on_tiny_data(name, roots, buffers, tmp_path):
    cfg = load_preset(name)
    for kind, plugin in (("parameterization", cfg.parameterization),
                         ("algorithm", cfg.algorithm)):
        if not _installed(plugin, kind):
            pytest.skip(f"{kind} plugin {plugin!r} is not installed")
    tiny = _tiny(cfg, roots, buffers, tmp_path)
    res = run(tiny, progress=False, log=lambda _: None)
    assert res.iterations == 2 and res.distilled_file.is_file()
    assert res.budget["used"] <= res.budget["allowed"]
    saved = json.loads((res.out_dir / "results.json").read_text())
    assert saved["config"]["param_options"] == tiny.param_options
    assert saved["config"]["source"] == cfg.source


# ---- a results folder re-runs from its own config -----------------------------------------------
def test_rerun_from_saved_config_is_bit_identical(fmnist_root, tmp_path, capsys):
    pytest.importorskip("splatdd_gaussian")
    out1 = tmp_path / "first"
    rc = cli.main(["distill", "--param", "gaussian", "--algo", "dm", "--ipc", "1",
                   "--iterations", "3", "--data-root", str(fmnist_root), "--out", str(out1),
                   "--param-opt", "gpc=2", "--algo-opt", "batch_real=4",
                   "--algo-opt", "net_width=4", "--init-steps", "3", "--eval-runs", "0",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    saved = load_config(out1 / "config.toml")
    assert saved.iterations == 3 and saved.param_options == {"gpc": 2}
    out2 = tmp_path / "second"
    rc = cli.main(["distill", "--config", str(out1 / "config.toml"), "--set", f"out={out2}",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    from safetensors.torch import load_file
    a, b = load_file(out1 / "distilled.safetensors"), load_file(out2 / "distilled.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and a different seed gives different tensors (the comparison above can fail)
    out3 = tmp_path / "third"
    assert cli.main(["distill", "--config", str(out1 / "config.toml"), "--set", f"out={out3}",
                     "--seed", "1", "--no-progress"]) == 0
    c = load_file(out3 / "distilled.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_before_and_after_rows(fmnist_root, tmp_path):
    cfg = load_preset("fmnist-main").with_overrides(
        {"iterations": 1, "out": str(tmp_path / "r"), "dataset.root": str(fmnist_root),
         "eval.before": True, "eval.runs": 1, "eval.options.epochs": 1,
         "eval.models": ["ConvNet", "AlexNet"],
         "algo_options.batch_real": 2, "algo_options.net_width": 4})
    res = run(cfg, progress=False, log=lambda _: None)
    assert [r["model"] for r in res.before] == ["ConvNet", "AlexNet"]
    assert [r["model"] for r in res.after] == ["ConvNet", "AlexNet"]
    for row in res.before + res.after:
        assert row["protocol"] == "paper" and row["label_kind"] == "hard"
        assert row["settings"]["epochs"] == 1 and 0.0 <= row["mean"] <= 100.0
    # resuming keeps the saved before-distillation rows instead of recomputing them
    more = cfg.with_overrides({"iterations": 2})
    res2 = run(more, resume=True, progress=False, log=lambda _: None)
    assert res2.before == res.before and res2.iterations == 2


def test_run_folder_is_locked_checked_and_keeps_the_initial_set(fmnist_root, tmp_path, capsys):
    from splatdd import distilled_file
    from splatdd.run_folder import RunFolderBusy, RunLock
    cfg = load_preset("fmnist-main").with_overrides(
        {"iterations": 1, "out": str(tmp_path / "r"), "dataset.root": str(fmnist_root),
         "eval.runs": 0, "algo_options.batch_real": 2, "algo_options.net_width": 4})
    with RunLock(tmp_path / "r"):                 # another writer holds the folder
        with pytest.raises(RunFolderBusy, match="in use by another splatdd run"):
            run(cfg, progress=False, log=lambda _: None)
    (tmp_path / "r" / ".checkpoint.pt.abc123.tmp").write_bytes(b"")   # left by a killed write
    res = run(cfg, progress=False, log=lambda _: None)
    assert not (tmp_path / "r" / ".checkpoint.pt.abc123.tmp").exists()
    init = distilled_file.load(res.out_dir / "initial.safetensors")
    final = distilled_file.load(res.distilled_file)
    assert not torch.equal(init.images(), final.images())       # one DM step moved the pixels
    (tmp_path / "file").write_text("x")
    assert cli.main(["distill", "--config", "fmnist-main", "--out", str(tmp_path / "file"),
                     "--set", "eval.runs=0", "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err
