"""scripts/gpu_check.sh (issue 17) on a machine without a GPU: the dry run writes a complete
summary / md / json with every GPU step "skipped: no GPU" and the paper's Table 20 rows, also
without nvcc; and the parts that run on a CPU (the Table 20 fitting task, the renderer benchmark
rows, the sanitizer case, the parsers, the time boxes) behave."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

import splatdd

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str):
    key = f"splatdd_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


gc = load("gpu_check")
t20 = load("table20")
rg = load("render_gpu")
case = load("gpu_sanitize_case")
GPU_STEPS = [name for name, needs_gpu, *_ in gc.STEPS if needs_gpu]
PAPER_LINES = ["| A100 (s) | 10.45 | 12.87 | 19.09 | 41.53 |", "| RTX 4090 (s) | 7.60 | 9.38 | 14.06 | 31.00 |",
               "| RTX 5090 (s) | 7.13 | 6.99 | 9.54 | 21.79 |", "| paper memory (GB) | 1.66 | 1.70 | 1.81 | 2.28 |"]


def run_script(args, env=None, timeout=120):
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


# ---- the dry run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run without nvcc or compute-sanitizer reachable (PATH holds only the system dirs
    and this Python; CUDA_HOME points nowhere), exporting to a second folder."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin", CUDA_HOME=str(tmp / "no-cuda"),
               PYTHON=str(bindir / "python3"))
    res = tmp / "results"
    proc = run_script([str(res), "--dry-run", "--export", str(tmp / "out")], env=env)
    return proc, res, tmp / "out"


def test_dry_run_succeeds_and_prints_a_summary(dry_run):
    proc, _, _ = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "(DRY RUN)" in out
    for name in GPU_STEPS:
        assert any(line.split()[:4] == [name, "skipped:", "no", "GPU"] for line in out.splitlines()), name
    for line in PAPER_LINES:
        assert line in out
    assert "ours, this GPU (s) | not run" in out


def test_dry_run_json_has_every_step_and_the_paper_rows(dry_run):
    _, res, _ = dry_run
    rep = json.loads((res / "render_cuda.json").read_text())
    assert rep["dry_run"] is True
    steps = {s["name"]: s for s in rep["steps"]}
    assert list(steps) == [name for name, *_ in gc.STEPS]
    assert steps["env"]["status"] == "ok"
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped: no GPU"
        assert steps[name]["seconds"] == 0
    # no nvcc / compute-sanitizer reachable: found missing, named
    assert rep["machine"]["nvcc"] is None and rep["machine"]["compute_sanitizer"] is None
    assert "nvcc (for the build)" in rep["machine"]["missing"]
    assert rep["machine"]["torch"] == torch.__version__
    paper = rep["paper_table20"]
    assert paper["source"] == "GSDD paper, Table 20"
    seconds = {r["gpu"]: r["seconds"] for r in paper["rows"] if "seconds" in r}
    assert seconds["A100"] == {"21": 10.45, "170": 12.87, "682": 19.09, "2730": 41.53}
    assert set(seconds) == {"A100", "RTX 4090", "RTX 5090"}
    assert rep["table20"] is None and rep["render_benchmark"] == {}


def test_dry_run_markdown_and_export(dry_run):
    _, res, out = dry_run
    md = (res / "render_cuda.md").read_text()
    assert "**Dry run**" in md and "GSDD paper, Table 20" in md
    for line in PAPER_LINES:
        assert line in md
    for name in [n for n, *_ in gc.STEPS]:
        assert f"| {name} | " in md
    assert "- GPU: none" in md and "nvcc not found" in md and "bash scripts/gpu_check.sh" in md
    assert (out / "render_cuda.md").read_text() == md
    assert json.loads((out / "render_cuda.json").read_text())["dry_run"] is True
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        assert "logs/env.log" in tar.getnames()


def test_script_rejects_bad_arguments(tmp_path):
    proc = run_script([])
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = run_script([str(tmp_path), "--budget-s", "5", "--dry-run"])
    assert proc.returncode == 2 and "--budget-s must be >= 30" in proc.stderr
    proc = run_script([str(tmp_path), "--table20-steps", "0", "--dry-run"])
    assert proc.returncode == 2 and "--table20-steps" in proc.stderr


def test_outputs_written_when_splatdd_is_half_installed(tmp_path):
    """On a fresh GPU machine the build step installs splatdd editable while gpu_check runs: in its
    process the editable finder is missing (it loads at start-up) and site-packages/splatdd/,
    holding _C alone, is a namespace package without io_utils. Both are recreated here (finders
    and path entries that know splatdd removed, a folder of that shape first on the path); the dry
    run must still write its outputs."""
    (tmp_path / "site" / "splatdd").mkdir(parents=True)
    code = textwrap.dedent(f"""
        import importlib.machinery, importlib.util, os, sys
        sys.meta_path[:] = [f for f in sys.meta_path if f is importlib.machinery.PathFinder
                            or getattr(f, "find_spec", None) is None
                            or f.find_spec("splatdd", None) is None]
        sys.path[:] = [{str(tmp_path / "site")!r}] + [
            p for p in sys.path if not os.path.exists(os.path.join(p, "splatdd", "__init__.py"))]
        spec = importlib.util.find_spec("splatdd")
        assert spec.origin in (None, "namespace"), spec       # the half-installed shape
        sys.argv = ["gpu_check.py", {str(tmp_path / "out")!r}, "--dry-run",
                    "--export", {str(tmp_path / "exp")!r}]
        sys.path.insert(0, {str(REPO / "benchmarks")!r})
        import gpu_check
        sys.exit(gpu_check.main())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("render_cuda.md", "render_cuda.json", "gpu_check_logs.tar.gz"):
        assert (tmp_path / "exp" / name).stat().st_size > 0


def test_report_rewritten_after_every_step(tmp_path):
    """A run stopped from outside (the device tool's time limit) keeps the steps it finished:
    the report is rewritten after each, the steps not reached marked pending."""
    check = gc.Check(tmp_path, dry_run=True, budget_s=420, python=sys.executable,
                     table20_steps=1000, table20_images=1000)
    seen = []

    def after(steps):
        seen.append([s.name for s in steps])
        rep = gc.build_report(gc.with_pending(steps), check.info, dry_run=True, invocation="x",
                              budget_s=420, wall_s=1.0)
        gc.write_outputs(tmp_path, rep, tmp_path / "exp")
        if len(steps) == 2:             # checked after the run (run_all logs exceptions)
            partial.append(json.loads((tmp_path / "exp" / "render_cuda.json").read_text()))
            partial.append((tmp_path / "exp" / "render_cuda.md").read_text())
        raise OSError("disk full")          # a failed partial write does not stop the run

    partial: list = []
    steps = check.run_all(after_step=after)
    statuses = [s["status"] for s in partial[0]["steps"]]
    assert statuses[:2] == ["ok", "skipped: no GPU"]
    assert statuses[2:] == ["pending"] * (len(gc.STEPS) - 2)
    assert "| tests | pending |" in partial[1]
    names = [name for name, *_ in gc.STEPS]
    assert seen == [names[:i] for i in range(1, len(names) + 1)]
    assert [s.name for s in steps] == names


def test_no_gpu_without_dry_run_skips_too(tmp_path):
    check = gc.Check(tmp_path, dry_run=False, budget_s=420, python=sys.executable,
                     table20_steps=1000, table20_images=1000)
    check.info = {"cuda_available": False, "torch": "x", "nvidia_smi": None}
    assert not check.gpu()
    res = check.skipped("tests")
    assert res.status == "skipped: no GPU" and "torch.cuda.is_available() is False" in res.detail
    check.info["cuda_available"] = True
    assert check.gpu()


def test_exit_status():
    ok, skip = gc.StepResult("env", "ok"), gc.StepResult("tests", "skipped: no GPU")
    assert gc.exit_status([ok, skip, gc.StepResult("racecheck", "unsupported")]) == 0
    for bad in ("failed", "timeout"):
        assert gc.exit_status([ok, skip, gc.StepResult("build", bad)]) == 1


def test_time_boxes_keep_the_later_steps_minimum(tmp_path):
    check = gc.Check(tmp_path, dry_run=False, budget_s=300, python=sys.executable,
                     table20_steps=1000, table20_images=1000)
    check.info = {"cuda_available": True}
    names = [n for n, *_ in gc.STEPS]
    later = sum(s[3] for s in gc.STEPS[2:]) + gc.REPORT_RESERVE_S
    box = check.time_box(names.index("build"))
    assert box == pytest.approx(min(gc.STEPS[1][2], 300 - later), abs=1.0)
    assert check.time_box(len(gc.STEPS) - 1) == pytest.approx(gc.STEPS[-1][2], abs=1.0)
    check.deadline -= 290      # nearly out of time: the first step's box goes negative
    assert check.time_box(0) < 10
    check.info = {"cuda_available": False}   # without a GPU the GPU steps reserve nothing
    check.deadline += 290
    assert check.time_box(0) == pytest.approx(gc.STEPS[0][2], abs=1.0)


# ---- running and parsing -------------------------------------------------------------------------
def test_run_logged_records_exit_code_and_time_box(tmp_path):
    log = tmp_path / "x.log"
    rc, secs, timed_out = gc.run_logged([sys.executable, "-c", "print('hello'); raise SystemExit(3)"],
                                        log, 30, env={"FOO": "bar baz"})
    assert (rc, timed_out) == (3, False)
    text = log.read_text()
    assert "FOO='bar baz'" in text and "hello" in text and "# exit code 3" in text
    rc, secs, timed_out = gc.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, 1)
    assert timed_out and rc == 124 and secs < 15
    rc, _, timed_out = gc.run_logged(["/nonexistent/program"], log, 5)
    assert rc != 0 and not timed_out


def test_parse_junit_counts_every_outcome(tmp_path):
    """A real pytest junit file: passes, failures, errors and skips, counted per test file."""
    d = tmp_path / "suite"
    d.mkdir()
    (d / "test_render_cuda.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert 1 == 2, "one is not two"
        @pytest.mark.skip(reason="no CUDA device")
        def test_skip(): pass
        @pytest.fixture
        def broken(): raise RuntimeError("fixture broke")
        def test_err(broken): pass
    """))
    (d / "test_render_other.py").write_text("def test_a(): pass\ndef test_b(): pass\n")
    xml = tmp_path / "j.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    "--rootdir", str(d), "-c", os.devnull, str(d)], capture_output=True, cwd=d, timeout=60)
    j = gc.parse_junit(xml)
    assert (j["tests"], j["passed"], j["failed"], j["errors"], j["skipped"]) == (6, 3, 1, 1, 1)
    assert j["per_file"]["test_render_cuda.py"] == {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert j["per_file"]["test_render_other.py"]["passed"] == 2
    assert any(f.startswith("test_render_cuda.py::test_bad:") and "one is not two" in f for f in j["failures"])
    assert any(f.startswith("test_render_cuda.py::test_err:") for f in j["failures"])


MEMCHECK = """========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at 0x1a0 in /w/cuda/render_fwd.cu:120:void splatdd::cuda::render_fwd_kernel<float, 3>(...)
=========     by thread (3,0,0) in block (7,0,0)
=========     Address 0x7f0012345678 is out of bounds
========= Invalid __global__ write of size 4 bytes
=========     at 0x1a0 in /w/cuda/render_fwd.cu:120:void splatdd::cuda::render_fwd_kernel<float, 3>(...)
=========     by thread (4,0,0) in block (7,0,0)
ok   ragged fp32
========= Leaked 1024 bytes at 0x7f0000000000
========= LEAK SUMMARY: 1024 bytes leaked in 1 allocations
========= ERROR SUMMARY: 3 errors
"""
RACECHECK = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at 0x3f0 in /w/cuda/render_bwd.cu:88:void splatdd::cuda::render_bwd_kernel<float, 1>(...)
=========     and Read access at 0x420 in /w/cuda/render_bwd.cu:95:void splatdd::cuda::render_bwd_kernel<float, 1>(...) [4 hazards]
========= Warning: Race reported between Read access at 0x10 in at::native::reduce_kernel(...)
=========     and Write access at 0x20 in at::native::reduce_kernel(...) [1 hazard]
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
========= ERROR SUMMARY: 1 error
"""


def test_parse_sanitizer_reports():
    m = gc.parse_sanitizer(MEMCHECK)
    assert m["errors"] == 3 and m["leaked_bytes"] == 1024 and m["leaked_allocations"] == 1
    assert m["access_errors"] == 2
    assert m["reports"][0] == "Invalid __global__ write of size 4 bytes" and len(m["reports"]) == 2
    assert m["lines_naming_splatdd"] == 2 and not m["unsupported"]
    r = gc.parse_sanitizer(RACECHECK)
    assert (r["errors"], r["hazards"], r["race_errors"], r["race_warnings"]) == (1, 2, 1, 1)
    assert r["lines_naming_splatdd"] == 2 and r["leaked_bytes"] == 0
    # CUDA 13's racecheck prints its RACECHECK SUMMARY without an ERROR SUMMARY (first H200 run)
    alone = gc.parse_sanitizer(RACECHECK.replace("========= ERROR SUMMARY: 1 error\n", ""))
    assert alone["errors"] == 1 and alone["race_errors"] == 1
    quiet = gc.parse_sanitizer("========= COMPUTE-SANITIZER\n========= RACECHECK SUMMARY: "
                               "0 hazards displayed (0 errors, 0 warnings)\n")
    assert quiet["errors"] == 0 and quiet["hazards"] == 0
    clean = gc.parse_sanitizer("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert clean["errors"] == 0 and clean["reports"] == []
    refused = gc.parse_sanitizer("========= Error: Device not supported\n========= Error: Target "
                                 "application terminated before first instrumented API call\n")
    assert refused["unsupported"] and refused["errors"] is None
    assert gc.parse_sanitizer("Traceback ...\n")["errors"] is None      # no summary: not "clean"


def test_parse_versions():
    assert gc.parse_nvcc_version("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, "
                                 "release 12.4, V12.4.131\n") == "12.4"
    assert gc.parse_nvcc_version("garbage") is None
    rows = gc.parse_nvidia_smi("NVIDIA H200, 580.159.03, 143771 MiB\nNVIDIA A100-SXM4-40GB, 550.1, 40960 MiB\n\n")
    assert [r["name"] for r in rows] == ["NVIDIA H200", "NVIDIA A100-SXM4-40GB"] and rows[1]["driver"] == "550.1"


def test_report_with_figures_renders_them(tmp_path):
    """build_report + render_markdown + summary with measured rows (made on the CPU here)."""
    rows = [t20.FitRow(21, 1000, 1000, 12.5, 12.5, 0.0125, False, 1.2, 1.5, 15.0, 22.0).as_dict(),
            t20.FitRow(2730, 1000, 400, 50.0, 20.0, 0.05, True, 2.0, 2.4, 20.0, 30.0).as_dict()]
    table = t20.comparison_table(rows, "NVIDIA H200")
    t20_data = {"task": {"images": 1000, "resolution": 128, "steps": 1000, "lr": 0.01, "channels": 3,
                         "ssaa": 2, "timed": "Adam steps", "image_source": "procedural"},
                "rows": rows, "table_md": table}
    steps = [gc.StepResult(n, "ok", 1.0, 10, "cmd", f"logs/{n}.log") for n, *_ in gc.STEPS]
    steps[-1].data = t20_data
    names = [n for n, *_ in gc.STEPS]
    steps[names.index("tests")].data = {"failures": [f"test_render_cuda.py::test_{i}: boom" for i in range(8)]}
    rep = gc.build_report(steps, {"gpu": "NVIDIA H200", "missing": []}, dry_run=False,
                          invocation="bash scripts/gpu_check.sh x", budget_s=420, wall_s=300)
    md = gc.render_markdown(rep)
    assert "| ours, NVIDIA H200 (s) | 12.50 | not run | not run | 50.00* |" in md
    assert "2730: 400/1000" in md and "extrapolated" in md
    text = "\n".join(gc.summary(rep))
    assert "50.00*" in text and "1000 images x 1000 steps" in text and len(text.splitlines()) < 45
    assert "FAILED test_render_cuda.py::test_5: boom" in text and "... and 2 more" in text
    assert "test_render_cuda.py::test_7: boom" in md
    written = gc.write_outputs(tmp_path, rep, None)
    assert json.loads(written[1].read_text())["table20"]["rows"][1]["steps_run"] == 400


# ---- the Table 20 task on the CPU ----------------------------------------------------------------
def test_paper_rows_match_the_published_table():
    assert t20.PAPER_SIZES == (21, 170, 682, 2730)
    assert t20.PAPER_SECONDS["RTX 5090"] == (7.13, 6.99, 9.54, 21.79)
    assert t20.PAPER_MEMORY_GB == (1.66, 1.70, 1.81, 2.28)
    assert all(r["source"] == "GSDD paper, Table 20" for r in t20.paper_rows())


def test_grid_init_covers_a_constant_image():
    """Oracle: the renderer. The grid initialisation of a constant image renders close to it away
    from the border (the coverage factor pi/2 is right), and every Gaussian is inside the image."""
    img = torch.full((2, 3, 32, 32), 0.6)
    for n in (21, 64, 170):
        p = grid_init = t20.grid_init(img, n)
        assert p.shape == (2, n, 9)
        assert p[..., :2].abs().max() < 1 and len({(float(a), float(b)) for a, b in p[0, :, :2]}) == n
        assert torch.allclose(p[..., 5:8], torch.full_like(p[..., 5:8], 0.6 / (math.pi / 2)))
        assert torch.all(grid_init[..., 8] == 1)
    p = t20.grid_init(img, 64)
    out = splatdd.render(p, 32, 32)
    assert (out[..., 8:24, 8:24] - 0.6).abs().max() < 0.1
    with pytest.raises(ValueError, match="n_gaussians"):
        t20.grid_init(img, 0)


def test_fit_improves_and_budget_extrapolates():
    images = t20.procedural_images(3, 24, seed=1)
    row = t20.fit_images(images, 16, steps=40, ssaa=1)
    assert row.steps_run == 40 and not row.extrapolated and row.seconds == row.seconds_measured
    assert row.psnr > row.psnr_init + 1.0
    assert row.peak_memory_gb is None        # CPU: no GPU memory figure
    short = t20.fit_images(images, 16, steps=10_000, ssaa=1, budget_s=0.05)
    assert short.extrapolated and 1 <= short.steps_run < 10_000
    assert short.seconds == pytest.approx(short.seconds_per_step * 10_000)
    with pytest.raises(ValueError, match="steps"):
        t20.fit_images(images, 4, steps=0)


def test_run_task_goes_on_after_a_failing_size():
    images = t20.procedural_images(2, 16, seed=2)
    seen = []
    rows = t20.run_task(images, [0, 4], steps=2, ssaa=1, log=lambda s: None,
                        on_row=lambda r: seen.append(len(r)))
    assert rows[0]["gaussians"] == 0 and "n_gaussians must be >= 1" in rows[0]["error"]
    assert rows[1]["steps_run"] == 2 and "error" not in rows[1] and seen == [1, 2]
    table = "\n".join(t20.comparison_table(rows, "X", [0, 4]))
    assert "| ours, X (s) | error | " in table


def test_task_images(tmp_path):
    a = t20.procedural_images(4, 16, seed=3)
    assert torch.equal(a, t20.procedural_images(4, 16, seed=3))
    assert not torch.equal(a, t20.procedural_images(4, 16, seed=4))
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.05 and a.shape == (4, 3, 16, 16)
    x, desc = t20.load_task_images(2, 20, procedural=True)
    assert x.shape == (2, 3, 20, 20) and "procedurally generated" in desc
    with pytest.raises(ValueError, match="--fmnist"):
        t20.load_task_images(2, 20, fmnist=str(tmp_path))
    bad = tmp_path / t20.FMNIST_FILES[0]
    import gzip
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + b"\x00" * 12)       # a label file's magic
    with pytest.raises(ValueError, match="not an IDX image file"):
        t20.load_task_images(2, 20, fmnist=str(tmp_path))


@pytest.mark.skipif(t20.find_fmnist() is None, reason="FashionMNIST not installed (dataset-fashion-mnist)")
def test_fmnist_images_are_upsampled_grey():
    x, desc = t20.load_task_images(3, 64)
    assert x.shape == (3, 3, 64, 64) and "FashionMNIST" in desc
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    raw = t20.read_idx_images(t20.find_fmnist() / t20.FMNIST_FILES[0], 3).float() / 255
    down = torch.nn.functional.interpolate(x[:, :1], size=(28, 28), mode="area")
    assert (down - raw).abs().mean() < 0.05


def test_table20_cli(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert t20.main(["--device", "cpu", "--images", "2", "--resolution", "16", "--steps", "3",
                     "--sizes", "4,21", "--ssaa", "1", "--procedural", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [r["gaussians"] for r in d["rows"]] == [4, 21] and d["task"]["steps"] == 3
    assert "| A100 (s) | - | 10.45 |" in capsys.readouterr().out
    for bad in (["--sizes", "0"], ["--sizes", "x"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            t20.main(bad)
        assert e.value.code == 2


# ---- renderer benchmark and sanitizer case on the CPU --------------------------------------------
def test_render_gpu_uses_the_cpu_benchmark_workloads():
    bench = rg.load_cpu_benchmark()
    if getattr(bench, "CONFIGS", None):
        assert rg.default_configs(bench) == tuple(tuple(c) for c in bench.CONFIGS)
    else:   # the copy must still match the list in render.py's main()
        import ast
        import re
        src = (REPO / "benchmarks" / "render.py").read_text()
        m = re.search(r"^    configs = (\[.*\])$", src, re.M)
        assert m, "benchmarks/render.py: no configs list found; update render_gpu.FALLBACK_CONFIGS"
        assert tuple(ast.literal_eval(m.group(1))) == rg.FALLBACK_CONFIGS


def test_render_gpu_rows_on_cpu():
    rows = rg.benchmark([(2, 8, 16)], "cpu", 1, log=lambda s: None)
    assert [r["renderer"] for r in rows] == ["splatdd cpu", "dense reference (cpu)"]
    assert rows[1]["fwd_speedup"] == pytest.approx(1.0) and rows[0]["fwd_img_s"] > 0
    assert rg.cuda_vs_cpu(rows) == []
    fake = [dict(rows[0], renderer="splatdd cuda", fwd_img_s=10.0, fwd_bwd_img_s=4.0),
            dict(rows[0], renderer="splatdd cpu", fwd_img_s=2.0, fwd_bwd_img_s=1.0)]
    assert rg.cuda_vs_cpu(fake) == [{"workload": rows[0]["workload"], "fwd": 5.0, "fwd_bwd": 4.0}]
    assert rg.parse_configs("4,8,16;2,3,8") == [(4, 8, 16), (2, 3, 8)]
    import argparse
    for bad in ("4,8", "a,b,c", "0,1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            rg.parse_configs(bad)


def test_render_gpu_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert rg.main(["--device", "cpu", "--configs", "2,8,16", "--repeats", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [r["renderer"] for r in d["rows"]] == ["splatdd cpu", "dense reference (cpu)"]
    assert d["configs"] == [[2, 8, 16]] and d["cpu_threads"] == torch.get_num_threads()
    if "cuda" not in splatdd.backends():
        assert rg.main([]) == 2 and "CUDA backend is not usable" in capsys.readouterr().err


def test_sanitize_case_runs_on_cpu(capsys):
    """The case's inputs are valid and its comparison runs (CPU against CPU: exact)."""
    res = case.run_cases("cpu")
    assert len(res) == len(case.CASES) and all(eo == 0 and eg == 0 for _, eo, eg in res)
    crowded = case.make_case((300,), 3, torch.float32, True, seed=0)
    assert crowded[:, :2].abs().max() <= 0.2         # inside one 8 x 8 tile at ssaa 1
    if "cuda" not in splatdd.backends():
        assert case.main([]) == 2
        assert "not usable here" in capsys.readouterr().err
