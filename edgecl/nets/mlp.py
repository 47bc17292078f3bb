"""Multi-layer perceptron body (GEM's MNIST net: 2 hidden layers of 100 ReLU units)."""

from __future__ import annotations

import math

from torch import nn


def mlp(input_shape: tuple[int, ...], hidden: list[int]) -> tuple[nn.Module, int]:
    """Flatten + Linear/ReLU per hidden width; returns the body and its feature width."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width
