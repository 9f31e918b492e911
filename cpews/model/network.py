"""CpewsNet: ViT backbone, final and auxiliary classifiers, LargeFOV decoder and the prototype pool buffers."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from cpews.model.backbone import ViTBackbone
from cpews.model.decoder import LargeFOVDecoder

POOL_KEYS = ("pos", "pos_n", "neg", "neg_n", "neg_ss", "neg_ss_n", "neg_score", "neg_img")


class CpewsOutput(NamedTuple):
    tokens: Tensor  # (B, D, h, w) final tokens F
    ism_tokens: Tensor  # (B, D, h, w) ISM-block tokens G
    logits: Tensor  # (B, C) final classifier on global max pooled F
    aux_logits: Tensor  # (B, C) auxiliary classifier on global max pooled G
    cams: Tensor  # (B, C, h, w) single-view CAM logits A = W * F (no ReLU)
    aux_cams: Tensor  # (B, C, h, w) A_aux = U * G
    seg_logits: Tensor  # (B, C + 1, h, w) decoder output


class CpewsNet(nn.Module):
    """The CPEWS network (method.md §1, §5.1).

    The prototype pool (§6.5) lives on the model as non-trainable buffers `pool_*`, shaped (C, K, D) etc.,
    so that it moves with the model and is saved in checkpoints; `pool_ready` says whether it was built.
    """

    def __init__(
        self,
        *,
        backbone: ViTBackbone,
        num_classes: int,
        num_prototypes: int,
        decoder_channels: int = 512,
        decoder_dilation: int = 5,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(dim, num_classes, 1, bias=False)
        self.aux_classifier = nn.Conv2d(dim, num_classes, 1, bias=False)
        self.decoder = LargeFOVDecoder(dim, num_classes, decoder_channels, decoder_dilation)
        shapes = pool_shapes(num_classes, num_prototypes, dim)
        for key, (shape, dtype) in shapes.items():
            fill = -1 if key == "neg_img" else 0
            self.register_buffer(f"pool_{key}", torch.full(shape, fill, dtype=dtype))
        self.register_buffer("pool_ready", torch.zeros((), dtype=torch.bool))

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward(self, images: Tensor) -> CpewsOutput:
        """Shapes: images (B, 3, H, W) -> CpewsOutput on the (H//P, W//P) token grid."""
        tokens, ism_tokens = self.backbone(images)
        cams = self.classifier(tokens)
        aux_cams = self.aux_classifier(ism_tokens)
        # Global max pooling then the linear head (§1.2) equals the head applied to max-pooled tokens.
        logits = self.classifier(tokens.amax(dim=(2, 3), keepdim=True)).flatten(1)
        aux_logits = self.aux_classifier(ism_tokens.amax(dim=(2, 3), keepdim=True)).flatten(1)
        seg_logits = self.decoder(tokens)
        return CpewsOutput(tokens, ism_tokens, logits, aux_logits, cams, aux_cams, seg_logits)

    def cam_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(cams, aux_cams) CAM logits (B, C, h, w) without the decoder: the multi-scale CAM forward."""
        tokens, ism_tokens = self.backbone(images)
        return self.classifier(tokens), self.aux_classifier(ism_tokens)

    def pool(self) -> dict[str, Tensor]:
        """The prototype pool buffers by their §6.5 key."""
        return {key: getattr(self, f"pool_{key}") for key in POOL_KEYS}

    def set_pool(self, pool: dict[str, Tensor]) -> None:
        """Copy a pool (§6.5 keys, CPU or device tensors) into the buffers and mark it ready."""
        for key in POOL_KEYS:
            buffer = getattr(self, f"pool_{key}")
            value = pool[key]
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(f"pool[{key!r}] has shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
            buffer.copy_(value.to(buffer.dtype))
        self.pool_ready.fill_(True)


def pool_shapes(num_classes: int, num_prototypes: int, dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the §6.5 pool tensors."""
    c, k, d = num_classes, num_prototypes, dim
    return {
        "pos": ((c, k, d), torch.float32),
        "pos_n": ((c,), torch.int64),
        "neg": ((c, k, d), torch.float32),
        "neg_n": ((c,), torch.int64),
        "neg_ss": ((c, k, d), torch.float32),
        "neg_ss_n": ((c,), torch.int64),
        "neg_score": ((c, k), torch.float32),
        "neg_img": ((c, k), torch.int64),
    }
