"""The documented third-party example (examples/quickstart.py, shown in docs/gaussian.md) runs."""
import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_example_runs():
    mod = runpy.run_path(str(EXAMPLE))
    out = mod["main"](n=2, size=16, points=24, steps=25)
    assert out["mse"] < out["mse_start"]
    assert out["big_shape"] == (2, 3, 64, 64)
    assert out["raw_equal"] and out["reload_identical"]


def test_doc_shows_the_example_api():
    doc = Path(__file__).resolve().parents[3] / "docs" / "gaussian.md"
    if not doc.exists():      # docs are not shipped with an installed plugin
        return
    text = doc.read_text()
    for needle in ("examples/quickstart.py", "init_from_real", "optimizer_spec", "post_step",
                   "regularization", "decode(resolution="):
        assert needle in text
