"""The command line as a researcher meets it (issue 19), driven through the real entry point
(``python -m splatdd ...`` in a subprocess) on a tiny FashionMNIST stand-in: exit status, message
text and the files left behind.

Ctrl-C in distill's loop (checkpoint, then ``--resume``) and before its first checkpoint is tested
in tests/test_interrupt.py; this module adds Ctrl-C during distill's evaluation phase and during
``splatdd eval``, and a closed pipe."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splatdd.testing import default_sigint

pytest.importorskip("splatdd_pixel")
pytest.importorskip("splatdd_dm")

TINY = ["--algo", "dm", "--ipc", "1", "--algo-opt", "batch_real=4", "--algo-opt", "net_width=4",
        "--threads", "1"]


def _env(fmnist_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPLATDD_PROGRESS"}
    env.update({"SPLATDD_FASHION_MNIST": str(fmnist_root), "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def splatdd(args, fmnist_root, cwd, *, python=(), timeout=180, **env):
    """``python [python...] -m splatdd ARGS`` with stdout/stderr piped (not a terminal)."""
    return subprocess.run([sys.executable, *python, "-m", "splatdd", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=_env(fmnist_root, **env))


def _clean(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# ---- --help ---------------------------------------------------------------------------------------
def _option_blocks(help_text: str) -> dict[str, str]:
    """``{first flag: help text}`` of the ``options:`` part of argparse's help."""
    part = help_text.split("options:", 1)[1]
    blocks: dict[str, str] = {}
    key = None
    for line in part.splitlines():
        m = re.match(r"  (-[^\s,]+(?:, -\S+)?(?: [A-Z0-9_\-|,.\[\]=]+)?)(?:\s{2,}(.*))?$",
                     line)
        if m and not line.startswith("   "):
            key = m.group(1).split(",")[0].split()[0]
            blocks[key] = m.group(2) or ""
        elif key is not None and line.strip():
            blocks[key] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", ["distill", "eval", "render", "export", "fit", "plugins",
                                     "config", pytest.param("teacher", marks=pytest.mark.skipif(
                                         not __import__("importlib").util.find_spec(
                                             "splatdd_sre2l"), reason="sre2l not installed")),
                                     pytest.param("buffer", marks=pytest.mark.skipif(
                                         not __import__("importlib").util.find_spec(
                                             "splatdd_tm"), reason="tm not installed"))])
def test_help_documents_every_option_with_one_default(command, capsys):
    from splatdd.cli import main        # the parser the entry point runs (in-process: fast)
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    blocks = _option_blocks(text)
    assert "-h" in blocks
    for flag, line in blocks.items():
        assert line.strip(), f"{command} {flag} has no help"
        assert line.count("(default") <= 1, f"{command} {flag}: {line}"
        assert "default: None" not in line, f"{command} {flag}: {line}"
    if command == "distill":
        assert "required without --config" in blocks["--ipc"]
        assert "1000" in blocks["--eval-epochs"] and "0" in blocks["--seed"]
    if command == "eval":
        for flag in ("--model", "--runs", "--epochs", "--device"):
            assert "default" in blocks[flag], flag
    if command == "fit":                         # plain text, not reStructuredText
        assert "``" not in text and ":meth:" not in text and "splatdd[photos]" in text


def test_plugin_commands_listed_by_command_name(fmnist_root, tmp_path):
    from importlib.metadata import entry_points
    eps = {ep.name: ep for ep in entry_points(group="splatdd.commands")}
    if not eps:
        pytest.skip("no command plugins installed")
    plugins = splatdd(["plugins"], fmnist_root, tmp_path)
    helptext = splatdd(["--help"], fmnist_root, tmp_path)
    assert plugins.returncode == 0 and helptext.returncode == 0, plugins.stderr
    rows = [line.split() for line in plugins.stdout.splitlines() if line.startswith("command ")]
    listed = {r[1]: r[2] for r in rows}           # command name -> distribution
    # every command the plugins add (argparse's choices, an independent source) is listed by its
    # own name with its distribution, and the --help line says which plugin provides it
    from splatdd.cli import build_parser

    def commands(parser) -> set[str]:
        return set(next(a for a in parser._actions if a.dest == "command").choices)
    added = commands(build_parser()) - commands(build_parser(plugin_commands=False))
    assert added and added == set(listed), (added, listed)
    for name, dist in listed.items():
        assert re.search(rf"\n    {re.escape(name)}\s.*?\[plugin {re.escape(dist)}\]",
                         helptext.stdout, re.S), name
    if "splatdd_tm.cli:register" in {ep.value for ep in eps.values()}:
        assert listed.get("buffer") == "splatdd-tm" and "tm" not in listed


# ---- messages -------------------------------------------------------------------------------------
def test_messages_name_the_key_and_the_value(fmnist_root, tmp_path):
    cases = [
        (["distill", "--ipc", "1", "--resolution", "0"], ["--resolution", "'0'"]),
        (["distill", "--ipc", "1", "--dataset", "mnist", "--iterations", "1", "--out", "o"],
         ["--data-root"]),
    ]
    if __import__("importlib").util.find_spec("splatdd_gaussian"):
        cases.append((["distill", *TINY, "--param", "gaussian", "--param-opt", "gpc=abc",
                       "--iterations", "1", "--eval-runs", "0", "--out", "o2"],
                      ["gpc", "'abc'"]))
    notes = tmp_path / "notes.txt"
    notes.write_text("These are my notes about the run.\nIt went well.\n")
    cases.append((["eval", notes], ["notes.txt", "not a safetensors file"]))
    for argv, needles in cases:
        proc = splatdd(argv, fmnist_root, tmp_path)
        assert proc.returncode == 2, (argv, proc.stderr)
        _clean(proc)
        for needle in needles:
            assert needle in proc.stderr, (argv, needle, proc.stderr)
        assert "root=" not in proc.stderr, proc.stderr        # no Python keyword on the CLI
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = splatdd(["distill", "--ipc", "1", "--iterations", "1", "--out", "o3"], empty, tmp_path)
    assert proc.returncode == 2 and "--data-root" in proc.stderr and "root=" not in proc.stderr


# ---- a tiny run: plain progress, pictures, render ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(fmnist_root, tmp_path_factory):
    """One 3-iteration pixel + dm run with progress on, stderr piped."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    proc = splatdd(["distill", *TINY, "--param", "pixel", "--iterations", "3", "--eval-runs", "0",
                    "--checkpoint-every", "0", "--out", cwd / "run"], fmnist_root, cwd)
    assert proc.returncode == 0, proc.stderr
    return proc, cwd / "run"


def test_plain_progress_lines_when_piped(tiny_run):
    proc, _ = tiny_run
    err = proc.stderr
    assert "\r" not in err and "\x1b" not in err          # no bar redraws, no escape codes
    lines = [ln for ln in err.splitlines() if ln.startswith("pixel+dm: ")]
    assert lines[0] == "pixel+dm: 0/3 it (0%), 0:00 elapsed, ETA ?"
    assert re.fullmatch(r"pixel\+dm: 1/3 it \(33%\), \d+:\d\d elapsed, ETA \d+:\d\d, .*loss=.*",
                        lines[1]), lines
    assert lines[-1].startswith("pixel+dm: 3/3 it (100%), ")


def test_distill_prints_its_pictures(tiny_run):
    proc, out = tiny_run
    pictures = [ln for ln in proc.stdout.splitlines() if ln.startswith("picture: ")]
    assert len(pictures) == 2, proc.stdout
    assert pictures[0].startswith(f"picture: {out / 'grid.png'} (862x")
    assert ("pixel + dm, fashion_mnist (budget IPC 1): GPC 1 (10 images), 28x28 px"
            in pictures[0])
    assert pictures[1] == f"picture: {out / 'loss.png'} (the loss curve)"
    assert (out / "grid.png").is_file() and (out / "loss.png").is_file()


def test_render_title_and_class_names_above_the_grid(tiny_run, fmnist_root):
    from PIL import Image
    _, out = tiny_run
    f = out / "distilled.safetensors"
    cwd = out.parent
    titled = splatdd(["render", f, "--out", "t.png"], fmnist_root, cwd)
    bare = splatdd(["render", f, "--out", "b.png", "--bare", "--scale", "3"], fmnist_root, cwd)
    small = splatdd(["render", f, "--out", "s.png", "--bare"], fmnist_root, cwd)
    for proc in (titled, bare, small):
        assert proc.returncode == 0, proc.stderr
        _clean(proc)
    assert "GPC 1 (10 images)" in titled.stdout
    t, b = np.asarray(Image.open(cwd / "t.png")), np.asarray(Image.open(cwd / "b.png"))
    # bare: 10 columns of 28 px x 3 with 2 px padding; tiny images are upsampled 3x by default
    assert b.shape == (1 * (84 + 2) + 2, 10 * (84 + 2) + 2)
    assert Image.open(cwd / "s.png").size == (10 * 30 + 2, 32)
    band = t.shape[0] - b.shape[0]
    assert band > 20 and t.shape[1] == b.shape[1]
    assert np.array_equal(t[band:], b)                    # the images, unchanged, below the band
    # a caption (dark text on white) above every one of the 10 columns
    for col in range(10):
        x0 = 2 + col * 86
        assert t[:band, x0:x0 + 84].min() < 128, col


def test_no_warnings_on_a_tiny_gaussian_run(fmnist_root, tmp_path):
    pytest.importorskip("splatdd_gaussian")
    proc = splatdd(["distill", *TINY, "--param", "gaussian", "--init-steps", "2",
                    "--iterations", "2", "--eval-runs", "1", "--eval-epochs", "1",
                    "--no-progress", "--out", "g"], fmnist_root, tmp_path,
                   python=("-W", "error::UserWarning", "-W", "error::FutureWarning"))
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    assert "points per image" in proc.stdout and "GPC 11 (110 images)" in proc.stdout


# ---- fit states its source -----------------------------------------------------------------------
_FAKE_SKIMAGE = '''
import numpy as np

def _photo(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)

astronaut = lambda: _photo(0)
chelsea = lambda: _photo(1)
coffee = lambda: _photo(2)
rocket = lambda: _photo(3)
stereo_motorcycle = lambda: (_photo(4), _photo(5), None)
retina = lambda: _photo(6)
immunohistochemistry = lambda: _photo(7)
hubble_deep_field = lambda: _photo(8)
'''


def _fake_skimage(root: Path, available: bool) -> str:
    pkg = root / "skimage"
    pkg.mkdir(parents=True)
    if available:
        (pkg / "__init__.py").write_text("")
        (pkg / "data.py").write_text(_FAKE_SKIMAGE)
    else:
        (pkg / "__init__.py").write_text("raise ImportError('no scikit-image here (test)')\n")
    return str(root)


FIT = ["fit", "--images", "2", "--resolution", "16", "--steps", "1", "--methods", "pixel",
       "--threads", "1"]


def test_fit_without_scikit_image_says_so_everywhere(fmnist_root, tmp_path):
    from PIL import Image
    path = _fake_skimage(tmp_path / "site", available=False)
    proc = splatdd([*FIT, "--source", "skimage"], fmnist_root, tmp_path, PYTHONPATH=path)
    assert proc.returncode == 2 and "splatdd[photos]" in proc.stderr, proc.stderr
    _clean(proc)
    proc = splatdd([*FIT, "--json", "r.json", "--png", "r.png"], fmnist_root, tmp_path,
                   PYTHONPATH=path)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("images: first 2 FashionMNIST test images") and "fallback" in first
    assert "splatdd[photos]" in first
    assert any(ln.startswith("Images: first 2 FashionMNIST") and "fallback" in ln
               for ln in proc.stdout.splitlines())
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["source"] == "fashion_mnist" and "fallback" in res["images"]
    img = np.asarray(Image.open(tmp_path / "r.png").convert("L"))
    # title band above 2 rows (targets, pixel) of 16 px images upsampled 4x
    assert img.shape[0] > 2 * (64 + 2) + 2 + 40 and img[:12].min() < 128


def test_fit_with_scikit_image_uses_its_photographs(fmnist_root, tmp_path):
    path = _fake_skimage(tmp_path / "site", available=True)
    proc = splatdd([*FIT, "--json", "r.json"], fmnist_root, tmp_path, PYTHONPATH=path)
    assert proc.returncode == 0, proc.stderr
    assert "scikit-image's bundled photographs" in proc.stdout and "fallback" not in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["source"] == "skimage"


# ---- Ctrl-C outside distill's loop, closed pipe --------------------------------------------------
def _popen(args, fmnist_root, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "splatdd", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=_env(fmnist_root), preexec_fn=default_sigint, **kw)


def _wait_for(path: Path, proc, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.1)


def test_sigint_during_distills_evaluation(fmnist_root, tmp_path):
    out = tmp_path / "run"
    proc = _popen(["distill", *TINY, "--param", "pixel", "--iterations", "1", "--no-progress",
                   "--eval-runs", "1", "--eval-epochs", "100000", "--out", out],
                  fmnist_root, tmp_path)
    for line in proc.stdout:                              # "wrote FILE ...": then it evaluates
        if line.startswith("wrote "):
            break
    else:
        pytest.fail(f"no 'wrote' line; stderr: {proc.communicate()[1]}")
    time.sleep(1.5)                                       # into the evaluation
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"still running 180 s after Ctrl-C; stdout: {stdout[-2000:]}\n"
                    f"stderr: {stderr[-2000:]}")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted during the evaluation" in stderr
    assert f"splatdd eval {out / 'distilled.safetensors'}" in stderr
    assert (out / "distilled.safetensors").is_file()


def test_sigint_during_eval_and_closed_pipe(tiny_run, fmnist_root):
    _, out = tiny_run
    proc = _popen(["eval", out / "distilled.safetensors", "--runs", "1", "--epochs", "100000"],
                  fmnist_root, out.parent)
    time.sleep(0.5)
    line = proc.stdout.readline()                         # the header: evaluation has begun
    assert "10 images (GPC 1) in the budget of IPC 1" in line and "evaluating at 28x28" in line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    # 130, or death by SIGINT itself (seen once in a loaded, backgrounded full-suite run): both are
    # the shell's Ctrl-C status; what matters here is the message and no traceback.
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr
    assert "splatdd: interrupted" in stderr
    proc = _popen(["config", "list"], fmnist_root, out.parent)
    proc.stdout.close()                                   # like `| head -0`
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in stderr, stderr


def test_ctrl_c_in_the_last_step_stops_before_the_evaluation(tmp_path, capsys):
    """The loop's Ctrl-C message promises a stop after the current step: in the last step too
    (else the run would go on into its evaluation). Then --resume writes the file."""
    import torch

    from splatdd import distill as D
    from splatdd.testing import TINY_SPEC, TinyPixels, ToyProjection, make_tiny_real

    def build():
        p = TinyPixels.build(TINY_SPEC, 1, generator=torch.Generator().manual_seed(1))
        a = ToyProjection(make_tiny_real(8), ipc=1, generator=torch.Generator().manual_seed(0))
        return p, a

    def ctrl_c_at(k):
        def hook(step, loss, param, algo):
            if step == k:
                os.kill(os.getpid(), signal.SIGINT)      # handled by the loop's handler
        return hook
    p, a = build()
    with pytest.raises(D.Interrupted) as exc:
        D.distill(p, a, iterations=3, out_dir=tmp_path, progress=False, plot=False,
                  checkpoint_every=0, on_step=ctrl_c_at(3))
    assert exc.value.step == 3 and exc.value.checkpoint == D.checkpoint_path(tmp_path)
    assert "finishing the current step" in capsys.readouterr().err
    assert torch.load(D.checkpoint_path(tmp_path), weights_only=False)["step"] == 3
    assert not (tmp_path / D.DISTILLED_NAME).exists()
    p, a = build()
    D.distill(p, a, iterations=3, out_dir=tmp_path, progress=False, plot=False, resume=True)
    assert (tmp_path / D.DISTILLED_NAME).is_file()
