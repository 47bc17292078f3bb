"""The offline upper bound: one net trained on every task's data at once."""

from edgecl.joint import joint_training
from edgecl.protocol import run_protocol
from edgecl.setup import benchmark_for, load_config


def test_joint_training_is_the_ceiling_fine_tuning_falls_short_of():
    cfg = load_config("models/finetune.yaml", {"benchmark": {"n_tasks": 3,
                                                             "samples_per_task": 300}})
    bench = benchmark_for(cfg)
    joint = joint_training(cfg, bench, epochs=3)
    single_pass, _ = run_protocol(cfg, bench)
    assert len(joint["accs"]) == 3 and joint["acc"] == sum(joint["accs"]) / 3
    assert min(joint["accs"]) > max(single_pass["R"][-1][:2])  # the old tasks fine-tuning forgot
    assert joint["acc"] > single_pass["acc"] + 0.05
    assert joint_training(cfg, bench, epochs=3)["accs"] == joint["accs"]  # seeded

