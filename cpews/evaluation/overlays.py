"""Per-image overlay strips for a few fixed images (e.g. MLflow artifacts): CAM, pseudo label, segmentation.

One PNG per image, `<image id>.png`: panels [image | CAM | pseudo label | segmentation | ground truth] side
by side, each at the ground-truth (original image) size, separated by white bars of `SEPARATOR` pixels. The
label maps are those `evaluate` scores in training (`predict_label_maps`, single scale at `eval.size`).
"""

from __future__ import annotations

import operator
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cpews.config import TrainConfig
from cpews.evaluation.evaluate import predict_label_maps
from cpews.evaluation.infer import overlay_image, palette
from cpews.model import CpewsNet

SEPARATOR = 2  # white pixels between panels
IGNORE_VALUE = 255  # pseudo-label ignore, painted in its palette colour (white)
PANELS = ("image", "cam", "pseudo", "seg", "ground_truth")


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


def _panels(rgb: np.ndarray, maps: dict[str, np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """The five (H, W, 3) uint8 panels in `PANELS` order; rgb (H, W, 3), label maps and mask (H, W)."""
    return [
        rgb,
        np.array(overlay_image(rgb, maps["cam"])),
        _pseudo_overlay(rgb, maps["pseudo"]),
        np.array(overlay_image(rgb, maps["seg"])),
        np.array(overlay_image(rgb, mask)),
    ]


def _strip(panels: Sequence[np.ndarray], gap: int = SEPARATOR) -> np.ndarray:
    """N (H, W, 3) uint8 panels -> (H, N * W + (N - 1) * gap, 3) uint8, white between panels."""
    height, width = panels[0].shape[:2]
    out = np.full((height, len(panels) * width + (len(panels) - 1) * gap, 3), 255, dtype=np.uint8)
    for k, panel in enumerate(panels):
        left = k * (width + gap)
        out[:, left : left + width] = panel
    return out


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
    model: CpewsNet, sample: dict[str, Tensor | str], cfg: TrainConfig, device: torch.device | str = "cpu"
) -> np.ndarray:
    """The panel strip of one EvalDataset item -> (H0, 5 * W0 + 4 * SEPARATOR, 3) uint8, (H0, W0) = mask size.

    Runs the model as it is (set eval mode and no_grad around it, as `write_overlays` does).
    """
    _, (maps,) = predict_label_maps(model, [sample], cfg, device)
    mask = sample["mask"].cpu().numpy()
    rgb = _rgb_at(sample["rgb"], tuple(mask.shape))
    label_maps = {name: maps[name].cpu().numpy() for name in ("cam", "pseudo", "seg")}
    return _strip(_panels(rgb, label_maps, mask))


def write_overlays(
    model: CpewsNet,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    *,
    indices: Sequence[int],
    out_dir: Path,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Write each item's `overlay_strip` to out_dir/`<image id>.png`; returns the paths in `indices` order.

    The model runs in eval mode without gradients; its training mode is restored afterwards. Each file is
    written atomically (temporary file in out_dir + os.replace).

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
                _save_atomic(overlay_strip(model, sample, cfg, device), path)
                written.append(path)
    finally:
        model.train(was_training)
    return written
