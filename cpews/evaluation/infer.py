"""Loading a trained model and segmenting images (method.md §9.3, optional dense CRF §9.4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from cpews.config import TrainConfig
from cpews.crf import dense_crf
from cpews.evaluation.evaluate import segmentation_probabilities
from cpews.model import CpewsNet, build_model
from cpews.training.checkpoint import load_checkpoint


class LoadedModel(NamedTuple):
    model: CpewsNet  # in eval mode, on the requested device
    cfg: TrainConfig
    class_names: list[str]
    iteration: int


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the network from a checkpoint's flat config and load its weights (pool buffers included)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.cfg
    names = ckpt.class_names
    # The backbone weights come from the checkpoint: never re-read the original pretrained file or hub.
    cfg = TrainConfig.from_flat_dict({"model.weights": ""}, base=cfg)
    model = build_model(cfg, num_classes=len(names) - 1)
    model.load_state_dict(ckpt.model)
    return LoadedModel(model.to(device).eval(), ckpt.cfg, names, ckpt.iteration)


def palette(num_labels: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), (num_labels, 3) uint8; 255 is white."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[label] = (r, g, b)
    colours[255] = (255, 255, 255)
    return colours


def label_image(labels: np.ndarray) -> Image.Image:
    """(H, W) label values -> a palette PNG image (VOC colours, values preserved)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(palette(256).reshape(-1).tolist())
    return image


def overlay_image(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend label colours over the image where the label is foreground. rgb (H, W, 3) uint8."""
    colours = palette(256)[labels.astype(np.uint8)].astype(np.float32)
    fg = ((labels > 0) & (labels < 255))[..., None]
    blended = np.where(fg, (1 - alpha) * rgb.astype(np.float32) + alpha * colours, rgb.astype(np.float32))
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


@torch.no_grad()
def segment_image(
    loaded: LoadedModel, rgb: np.ndarray, *, crf: bool = False, scales: Sequence[float] | None = None
) -> np.ndarray:
    """Segment one RGB uint8 image (H, W, 3) -> (H, W) uint8 label values (0 = background)."""
    cfg = loaded.cfg
    device = next(loaded.model.parameters()).device
    mean = torch.tensor(cfg.data.norm_mean, device=device)[:, None, None]
    std = torch.tensor(cfg.data.norm_std, device=device)[:, None, None]
    image = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1).float() / 255.0
    image = ((image - mean) / std)[None]
    size = tuple(rgb.shape[:2])
    probs = segmentation_probabilities(loaded.model, image, scales or cfg.eval.test_scales, size)
    if crf:
        e = cfg.eval
        refined = dense_crf(
            np.ascontiguousarray(rgb), probs.cpu().numpy(), iters=e.crf_iters, gauss_sxy=e.crf_gauss_sxy,
            gauss_compat=e.crf_gauss_compat, bilateral_sxy=e.crf_bilateral_sxy,
            bilateral_srgb=e.crf_bilateral_srgb, bilateral_compat=e.crf_bilateral_compat,
        )
        return refined.argmax(axis=0).astype(np.uint8)
    return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8, with an error that names the file."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy (pydensecrf needs one)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc


def infer_files(
    loaded: LoadedModel, paths: Sequence[str | Path], out_dir: str | Path, *, crf: bool = False
) -> list[tuple[Path, Path]]:
    """Write `<stem>.png` (label values, VOC palette) and `<stem>_overlay.png` per image into out_dir."""
    images = [(Path(p), read_rgb(p)) for p in paths]  # read all first: a bad file fails before any output
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, rgb in images:
        labels = segment_image(loaded, rgb, crf=crf)
        label_path, overlay_path = out_dir / f"{path.stem}.png", out_dir / f"{path.stem}_overlay.png"
        label_image(labels).save(label_path)
        overlay_image(rgb, labels).save(overlay_path)
        written.append((label_path, overlay_path))
    return written
