"""WSN: forget-free by construction, frozen reuse, packed masks, capacity, dense task modules."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import task_batches, train
from held import held_bytes
from torch import nn

from edgecl.checkpoint import load_learner, save_checkpoint
from edgecl.config import ConfigError
from edgecl.learners import LearnerSpec
from edgecl.learners.wsn import WSN
from edgecl.nets.masked import MaskedLayer, MaskedTaskNet, TaskBatchNorm, top_c_mask
from edgecl.setup import build_config

NETS = {
    "mlp": ({"name": "mlp", "hidden": [16, 16]}, (1, 4, 4)),
    "resnet18": ({"name": "resnet18", "nf": 2}, (1, 8, 8)),
    "conv1d": ({"name": "conv1d", "channels": [4, 8], "kernel_size": 3}, (2, 12)),
}
OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.01, "weight_decay": 0.01},
}


def wsn(net: str = "mlp", optimizer: str = "sgd", **params) -> WSN:
    """A tiny WSN learner (shared-head mode: WSN gives every task its own head anyway)."""
    net_cfg, shape = NETS[net]
    cfg = build_config({"seed": 0, "device": "cpu", "net": net_cfg,
                        "optimizer": OPTIMIZERS[optimizer], "method": {"name": "wsn", **params}})
    return WSN(LearnerSpec(cfg, shape, n_classes=3, head="shared", max_tasks=3))


def probe(learner, task: int = 0) -> torch.Tensor:
    return task_batches(task, n_batches=1, batch=16, input_shape=learner.spec.input_shape)[0][0]


def weights(learner) -> list[torch.Tensor]:
    return [layer.weight.detach().clone() for layer in learner.net.masked_layers]


def test_top_c_mask_keeps_the_largest_scores_and_passes_gradient_straight_through():
    scores = torch.tensor([[0.1, -0.9], [0.5, -0.2]], requires_grad=True)
    mask = top_c_mask(scores, 0.5)
    assert torch.equal(mask, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    (mask * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert torch.equal(scores.grad, torch.tensor([[1.0, -2.0], [3.0, -4.0]]))  # sign(s) * dL/dm


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_task_one_is_bitwise_unchanged_by_later_tasks(net, optimizer):
    learner = wsn(net, optimizer)
    train(learner, 0)
    x = probe(learner)
    before_out = learner.predict(x, "t0")
    before_w = weights(learner)
    mask0 = learner.masks.mask(0)
    train(learner, 1)
    frozen_for_task2 = learner.net.split(learner.used.clone())
    train(learner, 2)
    assert torch.equal(learner.predict(x, "t0"), before_out)
    for layer, frozen in zip(learner.net.masked_layers, frozen_for_task2, strict=True):
        assert torch.all(layer.weight.grad[frozen] == 0)  # the last step's gradient
    for old, new, used in zip(before_w, weights(learner), learner.net.split(mask0), strict=True):
        assert torch.equal(old[used], new[used])
    # ...while the later tasks really learned: free weights moved
    after_w = weights(learner)
    assert any(not torch.equal(old, new) for old, new in zip(before_w, after_w, strict=True))


def test_masks_are_top_c_per_layer_and_the_union_is_tracked():
    learner = wsn(capacity=[0.25, 0.5])
    for task in range(3):
        train(learner, task)
    for slot in range(3):
        per_layer = learner.net.split(learner.masks.mask(slot))
        assert [int(m.sum()) for m in per_layer] == [round(0.25 * 256), round(0.5 * 256)]
    union = learner.masks.union()
    assert torch.equal(learner.used.cpu(), union)
    assert learner.stats()["capacity_used_after_task"][-1] == pytest.approx(union.float().mean())
    assert learner.stats()["tasks_without_free_weights"] == 0


def test_scores_learn_and_a_new_head_starts_from_the_last_finished_one():
    learner = wsn()
    train(learner, 0)
    scores = [layer.scores.detach().clone() for layer in learner.net.masked_layers]
    learner.register_task("t1")
    learner.begin_task(learner.slot("t1"))
    assert all(torch.equal(a, b) for a, b in
               zip(learner.net.heads[1].parameters(), learner.net.heads[0].parameters(),
                   strict=True))
    train(learner, 1)
    assert all(not torch.equal(old, layer.scores) for old, layer in
               zip(scores, learner.net.masked_layers, strict=True))


def test_exhausted_capacity_is_warned_and_counted(caplog):
    learner = wsn(capacity=1.0)
    train(learner, 0)
    assert learner.stats()["capacity_used_after_task"] == [1.0]
    with caplog.at_level(logging.WARNING, logger="edgecl.learners.wsn"):
        train(learner, 1)
    assert "free capacity exhausted" in caplog.text
    assert learner.stats()["tasks_without_free_weights"] == 1


def test_a_returning_task_keeps_its_subnetwork_and_other_tasks_are_untouched():
    learner = wsn()
    train(learner, 0)
    train(learner, 1)
    x1 = probe(learner, 1)
    out1, mask0 = learner.predict(x1, "t1"), learner.masks.mask(0)
    train(learner, 0)  # t0 again: only its head and BatchNorm can learn now
    assert torch.equal(learner.masks.mask(0), mask0)
    assert torch.equal(learner.predict(x1, "t1"), out1)


@pytest.mark.parametrize("net", sorted(NETS))
def test_task_module_is_plain_layers_with_the_mask_folded_in(net):
    learner = wsn(net)
    train(learner, 0)
    train(learner, 1)
    x = probe(learner)
    for task in ("t0", "t1"):
        module = learner.task_module(task)
        kinds = {type(m) for m in module.modules()}
        assert not kinds & {MaskedLayer, TaskBatchNorm, MaskedTaskNet}
        assert all("scores" not in name for name, _ in module.named_parameters())
        assert torch.allclose(module(x), learner.predict(x, task), atol=1e-6)
    dense = [m for m in learner.task_module("t0").modules() if isinstance(m, nn.Linear | nn.Conv1d
                                                                        | nn.Conv2d)][:-1]
    for layer, used in zip(dense, learner.net.split(learner.masks.mask(0)), strict=True):
        assert torch.all(layer.weight[~used] == 0)


def test_batchnorm_is_per_task():
    learner = wsn("resnet18")
    norms = learner.net.task_norms
    assert norms and all(len(n.norms) == learner.spec.max_tasks for n in norms)
    train(learner, 0)
    stats0 = norms[0].norms[0].running_mean.clone()
    train(learner, 1)
    assert torch.equal(norms[0].norms[0].running_mean, stats0)
    assert not torch.equal(norms[0].norms[1].running_mean, stats0)


def test_footprint_keeps_scores_for_training_and_serves_with_one_bit_masks():
    learner = wsn()
    for task in range(3):
        train(learner, task)
    fp = learner.footprint()
    n = learner.net.n_weights  # 16*16 + 16*16 = 512: a multiple of 8, so exactly 1 bit raw
    assert held_bytes(learner.masks) == 3 * n // 8  # what the masks really hold
    assert fp.details["mask_bits_per_weight_per_task"] == 1.0
    assert fp.details["masks_compressed_bytes"] > 0  # lzma's header outweighs 3 tiny masks
    scores = [layer.scores for layer in learner.net.masked_layers]
    assert fp.deployable_bytes == (held_bytes(learner.net, without=scores, grads=False)
                                   + held_bytes(learner.masks))
    # training also keeps the scores with their gradients and momentum, and the used-weight map
    assert fp.training_bytes >= fp.deployable_bytes + 3 * held_bytes(scores, grads=False) + n
    assert len(learner.net.heads) == 3  # a head per task, though the benchmark shares one


def test_checkpoint_holds_only_packed_masks_and_restores_the_union(tmp_path):
    learner = wsn()
    train(learner, 0)
    train(learner, 1)
    save_checkpoint(tmp_path / "c.pt", learner)
    state = torch.load(tmp_path / "c.pt", weights_only=True)["state"]
    packed = state["method"]["masks"]["packed"]
    assert all(p.dtype == torch.uint8 for p in packed.values())
    assert not any("mask" in key for key in state["net"])
    restored = load_learner(tmp_path / "c.pt")
    assert torch.equal(restored.used, learner.used)
    x = probe(learner)
    assert torch.equal(restored.predict(x, "t0"), learner.predict(x, "t0"))


def test_capacity_is_validated():
    with pytest.raises(ConfigError, match=r"method\.capacity"):
        wsn(capacity=1.5)
    with pytest.raises(ValueError, match="3 capacities given for 2 maskable layers"):
        wsn(capacity=[0.5, 0.5, 0.5])
