import re
from pathlib import Path

import pytest

from edgecl.config import ConfigError, MLPConfig, ResNetConfig
from edgecl.setup import load_config

MODELS = Path(__file__).resolve().parent.parent / "models"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_gem_protocol():
    cfg = load_config()
    assert cfg.benchmark.name == "pmnist" and cfg.benchmark.batch_size == 10
    assert cfg.net == MLPConfig(hidden=[100, 100])
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.03
    assert cfg.method.name == "finetune"


@pytest.mark.parametrize(("text", "expected"), [
    ("optimizer: {lr: -1}", "optimizer.lr: Input should be greater than 0"),
    ("optimiser: {lr: 0.1}", "optimiser: unknown key; did you mean 'optimizer'?"),
    ("net: {name: mlp, nf: 3}", "net.nf: unknown key"),
    ("net: {name: vgg}", "net.name: unknown net 'vgg'; valid: 'mlp', 'resnet18', 'conv1d'"),
    ("memory: {dtype: int4}", "memory.dtype:"),
    ("method: {name: nope}", "method.name: unknown method 'nope'; valid: finetune, "),
    ("method: {name: independent, warm: true}", "method.warm: unknown key"),
    ("method: {name: independent, width_scale: 2}", "method.width_scale:"),
    ("- a\n- b", "top level must be a mapping"),
    ("net: [", "not valid YAML"),
])
def test_bad_configs_fail_with_one_line_naming_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    message = str(e.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith(str(tmp_path))


UNKNOWN_KEY = re.compile(r": (?P<key>[\w.]+): unknown key(; did you mean '(?P<closest>\w+)'\?)? "
                         r"\(valid: (?P<valid>[\w, ]+)\)$")


@pytest.mark.parametrize(("text", "key", "closest", "some_valid", "not_valid"), [
    ("optimiser: {lr: 0.1}", "optimiser", "optimizer", {"seed", "net", "memory", "learn"}, "lr"),
    ("zzz: 1", "zzz", None, {"seed", "optimizer"}, "name"),
    ("benchmark: {tasks: 3}", "benchmark.tasks", "n_tasks", {"name", "batch_size"}, "seed"),
    ("net: {name: mlp, hiden: [3]}", "net.hiden", "hidden", {"name", "hidden"}, "nf"),
    ("net: {name: resnet18, hidden: [3]}", "net.hidden", None, {"name", "nf"}, "channels"),
    ("net: {name: conv1d, kernel: 3}", "net.kernel", "kernel_size", {"channels"}, "hidden"),
    ("optimizer: {momentm: 0.9}", "optimizer.momentm", "momentum", {"lr", "name"}, "seed"),
    ("memory: {budget: 100}", "memory.budget", "budget_bytes", {"per_task", "dtype"}, "lr"),
    ("method: {name: gem, memory_strenght: 1}", "method.memory_strenght", "memory_strength",
     {"name", "qp_eps", "fast"}, "ref_batch"),
    ("method: {name: agem, refbatch: 5}", "method.refbatch", "ref_batch", {"name"}, "qp_eps"),
    ("method: {name: finetune, lr: 1}", "method.lr", None, {"name"}, "lr"),
    ("stream: {input_shpe: [3]}", "stream.input_shpe", "input_shape", {"classes", "head"},
     "holdout"),
    ("learn: {hold_out: 0.1}", "learn.hold_out", "holdout", {"max_lag", "keep_checkpoints"},
     "input_shape"),
])
def test_an_unknown_key_names_the_valid_keys_of_its_section_and_the_closest(
        tmp_path, text, key, closest, some_valid, not_valid):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    m = UNKNOWN_KEY.search(str(e.value))
    assert m, str(e.value)
    valid = set(m["valid"].split(", "))
    assert (m["key"], m["closest"]) == (key, closest)
    assert valid >= some_valid and not_valid not in valid


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_a_folder_or_non_utf8_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the config file \(Is a directory\)"):
        load_config(tmp_path)
    latin1 = tmp_path / "c.yaml"
    latin1.write_bytes("seed: 1  # réglé\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8 text \(byte 12 cannot be decoded"):
        load_config(latin1)


def test_overrides_merge_and_a_new_method_drops_the_presets_method_params(tmp_path):
    p = write(tmp_path, "net: {name: resnet18, nf: 8}\n"
                        "method: {name: independent, warm_start: true}")
    cfg = load_config(p, {"seed": 3, "benchmark": {"n_tasks": 2}, "method": {"name": "finetune"}})
    assert cfg.seed == 3 and cfg.benchmark.n_tasks == 2 and cfg.benchmark.name == "pmnist"
    assert cfg.net == ResNetConfig(name="resnet18", nf=8)
    assert cfg.method.name == "finetune" and cfg.method.params == {}
    same = load_config(p, {"method": {"name": "independent"}})
    assert same.method.params == {"warm_start": True}


def test_another_benchmark_drops_the_presets_task_counts(tmp_path):
    p = write(tmp_path, "benchmark: {name: basicmotions, n_tasks: 6, samples_per_task: 1000, "
                        "batch_size: 20}")
    own = load_config(p, {"benchmark": {"name": "file:x.npz"}})
    assert (own.benchmark.n_tasks, own.benchmark.samples_per_task) == (None, None)
    assert own.benchmark.batch_size == 20  # not a count of the preset's data: kept
    given = load_config(p, {"benchmark": {"name": "file:x.npz", "samples_per_task": "all"}})
    assert given.benchmark.samples_per_task == "all"
    same = load_config(p, {"benchmark": {"name": "basicmotions"}})
    assert (same.benchmark.n_tasks, same.benchmark.samples_per_task) == (6, 1000)


def test_a_method_brings_its_tuned_optimizer_unless_the_config_states_one(tmp_path):
    assert load_config(overrides={"method": {"name": "wsn"}}).optimizer.name == "adam"
    assert load_config(overrides={"method": {"name": "finetune"}}).optimizer.lr == 0.03
    explicit = write(tmp_path, "optimizer: {lr: 0.5}\nmethod: {name: wsn}")
    cfg = load_config(explicit)
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 0.5)
    # switching a preset to another method drops the preset's optimiser with its method
    switched = load_config(MODELS / "finetune.yaml", {"method": {"name": "wsn"}})
    assert switched.optimizer.name == "adam"


@pytest.mark.parametrize(("text", "expected"), [
    ("optimizer: {name: sgd}\nmethod: {name: wsn}", ("sgd", 0.03)),  # not WSN's Adam lr
    ("optimizer: {name: adam}\nmethod: {name: wsn}", ("adam", 0.003)),
    ("optimizer: {name: adam}\nmethod: {name: gem}", ("adam", 0.03)),  # not GEM's SGD lr
    ("optimizer: {name: sgd}\nmethod: {name: gem}", ("sgd", 0.1)),
    ("method: {name: agem}", ("sgd", 0.03)),
])
def test_a_methods_optimizer_defaults_apply_only_to_its_own_optimizer(tmp_path, text, expected):
    cfg = load_config(write(tmp_path, text))
    assert (cfg.optimizer.name, cfg.optimizer.lr) == expected


def test_a_benchmark_brings_the_methods_settings_for_it_unless_the_config_states_them(tmp_path):
    def lr(overrides: dict) -> float:
        return load_config(None, overrides).optimizer.lr

    assert lr({"method": {"name": "finetune"}}) == 0.03  # pmnist: the GEM paper's "single"
    assert lr({"method": {"name": "finetune"}, "benchmark": {"name": "rotmnist"}}) == 0.003
    assert lr({"method": {"name": "independent"}, "benchmark": {"name": "rotmnist"}}) == 0.1
    stated = {"method": {"name": "finetune"}, "benchmark": {"name": "rotmnist"},
              "optimizer": {"lr": 0.05}}
    assert lr(stated) == 0.05
