"""Image grids that say what they show: a title band and class names above the images.

:func:`splatdd.distilled_file.export_png` (``splatdd render``, the ``grid.png`` of a
``splatdd distill`` run) and ``splatdd fit --png`` draw their pictures with :func:`annotated_grid`;
:func:`readable_scale` upsamples tiny images (FashionMNIST's 28 px) by pixel replication until a
class name fits above them. Drawing uses Pillow only::

    from splatdd.grids import annotated_grid
    img = annotated_grid(images01, labels, title="pixel + dm, fashion_mnist, GPC 1, 28x28 px",
                         class_names=class_names(spec))
    img.save("grid.png")
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

__all__ = ["KNOWN_CLASS_NAMES", "class_names", "readable_scale", "grid_cells", "annotated_grid",
           "title_for", "READABLE_SIDE", "TITLE_WIDTH"]

#: Class names of the built-in datasets whose order is fixed by their files; any other dataset
#: gets the spec's ``class_names`` if it has them, else the class indices.
KNOWN_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}

#: Smallest image side (pixels, after upsampling) that :func:`readable_scale` aims for.
READABLE_SIDE = 64
_MAX_SIDE = 8000          # upsampling stops before a grid side passes this
#: A grid narrower than this is widened for its title (the images stay at the left).
TITLE_WIDTH = 640
_TITLE_PT, _CAPTION_PT, _MIN_PT = 13, 11, 8


def class_names(spec: Any) -> list[str]:
    """Names of ``spec``'s classes: its ``class_names`` attribute if present, else the built-in
    table (:data:`KNOWN_CLASS_NAMES`) for its dataset name, else ``"0"``, ``"1"``, ...::

        class_names(train.spec)[:2]          # ['T-shirt/top', 'Trouser'] for fashion_mnist
    """
    k = int(getattr(spec, "num_classes", 0) or 0)
    own = getattr(spec, "class_names", None)
    if own and len(own) == k:
        return [str(n) for n in own]
    known = KNOWN_CLASS_NAMES.get(str(getattr(spec, "name", "")))
    if known and len(known) == k:
        return list(known)
    return [str(i) for i in range(k)]


def readable_scale(height: int, width: int, rows: int, cols: int, padding: int = 2) -> int:
    """Integer zoom so that images are at least :data:`READABLE_SIDE` px (28 px -> 3x), bounded so
    the grid stays under 8000 px a side::

        readable_scale(28, 28, 1, 10)         # 3
    """
    s = max(1, math.ceil(READABLE_SIDE / max(1, min(height, width))))
    while s > 1 and max(rows * (height * s + padding), cols * (width * s + padding)) > _MAX_SIDE:
        s -= 1
    return s


def grid_cells(n: int, labels: torch.Tensor | None, nrow: int | None
               ) -> list[tuple[int, int, int]]:
    """``(row, column, image index)`` of each image: one column per class when ``nrow`` is None
    and ``labels`` are given (class ``c``'s images down its column), else ``nrow`` per row (default:
    near square), in order."""
    if nrow is None and labels is not None and n > 0:
        cells: list[tuple[int, int, int]] = []
        for col, k in enumerate(sorted(set(labels.tolist()))):
            idx = torch.nonzero(labels == k).flatten().tolist()
            cells += [(row, col, i) for row, i in enumerate(idx)]
        return cells
    per_row = nrow or max(1, math.ceil(math.sqrt(n)))
    return [(i // per_row, i % per_row, i) for i in range(n)]


def _font(size: int) -> Any:
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)     # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, ValueError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> float:
    try:
        return float(font.getlength(text))
    except AttributeError:                            # very old bitmap fonts
        return float(font.getsize(text)[0])


def _line_height(font: Any) -> int:
    box = font.getbbox("Ag/|")
    return int(box[3] - min(box[1], 0)) + 2


def _fit_caption(text: str, width: int) -> tuple[str, Any]:
    """The caption and a font it fits ``width`` px in: a smaller size, then truncation."""
    for pt in range(_CAPTION_PT, _MIN_PT - 1, -1):
        font = _font(pt)
        if _text_width(font, text) <= width:
            return text, font
    font = _font(_MIN_PT)
    while len(text) > 1 and _text_width(font, text + "..") > width:
        text = text[:-1]
    return text + "..", font


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """``text`` broken into lines of at most ``width`` px (explicit newlines kept)."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        words, line = para.split(" "), ""
        for w in words:
            trial = f"{line} {w}" if line else w
            if line and _text_width(font, trial) > width:
                lines.append(line)
                line = w
            else:
                line = trial
        lines.append(line)
    return lines


def annotated_grid(images: torch.Tensor, labels: torch.Tensor | None = None, *,
                   title: str | None = None, class_names: Sequence[str] | None = None,
                   nrow: int | None = None, padding: int = 2, scale: int | None = None,
                   captions: bool = True) -> Any:
    """A ``PIL.Image`` grid of ``images`` ``(N, C, H, W)`` in [0, 1] (C = 1: grey, 3: RGB, else
    the channel mean), upsampled ``scale`` times (None: :func:`readable_scale`), with ``title``
    wrapped in a band on top and, when ``captions`` and ``labels`` are given, each class's name
    (``class_names[label]``, else the label) above its column (one column per class) or above each
    image (``nrow`` layout). Without title and captions it is the plain grid of
    :func:`splatdd.distilled_file.make_grid` (white padding)::

        annotated_grid(torch.rand(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]), title="test").size
    """
    from PIL import Image, ImageDraw

    x = images.detach().to("cpu", torch.float32)
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        x, c = x.mean(1, keepdim=True), 1
    mode = "RGB" if c == 3 else "L"
    cells = grid_cells(n, labels, nrow)
    rows = 1 + max((r for r, _, _ in cells), default=0)
    cols = 1 + max((q for _, q, _ in cells), default=0)
    s = readable_scale(h, w, rows, cols, padding) if scale is None else max(1, int(scale))
    ch, cw = h * s, w * s
    names = list(class_names) if class_names is not None else None

    def name_of(i: int) -> str:
        k = int(labels[i])
        return names[k] if names is not None and 0 <= k < len(names) else str(k)

    per_class = nrow is None and labels is not None
    caption = captions and labels is not None and n > 0
    cap_font = _font(_CAPTION_PT)
    cap_h = _line_height(cap_font) if caption else 0
    # a caption band above the first row (class columns) or above every row (nrow layout)
    band = [cap_h if caption and (r == 0 or not per_class) else 0 for r in range(rows)]
    grid_w = cols * (cw + padding) + padding
    title_font = _font(_TITLE_PT)
    # a narrow grid is widened (up to TITLE_WIDTH px) so that the title needs fewer lines
    want = math.ceil(_text_width(title_font, title)) + 2 * padding if title else 0
    width = max(grid_w, min(want, TITLE_WIDTH))
    lines = _wrap(title, title_font, max(width - 2 * padding, 40)) if title else []
    title_h = len(lines) * _line_height(title_font) + (2 * padding if lines else 0)
    row_y = [title_h]
    for r in range(rows):
        row_y.append(row_y[-1] + band[r] + padding + ch)
    height = row_y[-1] + padding
    canvas = Image.new(mode, (width, height), 255 if mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if mode == "L" else (0, 0, 0)
    y = padding
    for line in lines:
        draw.text((padding, y), line, fill=ink, font=title_font)
        y += _line_height(title_font)
    u8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
    if s > 1:
        u8 = u8.repeat_interleave(s, 2).repeat_interleave(s, 3)
    arr = u8.permute(0, 2, 3, 1).numpy() if c == 3 else u8[:, 0].numpy()
    drawn_header: set[int] = set()
    for r, q, i in cells:
        x0 = padding + q * (cw + padding)
        y0 = row_y[r] + band[r] + padding
        canvas.paste(Image.fromarray(arr[i]), (x0, y0))
        if caption and band[r] and (not per_class or q not in drawn_header):
            drawn_header.add(q)
            text, font = _fit_caption(name_of(i), cw)
            tx = x0 + max(0, (cw - _text_width(font, text)) / 2)
            draw.text((tx, row_y[r] + padding // 2 + 1), text, fill=ink, font=font)
    return canvas


def title_for(*, parameterization: str | None, num_images: int, num_classes: int,
              height: int, width: int, config: dict[str, Any] | None = None,
              algorithm: str | None = None, dataset: str | None = None,
              ipc: int | None = None) -> str:
    """The grid title: what the images are, e.g. ``gaussian + dm, fashion_mnist (budget IPC 1):
    GPC 11 (110 images), 22 points per image, 28x28 px``. GPC is images per class; points are
    shown when the parameterization's config has ``points``::

        title_for(parameterization="pixel", num_images=10, num_classes=10, height=28, width=28)
    """
    head = " + ".join(p for p in (parameterization, algorithm) if p) or "images"
    if dataset:
        head += f", {dataset}"
    if ipc is not None:
        head += f" (budget IPC {ipc})"
    gpc = num_images / num_classes if num_classes else float(num_images)
    gpc_text = f"{gpc:g}" if gpc != int(gpc) else f"{int(gpc)}"
    parts = [f"GPC {gpc_text} ({num_images} images)"]
    points = (config or {}).get("points")
    if isinstance(points, int) and not isinstance(points, bool):
        parts.append(f"{points} points per image")
    parts.append(f"{height}x{width} px")
    return f"{head}: " + ", ".join(parts)
