"""Backbones (MLP, GEM's reduced ResNet-18, 1-D sensor conv net) and the multi-head `TaskNet`."""

from __future__ import annotations

import torch
from torch import nn

from edgecl.config import Conv1dConfig, MLPConfig, NetConfig, ResNetConfig
from edgecl.nets.conv1d import check_window_shape, conv1d
from edgecl.nets.mlp import mlp
from edgecl.nets.norm import InputNorm
from edgecl.nets.resnet import resnet18


def _scaled(width: int, scale: float) -> int:
    return max(1, round(width * scale))


def build_body(cfg: NetConfig, input_shape: tuple[int, ...], width_scale: float = 1.0,
               normalize: str = "none") -> tuple[nn.Module, int]:
    """The feature extractor named by `cfg` and its output width; `width_scale` shrinks it;
    `normalize="channel"` puts an `InputNorm` in front."""
    body, features = _backbone(cfg, input_shape, width_scale)
    if normalize == "channel":
        body = nn.Sequential(InputNorm(input_shape), body)
    return body, features


def check_input_shape(cfg: NetConfig, input_shape: tuple[int, ...]) -> None:
    """Refuse (ConfigError) a sample shape the net cannot sensibly read, before any training."""
    if isinstance(cfg, Conv1dConfig):
        check_window_shape(input_shape)


def _backbone(cfg: NetConfig, input_shape: tuple[int, ...], width_scale: float
              ) -> tuple[nn.Module, int]:
    if isinstance(cfg, MLPConfig):
        return mlp(input_shape, [_scaled(h, width_scale) for h in cfg.hidden])
    if isinstance(cfg, ResNetConfig):
        return resnet18(input_shape, _scaled(cfg.nf, width_scale))
    if isinstance(cfg, Conv1dConfig):
        return conv1d(input_shape, [_scaled(c, width_scale) for c in cfg.channels], cfg.kernel_size)
    raise TypeError(f"unsupported net config {cfg!r}")


class TaskNet(nn.Module):
    """A body shared by all tasks plus one head (shared mode) or one head per task slot."""

    def __init__(self, body: nn.Module, features: int, n_classes: int, n_heads: int) -> None:
        super().__init__()
        self.body = body
        self.heads = nn.ModuleList(nn.Linear(features, n_classes) for _ in range(n_heads))

    def head_index(self, slot: int) -> int:
        return slot if len(self.heads) > 1 else 0

    def forward(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
        return self.heads[self.head_index(slot)](self.body(x))

    def task_module(self, slot: int) -> nn.Module:
        """The dense network of one task (shares parameters with this net)."""
        return nn.Sequential(self.body, self.heads[self.head_index(slot)])


def build_task_net(cfg: NetConfig, input_shape: tuple[int, ...], n_classes: int, n_heads: int,
                   width_scale: float = 1.0, normalize: str = "none") -> TaskNet:
    """The net of `cfg` with its heads; an MLP's layers start as the GEM paper's code starts
    them (Xavier-uniform weights, zero biases), the other nets as PyTorch's layers do."""
    body, features = build_body(cfg, input_shape, width_scale, normalize)
    net = TaskNet(body, features, n_classes, n_heads)
    if isinstance(cfg, MLPConfig):
        for layer in net.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    return net
