"""Per-image overlay strips for a few fixed images (e.g. MLflow artifacts): CAM, pseudo label, segmentation.

One PNG per image, `<image id>.png`, made to be read in a browser:

    [      image      |       CAM       |  pseudo label   |  segmentation   |  ground truth   ]   titles
    [ panel           | panel           | panel           | panel           | panel           ]
    [ ■ ball  ■ boat  □ ignore                                                                ]   legend

Each panel is the ground-truth (original image) size scaled up by an integer factor (nearest neighbour, so
label pixels stay sharp) until its longer side is at least `MIN_PANEL_SIZE`; panels are separated by white bars
of `SEPARATOR` pixels. Above each panel is its title; below the panels a legend shows a VOC-palette swatch and
the name of each foreground class present in any of the label maps (and "ignore", white, when the pseudo label
has ignore pixels). The label maps are those `evaluate` scores in training (`predict_label_maps`, single scale
at `eval.size`). Text uses PIL's default font (`ImageFont.load_default`), nothing is downloaded.
"""

from __future__ import annotations

import functools
import operator
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from cpews.config import TrainConfig
from cpews.data.classes import class_table
from cpews.evaluation.evaluate import predict_label_maps
from cpews.evaluation.infer import overlay_image, palette
from cpews.model import CpewsNet

SEPARATOR = 4  # white pixels between panels (after scaling)
IGNORE_VALUE = 255  # pseudo-label ignore, painted in its palette colour (white)
PANELS = ("image", "cam", "pseudo", "seg", "ground_truth")
PANEL_TITLES = ("image", "CAM", "pseudo label", "segmentation", "ground truth")  # in `PANELS` order
MIN_PANEL_SIZE = 192  # panels are scaled up by the smallest integer factor that makes the longer side this long
TITLE_HEIGHT = 20  # the white band above the panels that holds their titles
LEGEND_ROW_HEIGHT = 20  # one row of legend entries below the panels
SWATCH = 12  # legend colour squares (pixels), with a dark grey border
TEXT_GAP = 4  # pixels between a swatch and its name
FONT_SIZE = 12  # of PIL's default font where it is scalable (FreeType); the bitmap fallback has one size
TEXT = (0, 0, 0)
BORDER = (96, 96, 96)
WHITE = (255, 255, 255)


def _check_indices(indices: Sequence[int], length: int) -> list[int]:
    """The indices as ints, each in 0..length-1; IndexError naming the first one that is not."""
    checked = [operator.index(i) for i in indices]
    for index in checked:
        if not 0 <= index < length:
            raise IndexError(f"overlay index {index} is out of range for a dataset of {length} images")
    return checked


def _rgb_at(rgb: Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 image -> (*size, 3) uint8, bilinear when the sizes differ (EvalDataset `resize`)."""
    array = np.asarray(rgb.cpu() if isinstance(rgb, Tensor) else rgb, dtype=np.uint8)
    if array.shape[:2] == size:
        return array
    return np.array(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))


def _pseudo_overlay(rgb: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """Overlay of a pseudo label (H, W) in 0..C and 255 -> (H, W, 3) uint8; ignore pixels opaque white.

    `overlay_image` leaves 255 unblended (the image shows through), which hides the ignore band, so it is
    painted with the palette's ignore colour.
    """
    out = np.array(overlay_image(rgb, pseudo))
    out[pseudo == IGNORE_VALUE] = palette(256)[IGNORE_VALUE]
    return out


def _panels(rgb: np.ndarray, maps: Mapping[str, np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """The five (H, W, 3) uint8 panels in `PANELS` order; rgb (H, W, 3), label maps and mask (H, W)."""
    return [
        rgb,
        np.array(overlay_image(rgb, maps["cam"])),
        _pseudo_overlay(rgb, maps["pseudo"]),
        np.array(overlay_image(rgb, maps["seg"])),
        np.array(overlay_image(rgb, mask)),
    ]


def scale_factor(height: int, width: int) -> int:
    """The integer upscaling factor of an (height, width) panel: the smallest making max(H, W) >= MIN_PANEL_SIZE."""
    return max(1, -(-MIN_PANEL_SIZE // max(height, width, 1)))


def _upscale(panel: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, 3) -> (factor * H, factor * W, 3), each pixel repeated (nearest neighbour)."""
    return np.repeat(np.repeat(panel, factor, axis=0), factor, axis=1)


def _strip(panels: Sequence[np.ndarray], gap: int = SEPARATOR) -> np.ndarray:
    """N (H, W, 3) uint8 panels -> (H, N * W + (N - 1) * gap, 3) uint8, white between panels."""
    height, width = panels[0].shape[:2]
    out = np.full((height, len(panels) * width + (len(panels) - 1) * gap, 3), 255, dtype=np.uint8)
    for k, panel in enumerate(panels):
        left = k * (width + gap)
        out[:, left : left + width] = panel
    return out


def legend_entries(
    maps: Mapping[str, np.ndarray], mask: np.ndarray, class_names: Sequence[str]
) -> list[tuple[tuple[int, int, int], str]]:
    """(VOC colour, name) of each foreground label value in the CAM, pseudo label, segmentation or mask, in
    label order, then ("ignore", white) when the pseudo label has ignore pixels. Background is left out: the
    overlays do not colour it. A value without a name is called `class <value>`."""
    values: set[int] = set()
    for labels in (maps["cam"], maps["pseudo"], maps["seg"], mask):
        values.update(int(v) for v in np.unique(np.asarray(labels)))
    colours = palette(256)
    entries = [
        (tuple(int(c) for c in colours[v]), class_names[v] if v < len(class_names) else f"class {v}")
        for v in sorted(values)
        if 0 < v < IGNORE_VALUE
    ]
    if (np.asarray(maps["pseudo"]) == IGNORE_VALUE).any():
        entries.append((tuple(int(c) for c in colours[IGNORE_VALUE]), "ignore"))
    return entries


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font: scalable where FreeType is available, its bitmap font otherwise (nothing downloaded)."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ValueError, OSError):  # older Pillow or no FreeType: the one-size bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    """The width of `text` in `_font()`."""
    left, _, right, _ = draw.textbbox((0, 0), text, font=_font())
    return right - left


def _draw_text(draw: ImageDraw.ImageDraw, left: int, middle: int, text: str) -> None:
    """Draw `text` from x = `left`, its line (the ink box of "Agy", so all texts share a baseline) centred
    vertically on y = `middle`. Positions come from the font's boxes: no anchors (the bitmap font has none)."""
    _, top, _, bottom = draw.textbbox((0, 0), "Agy", font=_font())
    text_left = draw.textbbox((0, 0), text, font=_font())[0]
    draw.text((left - text_left, middle - (bottom - top) // 2 - top), text, fill=TEXT, font=_font())


def _legend_rows(entries: Sequence[tuple[tuple[int, int, int], str]], width: int) -> list[list[int]]:
    """The entries (as indices) laid out in rows no wider than `width`; at least one (possibly empty) row."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[list[int]] = [[]]
    used = SEPARATOR
    for k, (_, name) in enumerate(entries):
        needed = _legend_entry_width(draw, name)
        if rows[-1] and used + needed > width:
            rows.append([])
            used = SEPARATOR
        rows[-1].append(k)
        used += needed
    return rows


def _legend_entry_width(draw: ImageDraw.ImageDraw, name: str) -> int:
    """Swatch, gap, name and the space before the next entry."""
    return SWATCH + TEXT_GAP + _text_width(draw, name) + 3 * SWATCH // 2


def _draw_titles(draw: ImageDraw.ImageDraw, panel_width: int) -> None:
    """`PANEL_TITLES`, each centred over its panel in the top `TITLE_HEIGHT` band."""
    for k, title in enumerate(PANEL_TITLES):
        left = k * (panel_width + SEPARATOR) + max(0, (panel_width - _text_width(draw, title)) // 2)
        _draw_text(draw, left, TITLE_HEIGHT // 2, title)


def _draw_legend(
    draw: ImageDraw.ImageDraw, entries: Sequence[tuple[tuple[int, int, int], str]], rows: list[list[int]], top: int
) -> None:
    """Swatch and name of each entry, row by row from y = `top` (or a sentence when there is none)."""
    if not entries:
        _draw_text(draw, SEPARATOR, top + LEGEND_ROW_HEIGHT // 2, "no foreground class in these label maps")
    for row, indices in enumerate(rows):
        left, middle = SEPARATOR, top + row * LEGEND_ROW_HEIGHT + LEGEND_ROW_HEIGHT // 2
        for index in indices:
            colour, name = entries[index]
            box = (left, middle - SWATCH // 2, left + SWATCH - 1, middle - SWATCH // 2 + SWATCH - 1)
            draw.rectangle(box, fill=colour, outline=BORDER)
            _draw_text(draw, left + SWATCH + TEXT_GAP, middle, name)
            left += _legend_entry_width(draw, name)


def compose_overlay(
    rgb: np.ndarray, maps: Mapping[str, np.ndarray], mask: np.ndarray, class_names: Sequence[str]
) -> np.ndarray:
    """The labelled overlay of one image (see the module docstring) -> (TITLE_HEIGHT + s * H + rows *
    LEGEND_ROW_HEIGHT, 5 * s * W + 4 * SEPARATOR, 3) uint8, s = `scale_factor(H, W)`.

    Args:
        rgb: (H, W, 3) uint8 image at the mask size.
        maps: "cam", "pseudo" and "seg" (H, W) label maps (0..C, pseudo also 255 = ignore).
        mask: (H, W) ground-truth labels (255 = ignore).
        class_names: C + 1 names indexed by label value (names[0] = background).
    """
    factor = scale_factor(*mask.shape)
    panels = [_upscale(panel, factor) for panel in _panels(rgb, maps, mask)]
    strip = _strip(panels)
    width, panel_width = strip.shape[1], panels[0].shape[1]
    entries = legend_entries(maps, mask, class_names)
    rows = _legend_rows(entries, width)
    canvas = Image.new("RGB", (width, TITLE_HEIGHT + strip.shape[0] + len(rows) * LEGEND_ROW_HEIGHT), WHITE)
    canvas.paste(Image.fromarray(strip), (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    _draw_titles(draw, panel_width)
    _draw_legend(draw, entries, rows, TITLE_HEIGHT + strip.shape[0])
    return np.array(canvas)


def _save_atomic(image: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 array as PNG via a temporary file in the same folder and os.replace."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            Image.fromarray(image).save(file, format="PNG")
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; artifacts are ordinary readable files
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def overlay_strip(
    model: CpewsNet,
    sample: dict[str, Tensor | str],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    *,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """The labelled overlay (`compose_overlay`) of one EvalDataset item, at the mask (original image) size.

    Runs the model as it is (set eval mode and no_grad around it, as `write_overlays` does). `class_names`
    (label value -> name) defaults to the class table of `cfg.data.dataset`.
    """
    _, (maps,) = predict_label_maps(model, [sample], cfg, device)
    mask = sample["mask"].cpu().numpy()
    rgb = _rgb_at(sample["rgb"], tuple(mask.shape))
    label_maps = {name: maps[name].cpu().numpy() for name in ("cam", "pseudo", "seg")}
    names = class_table(cfg.data.dataset).names if class_names is None else class_names
    return compose_overlay(rgb, label_maps, mask, names)


def write_overlays(
    model: CpewsNet,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    *,
    indices: Sequence[int],
    out_dir: Path,
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write each item's `overlay_strip` to out_dir/`<image id>.png`; returns the paths in `indices` order.

    The model runs in eval mode without gradients; its training mode is restored afterwards. Each file is
    written atomically (temporary file in out_dir + os.replace). `class_names` (label value -> name, for the
    legend) defaults to the class table of `cfg.data.dataset`.

    Raises:
        IndexError: an index outside 0..len(dataset)-1 (checked before anything is written).
    """
    checked = _check_indices(indices, len(dataset))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    written = []
    try:
        with torch.no_grad():
            for index in checked:
                sample = dataset[index]
                path = out_dir / f"{sample['name']}.png"
                _save_atomic(overlay_strip(model, sample, cfg, device, class_names=class_names), path)
                written.append(path)
    finally:
        model.train(was_training)
    return written
