"""A small 1-D conv net for multichannel sensor windows shaped [channels, length]."""

from __future__ import annotations

from torch import nn

from edgecl.config import ConfigError


def check_window_shape(input_shape: tuple[int, ...]) -> None:
    """Sensor windows are [channels, steps]: refuse a missing channel axis and the transposed
    [steps, channels] layout (more channels than steps), which would learn chance silently."""
    shape = list(input_shape)
    if len(shape) == 1:
        raise ConfigError(
            f"net conv1d: samples of shape {shape} have no channel axis; windows are "
            f"[channels, steps]: for one channel use x[:, None, :] (shape [n, 1, {shape[0]}])")
    if len(shape) != 2:
        raise ConfigError(f"net conv1d: needs sensor windows [channels, steps], got samples of "
                          f"shape {shape}")
    channels, steps = shape
    if channels > steps:
        raise ConfigError(
            f"net conv1d: samples of shape {shape} have more channels ({channels}) than steps "
            f"({steps}); windows are [channels, steps]: if your array is [n, steps, channels], "
            "pass x.transpose(0, 2, 1)")


def conv1d(input_shape: tuple[int, ...], channels: list[int], kernel_size: int
           ) -> tuple[nn.Module, int]:
    """Conv1d/ReLU/stride-2 per entry of `channels`, then global average pooling."""
    check_window_shape(input_shape)
    layers: list[nn.Module] = []
    width = input_shape[0]
    for c in channels:
        layers += [nn.Conv1d(width, c, kernel_size, stride=2, padding=kernel_size // 2), nn.ReLU()]
        width = c
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten()]
    return nn.Sequential(*layers), width
