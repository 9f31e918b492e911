"""timm ViT backbone that returns final (normed) and intermediate (ISM block) patch-token maps (method.md §1.1)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn

from cpews.torch_files import TorchFileError, load_torch_file


class BackboneOutput(NamedTuple):
    tokens: Tensor  # (B, D, h, w) final block patch tokens after the final LayerNorm (F)
    ism_tokens: Tensor  # (B, D, h, w) raw output of block `ism_depth` (G); == tokens when ism_depth == depth


class ViTBackbone(nn.Module):
    """A timm VisionTransformer with dynamic input size and an intermediate token tap.

    Args:
        name: timm model name (`vit_base_patch16_224`, `deit_base_patch16_224`, ...).
        ism_depth: 1-based index of the block whose raw output feeds the ISM/aux classifier.
        img_size: input size the positional embedding is learned for (interpolated on every forward).
        weights: "" for random init, "hub" for timm's pretrained weights, or a local state-dict path.
        patch_size, embed_dim, depth, num_heads: overrides of the architecture (0 keeps the model's own).
        freeze_pos_embed: keep the positional embedding fixed (ToCo).
    """

    def __init__(
        self,
        name: str,
        *,
        ism_depth: int,
        img_size: int = 224,
        weights: str = "",
        patch_size: int = 0,
        embed_dim: int = 0,
        depth: int = 0,
        num_heads: int = 0,
        freeze_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        overrides = {
            k: v
            for k, v in {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}.items()
            if v
        }
        try:
            self.vit = timm.create_model(
                name,
                pretrained=weights == "hub",
                num_classes=0,
                drop_rate=0.0,
                attn_drop_rate=0.0,
                drop_path_rate=0.0,
                dynamic_img_size=True,
                img_size=img_size,
                **overrides,
            )
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"model.backbone={name!r}: timm could not create it: {exc}") from exc
        if not hasattr(self.vit, "blocks") or not hasattr(self.vit, "patch_embed"):
            raise ValueError(f"model.backbone={name!r} is not a timm VisionTransformer")
        if weights and weights != "hub":
            load_backbone_weights(self.vit, weights)
        self.depth = len(self.vit.blocks)
        if not 1 <= ism_depth <= self.depth:
            raise ValueError(f"model.ism_depth={ism_depth} must lie in 1..{self.depth} (the backbone's depth)")
        self.ism_depth = ism_depth
        self.embed_dim = self.vit.embed_dim
        self.patch_size = self.vit.patch_embed.patch_size[0]
        if freeze_pos_embed and self.vit.pos_embed is not None:
            self.vit.pos_embed.requires_grad_(False)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of an input of size (height, width): the patch conv floors."""
        return height // self.patch_size, width // self.patch_size

    def forward(self, images: Tensor) -> BackboneOutput:
        """Shapes: images (B, 3, H, W) -> tokens, ism_tokens (B, D, H//P, W//P)."""
        vit = self.vit
        grid_h, grid_w = self.token_grid(*images.shape[-2:])
        # The patch conv drops a remainder (floor, as ToCo); timm asserts divisibility, so crop it first.
        images = images[..., : grid_h * self.patch_size, : grid_w * self.patch_size]
        x = vit.patch_embed(images)  # (B, h, w, D) with dynamic_img_size
        batch, grid_h, grid_w, _ = x.shape
        x = vit._pos_embed(x)
        x = vit.norm_pre(vit.patch_drop(x))
        prefix = vit.num_prefix_tokens
        ism = None
        for index, block in enumerate(vit.blocks, start=1):
            x = block(x)
            if index == self.ism_depth and index != self.depth:
                ism = x
        x = vit.norm(x)
        if ism is None:
            ism = x
        return BackboneOutput(_to_map(x[:, prefix:], grid_h, grid_w), _to_map(ism[:, prefix:], grid_h, grid_w))


def _to_map(tokens: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """(B, N, D) row-major tokens -> (B, D, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_h, grid_w)


def load_backbone_weights(vit: nn.Module, path: str | Path) -> None:
    """Load a local timm/ViT state dict (weights_only) into `vit`: a timm ImageNet file or a `cpews pretrain` file.

    `head.*` is dropped and a positional embedding of another grid is resampled; any other difference from the
    backbone's own tensors (another architecture: a wrong width, depth or patch size) is refused.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a loadable state dict, or tensors that do not fit; the message names the file and the
            tensors (name, file shape, model shape).
    """
    path = Path(path)
    where = f"model.weights={str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        state = load_torch_file(path)
    except TorchFileError as exc:
        raise ValueError(f"{where}: not a loadable state dict: {exc.reason}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{where}: expected a state dict of tensors, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = vit.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        if state["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=vit.patch_embed.grid_size, num_prefix_tokens=vit.num_prefix_tokens
            )
    problems = weight_mismatches(own, state)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise ValueError(f"{where}: the file does not fit the backbone (another architecture?): {shown}")
    vit.load_state_dict(state, strict=True)


def weight_mismatches(own: dict[str, Tensor], loaded: dict[str, Tensor]) -> list[str]:
    """What keeps `loaded` from loading into a module whose state dict is `own`, one line per tensor."""
    problems = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in loaded and loaded[k].shape != own[k].shape
    ]
    problems += [f"{k}: missing from the file" for k in own if k not in loaded]
    problems += [f"{k}: not in the model" for k in loaded if k not in own]
    return problems
