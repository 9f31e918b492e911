"""ToCo's LargeFOV segmentation decoder (method.md §5.1)."""

from __future__ import annotations

from torch import Tensor, nn


class LargeFOVDecoder(nn.Module):
    """Two dilated 3x3 convs + ReLU and a 1x1 classifier, no biases.

    Shapes: tokens (B, D, h, w) -> logits (B, num_classes + 1, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes + 1, 1, bias=False),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.layers(tokens)
