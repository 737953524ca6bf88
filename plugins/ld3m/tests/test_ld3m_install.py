"""`pip install splatdd[diffusion]` from a checkout resolves the ld3m plugin (docs/ld3m.md).

Does what the docs say: build both wheels into a folder with
``pip wheel --no-deps --no-build-isolation -w wheels . plugins/ld3m``, then
``pip install --find-links wheels 'splatdd[diffusion]'`` into a new virtual environment in which the
already installed torch 2.13.0 (and the other dependencies) are visible, and check that both
distributions came from the wheels, that torch was not reinstalled, and that the entry points work.

One deviation from ``python -m venv --system-site-packages``: on a machine where splatdd and its
plugins are already installed (a developer's, CI's) that venv would see them as installed and pip
would resolve nothing. So the venv is made without system site-packages and gets a ``.pth`` line
pointing at a folder of links to every system site-packages entry EXCEPT splatdd's own
distributions: torch & co. are visible (and count as installed), splatdd is not. ``--no-index``
keeps the test offline (everything else is already installed).

Slow (it compiles the core's C++ extension into a wheel): marked ``slow``.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
OURS = ("splatdd", "__editable__.splatdd", "_editable_skbc_splatdd", "__editable___splatdd")


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


@pytest.mark.slow
def test_pip_install_splatdd_diffusion_from_wheels(tmp_path):
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "plugins" / "ld3m" / "pyproject.toml").is_file():
        pytest.skip("not in a splatdd checkout")
    for mod in ("scikit_build_core", "pybind11", "setuptools"):
        pytest.importorskip(mod)
    if shutil.which("cmake") is None:
        try:
            import cmake  # noqa: F401
        except ImportError:
            pytest.skip("cmake is needed to build the core wheel")
    wheels = tmp_path / "wheels"
    env = dict(os.environ, SPLATDD_CUDA="OFF", PIP_NO_INPUT="1")
    env.pop("PIP_FIND_LINKS", None)
    # 1. the wheels (the core's build directory is a temporary one, not the checkout's build/)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels,
          "--config-settings", f"build-dir={tmp_path / 'build'}", ".", "plugins/ld3m"], cwd=ROOT, env=env)
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(n.startswith("splatdd-0") for n in names) and any(n.startswith("splatdd_ld3m-") for n in names)

    # 2. a venv that sees the system's packages except splatdd's own
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    vpy = venv / "bin" / "python"
    # the venv's bundled setuptools (old) would shadow the system's, which torch's metadata requires
    _run([vpy, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], env=env)
    visible = tmp_path / "system-site"
    visible.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            low = entry.name.lower()
            if low.startswith(OURS) or entry.suffix == ".pth" or (visible / entry.name).exists():
                continue
            (visible / entry.name).symlink_to(entry)
    vsite = Path(_run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (vsite / "zz_system_site.pth").write_text(str(visible) + "\n")
    r = _run([vpy, "-c", "import importlib.util as u, torch; print(torch.__version__, "
              "u.find_spec('splatdd') is None)"], env=env)
    assert r.stdout.split() == [__import__("torch").__version__, "True"]

    # 3. exactly the documented install (offline)
    r = _run([vpy, "-m", "pip", "install", "--no-index", "--find-links", wheels, "splatdd[diffusion]"], env=env)
    out = r.stdout
    assert "splatdd-ld3m" in out.replace("_", "-") and "torch" not in out.split("Successfully installed")[-1]

    # 4. it works: the plugin is found through its entry points, the command is registered
    code = ("import torch, splatdd, splatdd_ld3m\n"
            "from splatdd import registry\n"
            "c = registry.get_parameterization('ld3m')\n"
            "assert c.__module__.startswith('splatdd_ld3m') and registry.get_command('ld3m')\n"
            "assert str(splatdd_ld3m.__file__).startswith(%r)\n"
            "print('ok', torch.__version__)\n" % str(venv))
    r = _run([vpy, "-c", code], env=env, cwd=tmp_path)
    assert r.stdout.strip() == f"ok {__import__('torch').__version__}"
    r = _run([venv / "bin" / "splatdd", "convert-ldm", "--help"], env=env, cwd=tmp_path)
    assert "CompVis" in r.stdout
