"""Every shipped preset loads and runs the protocol end to end, on a tiny slice of its data."""

from pathlib import Path

import numpy as np
import pytest

from edgecl.learners import LEARNERS, learner_class
from edgecl.protocol import run_protocol
from edgecl.setup import benchmark_for, load_config

MODELS = Path(__file__).resolve().parent.parent / "models"
PRESETS = sorted(MODELS.glob("*.yaml"))


def test_there_are_presets_for_every_method():
    methods = {load_config(p).method.name for p in PRESETS}
    assert methods == set(LEARNERS)


# WSN's preset sets a capacity per layer of the 2x100 MLP, which no other net could share.
PRESETS_BEYOND_DEFAULTS = {"wsn"}


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_method_presets_hold_the_defaults_that_method_all_runs(method):
    preset = load_config(MODELS / f"{method}.yaml")
    defaults = load_config(None, {"method": {"name": method}})
    Params = learner_class(method).Params
    same = (Params.model_validate(preset.method.params)
            == Params.model_validate(defaults.method.params))
    assert same is (method not in PRESETS_BEYOND_DEFAULTS)
    assert (preset.optimizer, preset.memory, preset.net, preset.head) == (
        defaults.optimizer, defaults.memory, defaults.net, defaults.head)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_smoke_runs(preset):
    cfg = load_config(preset, {"device": "cpu",
                               "benchmark": {"n_tasks": 2, "samples_per_task": 20}})
    result, learner = run_protocol(cfg, benchmark_for(cfg))
    R = np.asarray(result["R"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    assert result["method"] == cfg.method.name
    assert learner.task_ids == result["tasks"]
    holds_state = cfg.method.name not in ("finetune", "independent")  # memory, masks, Fisher...
    assert (result["footprint"]["state_bytes"] > 0) is holds_state
