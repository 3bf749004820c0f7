"""Config loading: YAML + overrides -> typed config, every problem reported at once."""
from pathlib import Path

import pytest

from jobs.config import StudyConfig, iter_fields, load_config
from jobs.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_llm_pruner_recipe():
    config = load_config(None)
    tune = config.finetune
    assert (tune.cutoff_len, tune.lora_r, tune.lora_alpha, tune.lora_dropout) == (256, 8, 16, 0.05)
    assert (tune.num_epochs, tune.learning_rate, tune.batch_size, tune.micro_batch_size) == (2, 1e-4, 64, 4)
    assert tune.train_on_inputs is False and tune.val_set_size == 2000 and tune.seed == 42
    assert set(tune.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"}
    assert len(config.study.models) * len(config.study.pruning_configs) == 12


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(None, ["finetune.learning_rate=1e-3", "finetune.lora_r=16", "study.models=[Qwen]",
                                "evaluate.tasks=[boolq, piqa]", "finetune.train_on_inputs=true"])
    assert config.finetune.learning_rate == 1e-3 and isinstance(config.finetune.learning_rate, float)
    assert config.finetune.lora_r == 16
    assert config.study.models == ("Qwen",)
    assert config.evaluate.tasks == ("boolq", "piqa")
    assert config.finetune.train_on_inputs is True


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("finetune:\n  learnin_rate: 1\n  lora_r: eight\nstudy:\n  models: [Lama]\nbogus: {}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "4 problem(s)" in message
    assert "unknown key finetune.learnin_rate" in message and 'did you mean "learning_rate"' in message
    assert "valid: prompt_template" in message  # the valid keys are listed
    assert "finetune.lora_r: expected int, got 'eight'" in message
    assert "'Lama'" in message and 'did you mean "Llama"' in message
    assert "unknown key bogus" in message
    assert "\n" not in message


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("study:\n  models: [Llama\nfinetune: {}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+, column \d+: malformed YAML"):
        load_config(path)


def test_batch_must_divide_by_micro_batch():
    with pytest.raises(ConfigError, match="not a multiple"):
        load_config(None, ["finetune.batch_size=10", "finetune.micro_batch_size=4"])


def test_compile_needs_the_packed_path():
    with pytest.raises(ConfigError, match="finetune.compile is on but finetune.packing is off"):
        load_config(None, ["finetune.compile=on", "finetune.packing=off"])
    assert load_config(None, ["finetune.compile=off", "finetune.packing=off"]).finetune.compile == "off"
    with pytest.raises(ConfigError, match="finetune.compile is on but finetune.deepspeed is zero3_offload"):
        load_config(None, ["finetune.compile=on", "finetune.deepspeed=zero3_offload"])


def test_cuda_graphs_need_the_packed_path_without_deepspeed():
    with pytest.raises(ConfigError, match="finetune.cuda_graphs is on but finetune.packing is off"):
        load_config(None, ["finetune.cuda_graphs=on", "finetune.packing=off", "finetune.deepspeed=none"])
    for deepspeed in ("auto", "zero2"):
        with pytest.raises(ConfigError, match=f"finetune.cuda_graphs is on but finetune.deepspeed is {deepspeed} "):
            load_config(None, ["finetune.cuda_graphs=on", f"finetune.deepspeed={deepspeed}"])
    assert load_config(None, ["finetune.cuda_graphs=on", "finetune.deepspeed=none"]).finetune.cuda_graphs == "on"


def test_results_root_placeholder_in_data_paths():
    config = load_config(None, ["study.results_root=/tmp/x", "data.train_path={results_root}/a.json"])
    assert config.data.train_path == "/tmp/x/a.json"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    assert isinstance(load_config(REPO / "configs" / name), StudyConfig)


def test_reference_lists_every_leaf():
    keys = [key for key, _, _ in iter_fields()]
    assert "finetune.learning_rate" in keys and "resources.finetune.gpus_per_node" in keys
    assert len(keys) == len(set(keys))
