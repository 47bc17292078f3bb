import pytest
import torch

from edgecl.config import ConfigError, Conv1dConfig, MLPConfig, ResNetConfig
from edgecl.nets import build_body, build_task_net, check_input_shape


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_mlp_is_the_gem_mnist_net():
    net = build_task_net(MLPConfig(), (1, 28, 28), 10, 1)
    assert n_params(net) == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_reduced_resnet18_has_nf_20_stages():
    body, features = build_body(ResNetConfig(name="resnet18"), (3, 32, 32))
    assert features == 160  # 8 * nf
    assert body(torch.rand(2, 3, 32, 32)).shape == (2, 160)
    assert body.conv1.out_channels == 20
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        build_body(ResNetConfig(name="resnet18"), (784,))


def test_conv1d_takes_sensor_windows():
    body, features = build_body(Conv1dConfig(name="conv1d", channels=[8, 16]), (6, 100))
    assert features == 16 and body(torch.rand(4, 6, 100)).shape == (4, 16)
    with pytest.raises(ConfigError, match=r"\[channels, steps\]"):
        build_body(Conv1dConfig(name="conv1d"), (1, 28, 28))


def test_conv1d_refuses_windows_in_the_wrong_layout():
    conv = Conv1dConfig(name="conv1d")
    with pytest.raises(ConfigError, match=r"more channels \(64\) than steps \(6\).*"
                                          r"x\.transpose\(0, 2, 1\)"):
        check_input_shape(conv, (64, 6))  # [steps, channels]: 64 steps of 6 channels
    with pytest.raises(ConfigError, match=r"no channel axis.*x\[:, None, :\].*\[n, 1, 100\]"):
        check_input_shape(conv, (100,))
    check_input_shape(conv, (6, 64))
    check_input_shape(MLPConfig(), (64, 6))  # an MLP flattens: any layout is learnable


def test_width_scale_shrinks_hidden_layers():
    _, features = build_body(MLPConfig(hidden=[100, 100]), (10,), width_scale=0.05)
    assert features == 5


def test_per_task_heads_are_separate():
    net = build_task_net(MLPConfig(hidden=[8]), (4,), 2, n_heads=3)
    x = torch.rand(5, 4)
    assert not torch.equal(net(x, 0), net(x, 1))
    assert torch.equal(net.task_module(2)(x), net(x, 2))


def test_mlp_starts_as_the_gem_papers_code_starts_it():
    net = build_task_net(MLPConfig(), (1, 28, 28), 10, 2)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4  # two hidden layers, two heads
    for layer in linears:
        bound = (6 / sum(layer.weight.shape)) ** 0.5  # Xavier-uniform: U(-a, a)
        w = layer.weight.abs()
        assert w.max() <= bound and w.max() > 0.95 * bound and w.mean() > 0.45 * bound
        assert not layer.bias.any()
    conv = build_task_net(Conv1dConfig(name="conv1d", channels=[8]), (6, 64), 4, 1)
    assert conv.heads[0].bias.any()  # other nets keep PyTorch's initialisation
