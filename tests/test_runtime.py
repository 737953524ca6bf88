"""splatdd.runtime: the one check of --threads and --device shared by every command."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from splatdd.runtime import resolve_device, set_threads


@pytest.mark.parametrize("bad", [-1, (os.cpu_count() or 1) + 1, 100000, 2.0, True, "2"])
def test_set_threads_refuses_out_of_range(bad):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="threads"):
        set_threads(bad)
    assert torch.get_num_threads() == before


def test_set_threads_sets_and_zero_keeps_default():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0", what="--device")


@pytest.mark.parametrize("cmd", [["buffer", "--experts", "1"], ["teacher"]])
def test_plugin_commands_bound_threads(cmd, tmp_path):
    """The plugins' commands share the core's bound: a clean error, never torch's crash."""
    proc = subprocess.run([sys.executable, "-m", "splatdd", *cmd, "--dataset", "fashion_mnist",
                           "--threads", "100000", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "splatdd: error: --threads must be between 1" in proc.stderr
    assert "Traceback" not in proc.stderr
