"""Visual report of a stage: one PNG strip per sampled image and an `index.html` beside them.

Label maps are coloured with the VOC palette (255 = ignore shows as VOC's cream); every panel
is downscaled to at most `PANEL_MAX_HEIGHT` x `PANEL_MAX_WIDTH`, so COCO-sized (or hostile,
1 x 100000) images never make huge PNGs. `index.html` lists the strips, a class colour legend
and, when given, a metrics table. Image ids and class names are untrusted: the page escapes
every such string, and file names are built from a sanitised id.
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.io.codecs import voc_palette
from pipelines.io.manifest_format import FileEntry
from pipelines.io.schema import IGNORE_INDEX
from pipelines.io.storage import Location, write_bytes_atomic

PANEL_MAX_HEIGHT = 240  # pixels; panels are downscaled (never upscaled) to fit
PANEL_MAX_WIDTH = 480  # pixels; caps very wide images
TITLE_HEIGHT = 18  # pixels of the title strip above the panels
GAP = 4  # pixels between panels
REPORT_DIR = "report"
INDEX_FILE = "index.html"
_MAX_ID_CHARS = 64  # of an image id inside a file name
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
PANEL_TITLES = ("CAM argmax", "seed", "pseudo mask", "ground truth")


@dataclass(frozen=True)
class ReportRow:
    """One image of the report and the label maps to show beside it (None = panel absent)."""

    image_id: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    cam: np.ndarray | None = None  # H x W uint8 label map (CAM argmax, full class space)
    seed: np.ndarray | None = None  # H x W uint8 seed labels (255 = ignore)
    mask: np.ndarray | None = None  # H x W uint8 pseudo mask
    gt: np.ndarray | None = None  # H x W uint8 ground truth (255 = ignore)


def sample_ids(image_ids: Sequence[str], count: int, *, seed: int = 0) -> list[str]:
    """A sorted, deterministic sample of at most `count` distinct ids, independent of input
    order: ids ranked by SHA-256 of `seed` and the id (the same on any machine, unlike `hash`)."""
    if count <= 0:
        return []
    unique = sorted(set(image_ids))
    if len(unique) <= count:
        return unique
    ranked = sorted(unique, key=lambda i: hashlib.sha256(f"{seed}\x00{i}".encode()).digest())
    return sorted(ranked[:count])


def colorize(labels: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB view of an H x W uint8 label map in the VOC palette."""
    if labels.ndim != 2:
        raise ValueError(f"expected an H x W label map, got shape {labels.shape}")
    return _palette_lut()[np.asarray(labels, dtype=np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.55) -> np.ndarray:
    """H x W x 3 uint8: the label map's class colours at `alpha` opacity over the image
    (background and 255 = ignore left clear); a label map of another size is resized (nearest)
    to the image."""
    labels = np.asarray(labels, dtype=np.uint8)
    height, width = image.shape[:2]
    if labels.shape != (height, width):
        resized = Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST)
        labels = np.asarray(resized)
    colours = colorize(labels).astype(np.float32)
    weight = np.where((labels == IGNORE_INDEX) | (labels == 0), 0.0, alpha)[..., None]
    return (image * (1 - weight) + colours * weight).round().astype(np.uint8)


def render_row(row: ReportRow, *, alpha: float | None = None, titles: Sequence[str] = ()) -> bytes:
    """One PNG strip: titled panels image | CAM | seed | pseudo mask | GT (those present), a
    label map of another size than the image at its own size (scaled like the image). With
    `alpha`, each label map is drawn over the image (`overlay`). `titles` replace the default
    panel titles after "image", in order (e.g. with a per-image IoU).

    Raises:
        ValueError: the image is not H x W x 3 uint8, or a label map is not 2-D.
    """
    image = np.asarray(row.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
    panels: list[tuple[str, Image.Image]] = [("image", _scaled(image, Image.Resampling.BILINEAR))]
    present = [
        (title, labels)
        for title, labels in zip(PANEL_TITLES, (row.cam, row.seed, row.mask, row.gt), strict=True)
        if labels is not None
    ]
    for index, (title, labels) in enumerate(present):
        title = titles[index] if index < len(titles) else title
        if alpha is None:
            panels.append((title, _scaled(colorize(np.asarray(labels)), Image.Resampling.NEAREST)))
        else:
            blended = overlay(image, labels, alpha=alpha)
            panels.append((title, _scaled(blended, Image.Resampling.BILINEAR)))
    width = sum(p.width for _, p in panels) + GAP * (len(panels) - 1)
    height = TITLE_HEIGHT + max(p.height for _, p in panels)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    x = 0
    for title, panel in panels:
        canvas.paste(panel, (x, TITLE_HEIGHT))
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
        x += panel.width + GAP
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def row_file_name(index: int, image_id: str) -> str:
    """`<index>-<sanitised id>.png`: unique by index, safe whatever the id holds."""
    safe = _UNSAFE_NAME_CHARS.sub("_", str(image_id))[:_MAX_ID_CHARS] or "image"
    return f"{index:04d}-{safe}.png"


def write_report(
    output: Location,
    rows: Sequence[ReportRow],
    *,
    class_names: Sequence[str],
    title: str,
    metrics: Mapping[str, Any] | None = None,
) -> list[FileEntry]:
    """Writes `report/<n>-<id>.png` per row (in order) and `report/index.html` below `output`;
    `metrics`, when given, as a table (nested mappings flattened to dotted keys).

    Returns:
        The `FileEntry` of every file written (PNGs, then index.html), for the manifest.
    """
    entries: list[FileEntry] = []
    items: list[tuple[str, str]] = []  # (image id, file name)
    for index, row in enumerate(rows):
        name = row_file_name(index, row.image_id)
        entries.append(write_file(output, f"{REPORT_DIR}/{name}", render_row(row)))
        items.append((str(row.image_id), name))
    page = render_index(items, class_names=class_names, title=title, metrics=metrics)
    entries.append(write_file(output, f"{REPORT_DIR}/{INDEX_FILE}", page.encode()))
    return entries


def write_file(output: Location, rel: str, data: bytes) -> FileEntry:
    """Writes one report file atomically; its manifest entry."""
    write_bytes_atomic(output, rel, data)
    return FileEntry(path=rel, rows=None, bytes=len(data))


def render_index(
    items: Sequence[tuple[str, str]],
    *,
    class_names: Sequence[str],
    title: str,
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """The report page: heading, metrics table, class legend and one figure per (id, file)."""
    esc = html.escape
    parts = [page_head(title), f"<h1>{esc(title)}</h1>"]
    if metrics is not None:
        rows = [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _flatten(metrics)]
        parts += ["<h2>Metrics</h2>", "<table><tr><th>metric</th><th>value</th></tr>", *rows]
        parts.append("</table>")
    parts.append("<h2>Classes</h2><ul>")
    shown = list(enumerate(class_names))[:IGNORE_INDEX] + [(IGNORE_INDEX, "ignore")]
    parts += [f"<li>{swatch(class_id, name)}</li>" for class_id, name in shown]
    parts.append(f"</ul>\n<h2>Images ({len(items)})</h2>")
    for image_id, name in items:
        href = esc(urllib.parse.quote(name), quote=True)
        parts.append(
            f'<figure><figcaption>{esc(image_id)}</figcaption><a href="{href}">'
            f'<img src="{href}" alt="{esc(image_id, quote=True)}" loading="lazy"></a></figure>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


STYLE = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
    ".sw{display:inline-block;width:1em;height:1em;border:1px solid #888;"
    "vertical-align:middle;margin-right:4px}figure{margin:0 0 1em 0}"
    "img{max-width:100%}.up{background:#d4f4d4}.down{background:#f8d0d0}"
    "td.num{text-align:right}"
)


def page_head(title: str) -> str:
    """`<!DOCTYPE html>` up to the opened `<body>`, with the reports' one stylesheet inline."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head><body>"
    )


def swatch(class_id: int, name: str) -> str:
    """A legend item: the class colour and `id: name` (escaped)."""
    r, g, b = (int(c) for c in _palette_lut()[class_id])
    return (
        f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'
        f"{class_id}: {html.escape(str(name))}"
    )


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if not isinstance(value, Mapping):
        return [(prefix, _format_value(value))]
    return [
        row for k, v in value.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    ]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _scaled(rgb: np.ndarray, resample: Image.Resampling) -> Image.Image:
    """An RGB panel downscaled to fit PANEL_MAX_HEIGHT x PANEL_MAX_WIDTH (aspect kept)."""
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"empty panel of shape {rgb.shape}")
    image = Image.fromarray(np.ascontiguousarray(rgb))
    scale = min(1.0, PANEL_MAX_HEIGHT / height, PANEL_MAX_WIDTH / width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, resample)
    return image


@cache
def _palette_lut() -> np.ndarray:
    return np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)
    except (OSError, TypeError):  # Pillow without FreeType
        return ImageFont.load_default()
