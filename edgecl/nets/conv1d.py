"""A small 1-D conv net for multichannel sensor windows shaped [channels, length]."""

from __future__ import annotations

from torch import nn


def conv1d(input_shape: tuple[int, ...], channels: list[int], kernel_size: int
           ) -> tuple[nn.Module, int]:
    """Conv1d/ReLU/stride-2 per entry of `channels`, then global average pooling."""
    if len(input_shape) != 2:
        raise ValueError(f"conv1d needs sensor windows [C, L], got shape {list(input_shape)}")
    layers: list[nn.Module] = []
    width = input_shape[0]
    for c in channels:
        layers += [nn.Conv1d(width, c, kernel_size, stride=2, padding=kernel_size // 2), nn.ReLU()]
        width = c
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten()]
    return nn.Sequential(*layers), width
