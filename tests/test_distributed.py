"""Multi-process runs started with torch's own launcher (torchrun, gloo on the CPU) against the
single-process run as the oracle: same parameters after a few steps, a killed rank stops the job,
a killed job resumes and finishes."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from splatdd import distributed

pytest.importorskip("splatdd_pixel")
pytest.importorskip("splatdd_dm")
pytestmark = pytest.mark.slow


def _env(fmnist_root):
    return {**os.environ, "SPLATDD_FASHION_MNIST": str(fmnist_root), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "SPLATDD_DIST_TIMEOUT": "30"}


def _distill(args, fmnist_root, cwd, nproc=None, **kw):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "splatdd"] if nproc
                else [sys.executable, "-m", "splatdd"])
    return subprocess.Popen([*launcher, "distill", *args], env=_env(fmnist_root), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(path)


TINY = ["--algo", "dm", "--ipc", "1", "--algo-opt", "batch_real=4", "--algo-opt", "net_width=8",
        "--eval-runs", "0", "--no-progress", "--threads", "1"]


def test_two_processes_match_one(fmnist_root, tmp_path):
    """gaussian: its boundary regularisation must count once however many ranks add losses."""
    pytest.importorskip("splatdd_gaussian")
    param = "gaussian"
    extra = ["--param", param, "--iterations", "3"] + (
        ["--param-opt", "gpc=2", "--init-steps", "3"] if param == "gaussian" else [])
    one = _distill([*TINY, *extra, "--out", str(tmp_path / "one")], fmnist_root, tmp_path)
    out1, err1 = one.communicate(timeout=600)
    assert one.returncode == 0, err1
    two = _distill([*TINY, *extra, "--out", str(tmp_path / "two")], fmnist_root, tmp_path, nproc=2)
    out2, err2 = two.communicate(timeout=600)
    assert two.returncode == 0, err2
    assert "2 processes, backend gloo" in out2
    a, b = _tensors(tmp_path / "one/distilled.safetensors"), _tensors(
        tmp_path / "two/distilled.safetensors")
    init = _tensors(tmp_path / "one/initial.safetensors")
    for k in a:
        # fp32, summation order differs: within 1e-5 relative of the values' scale
        scale = a[k].float().abs().max().item()
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5 * scale, rtol=0), k
        if a[k].is_floating_point():
            assert not torch.equal(a[k], init[k]), k      # the steps did move the tensors
    h1 = (tmp_path / "one/history.json").read_text()
    assert (tmp_path / "two/history.json").is_file() and h1


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_killing_one_rank_stops_the_job(fmnist_root, tmp_path):
    job = _distill([*TINY, "--param", "pixel", "--iterations", "100000", "--checkpoint-every", "2",
                    "--out", str(tmp_path / "run")], fmnist_root, tmp_path, nproc=2,
                   start_new_session=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "checkpoint.pt").exists():       # both ranks are stepping
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    workers = _children(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("the job did not stop within 60 s of a rank's death")
    assert job.returncode != 0
    assert time.monotonic() - t0 < 60
    # the whole job was killed mid-run: the same command plus --resume finishes it
    step = torch.load(tmp_path / "run/checkpoint.pt", weights_only=False)["step"]
    again = _distill([*TINY, "--param", "pixel", "--iterations", str(step + 2), "--resume",
                      "--out", str(tmp_path / "run")], fmnist_root, tmp_path, nproc=2)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=False)["step"] == step + 2


def test_single_process_helpers_are_identities():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.owned(range(5)) == [0, 1, 2, 3, 4]
    assert distributed.gather("x") == ["x"] and distributed.all_reduce_sum(2.5) == 2.5
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.reduce_gradients([p]) == 0 and torch.equal(p.grad, torch.full((3,), 2.0))
    a = distributed.item_generator(7, 3)
    b = distributed.item_generator(7, 3)
    c = distributed.item_generator(7, 4)
    x, y, z = (torch.randint(0, 2**30, (4,), generator=g) for g in (a, b, c))
    assert torch.equal(x, y) and not torch.equal(x, z)
    with pytest.raises(ValueError, match="op must be one of"):
        distributed.reduce_gradients([p], op="max")


def test_tm_two_ranks_average_their_segment_losses(fmnist_root, tmp_path, monkeypatch):
    """The 2-process loss of step 1 is the mean of what rank 0 and rank 1 compute alone (each
    rank's segment reproduced in one process by giving the algorithm that rank)."""
    tm_buffer = pytest.importorskip("splatdd_tm.buffer")
    import json

    from splatdd.data import load_dataset
    from splatdd.experiment import ExperimentConfig
    from splatdd.initialise import init_from_real
    from splatdd.registry import default_registry
    monkeypatch.setenv("SPLATDD_FASHION_MNIST", str(fmnist_root))
    train, _ = load_dataset("fashion_mnist", progress=False)
    buf = tmp_path / "buffer"
    tm_buffer.train_experts(train, buf, experts=2, epochs=3, net_width=8, batch_size=16,
                            progress=False)
    opts = ["--algo-opt", f"buffer_dir={buf}", "--algo-opt", "syn_steps=2",
            "--algo-opt", "expert_epochs=1", "--algo-opt", "max_start_epoch=2",
            "--algo-opt", "batch_syn=5"]
    args = ["--param", "pixel", "--algo", "tm", "--ipc", "1", "--iterations", "1",
            "--eval-runs", "0", "--no-progress", "--threads", "1", *opts]
    two = _distill([*args, "--out", str(tmp_path / "two")], fmnist_root, tmp_path, nproc=2)
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err
    loss2 = json.loads((tmp_path / "two/history.json").read_text())["losses"][0]

    cfg = ExperimentConfig(parameterization="pixel", algorithm="tm", ipc=1)
    reg = default_registry()
    losses = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        gen = torch.Generator().manual_seed(cfg.seed)
        param = reg.get("parameterization", "pixel").build(train.spec, 1, generator=gen)
        init_from_real(param, train, gen)
        algo = reg.get("algorithm", "tm")(train, ipc=1, generator=torch.Generator().manual_seed(0),
                                          buffer_dir=str(buf), syn_steps=2, expert_epochs=1,
                                          max_start_epoch=2, batch_syn=5)
        losses.append(float(algo.loss(param, 0).detach()))
    assert losses[0] != losses[1]                      # the ranks unrolled different segments
    assert loss2 == pytest.approx(sum(losses) / 2, rel=1e-5)
