"""The CPU worker pool (cpp/cpu_parallel.h) through its test hook ``_C._run_parallel_probe``:
every worker runs once; a worker that throws has its error raised on the caller after every
thread was joined (a joinable thread destroyed during unwinding would abort the process, so the
probes run in a child process and a regression shows as its exit status, not a dead test run)."""
import json
import subprocess
import sys

import pytest

from splatdd import _C

_PROBE = """
import json
from splatdd import _C
out = []
for n in range(1, 7):
    for throw in range(-1, n):
        try:
            out.append([n, throw, _C._run_parallel_probe(n, throw), None])
        except RuntimeError as exc:
            out.append([n, throw, None, str(exc)])
print(json.dumps(out))
"""


def test_every_worker_runs_and_errors_reach_the_caller():
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert len(rows) == sum(n + 1 for n in range(1, 7))
    for n, throw, count, error in rows:
        if throw < 0:
            assert (count, error) == (n, None)
        else:
            assert count is None and error == f"worker {throw} failed", (n, throw, error)


@pytest.mark.parametrize("n", [0, -1, 1025])
def test_probe_rejects_bad_worker_counts(n):
    with pytest.raises(ValueError, match="n must be in 1..1024"):
        _C._run_parallel_probe(n)
