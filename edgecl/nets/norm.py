"""Per-channel input standardisation fitted from the stream, so a model takes raw sensor values.

`InputNorm` sits first in the body. While it is not frozen, the learner feeds it every training
batch (`update`): float64 sums per channel (axis 0 of a sample: a sensor window's channel, an
image's colour plane, a vector's feature). The learner freezes it when the first task ends;
from then on it is a fixed affine map, part of the weights: saved in checkpoints, exported into
the ONNX graph. A channel that never varied (a dead sensor) is centred but not scaled.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_STD = 1e-6


class InputNorm(nn.Module):
    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        channels = input_shape[0]
        self.view = (1, channels) + (1,) * (len(input_shape) - 1)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("sum_sq", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("inv_std", torch.ones(channels))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch [b, C, ...] to the estimate (the caller knows it is not frozen: reading
        the flag here would sync a GPU every step)."""
        per_channel = x.detach().to(torch.float64).transpose(0, 1).reshape(self.view[1], -1)
        self.count += per_channel.shape[1]
        self.sum += per_channel.sum(1)
        self.sum_sq += per_channel.square().sum(1)
        mean = self.sum / self.count
        std = (self.sum_sq / self.count - mean.square()).clamp_min(0).sqrt()
        self.mean.copy_(mean)
        self.inv_std.copy_(torch.where(std > MIN_STD, 1 / std, torch.ones_like(std)))

    def freeze(self) -> None:
        self.frozen.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(self.view)) * self.inv_std.view(self.view)

    def describe(self) -> str:
        state = "frozen" if self.frozen else "still fitting"
        mean = ", ".join(f"{v:.6g}" for v in self.mean.tolist())
        std = ", ".join(f"{1 / v:.6g}" for v in self.inv_std.tolist())
        return (f"per-channel (axis 0) standardisation inside the model, fitted from "
                f"{int(self.count)} values per channel of the stream's first task ({state}): "
                f"mean [{mean}], std [{std}]; send raw values")
