"""The documented example (examples/quickstart.py, walked through in docs/own_code.md and
docs/gaussian.md) runs, and does what the docs say."""
import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
DOCS = Path(__file__).resolve().parents[3] / "docs"


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE))


def test_quickstart_at_fashion_mnist_ipc1(example, tmp_path):
    """IPC 1 on FashionMNIST: 11 Gaussian images per class of 20 Gaussians (7 bf16 values), 110
    images in all, within the 10 x 784 x 4 bytes of one fp32 image per class."""
    out = example["main"](init_steps=8, steps=12, out_dir=str(tmp_path))
    assert (out["gpc"], out["points"], out["num_images"]) == (11, 20, 110)
    assert out["bytes"] == 110 * 20 * 7 * 2 <= out["budget"] == 10 * 784 * 4
    assert out["mse"] < out["mse_start"]
    assert sum(out["losses"][-3:]) < sum(out["losses"][:3])
    assert out["big_shape"] == (110, 1, 112, 112)
    assert out["raw_equal"] and out["reload_identical"]
    assert (tmp_path / "distilled.safetensors").is_file()


def test_docs_show_the_example_api():
    for name in ("gaussian.md", "own_code.md"):
        doc = DOCS / name
        if not doc.exists():      # docs are not shipped with an installed plugin
            pytest.skip("docs/ not present (installed plugin)")
        text = doc.read_text()
        for needle in ("examples/quickstart.py", "init_from_real", "optimizer_spec", "post_step",
                       "gpc", "build(spec, ipc)", "distilled_file.save"):
            assert needle in text, (name, needle)
