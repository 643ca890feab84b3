"""PatchGAN discriminator of the OptVQ / taming-transformers objective.

The pix2pix `NLayerDiscriminator` (Isola et al., 2017) as taming-transformers and the original OptVQ use it: a stack
of 4x4 convolutions that maps an image to a grid of real/fake logits, one per overlapping patch (70x70 pixels for
3 layers). Layout of `main` (a Sequential, so the parameter names are the original's `loss.discriminator.main.*`
without the `loss.discriminator.` prefix), for `num_layers=3`, `base_channels=64`:

    0  Conv2d(3, 64, 4, stride 2, pad 1) + bias     1  LeakyReLU(0.2)
    2  Conv2d(64, 128, 4, stride 2, pad 1)          3  BatchNorm2d(128)    4  LeakyReLU(0.2)
    5  Conv2d(128, 256, 4, stride 2, pad 1)         6  BatchNorm2d(256)    7  LeakyReLU(0.2)
    8  Conv2d(256, 512, 4, stride 1, pad 1)         9  BatchNorm2d(512)   10  LeakyReLU(0.2)
    11 Conv2d(512, 1, 4, stride 1, pad 1) + bias

The convolutions followed by BatchNorm have no bias (BatchNorm's shift replaces it). The original uses plain
`nn.BatchNorm2d` (its `use_actnorm` option is off in every OptVQ config), converted to `SyncBatchNorm` by its
training script under data parallelism. A 256x256 image gives a 30x30 logit map, a 32x32 image a 2x2 one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

LEAKY_SLOPE = 0.2
KERNEL_SIZE = 4
PADDING = 1
MAX_CHANNEL_MULTIPLIER = 8  # pix2pix caps the width at 8x the base width


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator.

    Args:
        in_channels (`int`, *optional*, defaults to 3):
            Channels of the images (`disc_in_channels` in the original).
        base_channels (`int`, *optional*, defaults to 64):
            Width of the first convolution (`ndf`); layer n has `base_channels * min(2**n, 8)` channels.
        num_layers (`int`, *optional*, defaults to 3):
            Strided convolutions after the first one (`disc_num_layers`); each adds a BatchNorm and halves the
            resolution, except the last, which has stride 1.

    Call: `discriminator(images)` -> logits `(B, 1, h, w)`.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_layers = num_layers

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, KERNEL_SIZE, stride=2, padding=PADDING),
            nn.LeakyReLU(LEAKY_SLOPE),
        ]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out_channels = base_channels * min(2**n, MAX_CHANNEL_MULTIPLIER)
            stride = 2 if n < num_layers else 1  # the last block keeps the resolution
            layers += [
                nn.Conv2d(channels, out_channels, KERNEL_SIZE, stride=stride, padding=PADDING, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, KERNEL_SIZE, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The taming / pix2pix initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0.

        The biases of the first and last convolutions keep PyTorch's default initialisation, as in the original.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)
