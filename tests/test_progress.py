"""splatdd.progress (plain lines with ETA when the stream is not a terminal) and splatdd.grids
(annotated grids), against hand-computed lines, sizes and the bare tensor grid."""
import io

import numpy as np
import pytest
import torch

from splatdd.distilled_file import make_grid
from splatdd.grids import annotated_grid, class_names, readable_scale, title_for
from splatdd.plugin_api import DatasetSpec
from splatdd.progress import PlainProgress, format_seconds, progress_bar


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_every_ten_percent_with_eta():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(100, desc="dm", unit="it", file=out, clock=clock, interval=1e9)
    for i in range(100):
        clock.t += 1.0                     # 1 s per step
        bar.set_postfix(loss=f"{i:d}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11                # the start, then 10 %, 20 %, ..., 100 %
    assert lines[0] == "dm: 0/100 it (0%), 0:00 elapsed, ETA ?"
    # after 50 steps of 1 s: 50 s elapsed, 50 left at 1 it/s
    assert lines[5] == "dm: 50/100 it (50%), 0:50 elapsed, ETA 0:50, 1 it/s, loss=49"
    assert lines[-1] == "dm: 100/100 it (100%), 1:40 elapsed, 1 it/s, loss=99"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_plain_time_based_lines_and_slow_steps():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(1000, desc="experts", unit="epoch", file=out, clock=clock, every=50,
                        interval=60.0)
    for _ in range(3):
        clock.t += 600.0                   # 10 minutes an epoch: a line at every update
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    # 3 epochs in 30 min: 997 left at 600 s each
    assert lines[-1] == ("experts: 3/1000 epoch (0%), 30:00 elapsed, "
                         f"ETA {format_seconds(997 * 600)}, 600 s/epoch")
    assert format_seconds(997 * 600) == "166:10:00"


def test_inner_bars_print_only_on_time_and_resume_counts_from_initial():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(10, desc="inner", file=out, clock=clock, leave=False, interval=5.0)
    for _ in range(10):
        clock.t += 1.0
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == ["inner: 5/10 it (50%), 0:05 elapsed, ETA 0:05, 1 it/s",
                                           "inner: 10/10 it (100%), 0:10 elapsed, 1 it/s"]
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(10, desc="r", file=out, clock=clock, initial=8, interval=1e9)
    clock.t += 4.0
    bar.update(1)                           # the rate counts this session's steps only
    assert out.getvalue().splitlines()[-1] == "r: 9/10 it (90%), 0:04 elapsed, ETA 0:04, 4 s/it"


def test_progress_bar_picks_by_stream(monkeypatch):
    monkeypatch.delenv("SPLATDD_PROGRESS", raising=False)
    assert isinstance(progress_bar(3, file=io.StringIO()), PlainProgress)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True
    from tqdm import tqdm
    bar = progress_bar(3, file=Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("SPLATDD_PROGRESS", "plain")
    assert isinstance(progress_bar(3, file=Tty()), PlainProgress)


@pytest.mark.parametrize("secs,text", [(0, "0:00"), (59.4, "0:59"), (61, "1:01"),
                                       (3725.2, "1:02:05"), (float("nan"), "?"), (-1, "?")])
def test_format_seconds(secs, text):
    assert format_seconds(secs) == text


# ---- grids ------------------------------------------------------------------------------------
def test_class_names_and_scale():
    fm = DatasetSpec("fashion_mnist", 1, 28, 28, 10)
    assert class_names(fm)[0] == "T-shirt/top" and class_names(fm)[9] == "Ankle boot"
    assert class_names(DatasetSpec("mine", 3, 8, 8, 3)) == ["0", "1", "2"]
    assert readable_scale(28, 28, 1, 10) == 3 and readable_scale(32, 32, 1, 10) == 2
    assert readable_scale(128, 128, 1, 10) == 1
    assert readable_scale(28, 28, 1, 1000) == 1     # 1000 columns x 84 px would pass 8000 px


def test_bare_annotated_grid_is_the_tensor_grid():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 5, 4, generator=gen)
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 2])
    img = annotated_grid(x, labels, scale=1, captions=False)
    ref = make_grid(x, labels=labels)                                  # (3, H, W) in [0, 1]
    ref_u8 = (ref * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(img), ref_u8)


def test_title_and_captions_sit_above_the_unchanged_grid():
    x = torch.zeros(4, 1, 28, 28)                 # black images: any dark pixel above is text
    labels = torch.tensor([0, 0, 1, 1])
    bare = np.asarray(annotated_grid(x, labels, scale=3, captions=False))
    img = np.asarray(annotated_grid(x, labels, scale=3, title="a long title " * 12,
                                     class_names=["a", "b"]))
    assert img.shape[0] > bare.shape[0]
    assert img.shape[1] == 640                    # a narrow grid is widened for the title
    band = img.shape[0] - bare.shape[0]
    assert np.array_equal(img[band:, :bare.shape[1]], bare)
    assert img[:band].min() < 128                 # text was drawn in the band
    assert (img[band:, bare.shape[1]:] == 255).all()


def test_title_for():
    assert title_for(parameterization="gaussian", algorithm="dm", dataset="fashion_mnist", ipc=1,
                     num_images=110, num_classes=10, height=28, width=28,
                     config={"gpc": 11, "points": 20}) == (
        "gaussian + dm, fashion_mnist (budget IPC 1): GPC 11 (110 images), 20 points per image, "
        "28x28 px")
    assert title_for(parameterization="pixel", num_images=15, num_classes=10, height=8,
                     width=6) == "pixel: GPC 1.5 (15 images), 8x6 px"
