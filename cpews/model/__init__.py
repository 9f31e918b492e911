"""Model: timm ViT backbone with an intermediate token tap, classifiers, LargeFOV decoder."""

from __future__ import annotations

from cpews.config import SYNTHETIC_WEIGHTS, TrainConfig
from cpews.model.backbone import BackboneOutput, ViTBackbone
from cpews.model.decoder import LargeFOVDecoder
from cpews.model.network import POOL_KEYS, CpewsNet, CpewsOutput

__all__ = ["POOL_KEYS", "BackboneOutput", "CpewsNet", "CpewsOutput", "LargeFOVDecoder", "ViTBackbone", "build_model"]


def build_model(cfg: TrainConfig, num_classes: int, *, weights: str | None = None) -> CpewsNet:
    """Build the network from the config (the one place that maps cfg.model to kwargs).

    Args:
        weights: the backbone weights to load instead of `model.weights` ("" = none); `model.weights=synthetic`
            must be resolved to a file first (`cpews.training.pretrain.resolve_weights`).
    """
    m = cfg.model
    weights = m.weights if weights is None else weights
    if weights == SYNTHETIC_WEIGHTS:
        raise ValueError(
            "model.weights=synthetic names the pretrained synthetic backbone: resolve it to a file first "
            "(cpews.training.pretrain.resolve_weights; `cpews train` and sweeps do this)"
        )
    backbone = ViTBackbone(
        m.backbone,
        ism_depth=m.ism_depth,
        img_size=m.img_size,
        weights=weights,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        freeze_pos_embed=m.freeze_pos_embed,
    )
    return CpewsNet(
        backbone=backbone,
        num_classes=num_classes,
        num_prototypes=cfg.proto.num_prototypes,
        decoder_channels=m.decoder_channels,
        decoder_dilation=m.decoder_dilation,
    )
