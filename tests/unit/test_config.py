import dataclasses
import re
import typing

import pytest

from align import config as C
from align.config import ConfigError, SFTConfig, load_config

BASE = ["output_dir=/tmp/x", "model.name_or_path=m", "data.train.path=d.jsonl"]


def test_overrides_and_yaml_merge_into_typed_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: runs/a\nmodel: {name_or_path: m}\ndata: {train: {path: d.jsonl}}\n"
                      "train: {learning_rate: 1.0e-4}\n")
    cfg = load_config(SFTConfig, recipe, ["train.learning_rate=3e-4", "lora.enabled=true", "lora.r=8"])
    assert isinstance(cfg, SFTConfig) and isinstance(cfg.train, C.TrainConfig)
    assert cfg.train.learning_rate == 3e-4 and cfg.lora.enabled and cfg.lora.r == 8
    assert cfg.output_dir == "runs/a"


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: a\nmodel: {name_or_path: m}\ntrain: {lerning_rate: 1.0}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.lerning_rate"):
        load_config(SFTConfig, recipe)
    with pytest.raises(ConfigError, match="data.train.formt"):
        load_config(SFTConfig, None, BASE + ["data.train.formt=x"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(SFTConfig, None, BASE + ["train.batch_size=many"])


def test_missing_required_value_names_the_key():
    with pytest.raises(ConfigError, match="name_or_path"):
        load_config(SFTConfig, None, ["output_dir=/tmp/x", "data.train.path=d.jsonl"])


@pytest.mark.parametrize("override, key", [
    ("train.micro_batch_size=3", "train.batch_size"),
    ("data.validation_fraction=1.5", "data.validation_fraction"),
    ("data.truncation=middle", "data.truncation"),
    ("lora.quantization=4bit", "lora.quantization"),
    ("train.scheduler=exp", "train.scheduler"),
    ("model.dtype=float8", "model.dtype"),
    ("resume=true", "resume"),
])
def test_incompatible_or_invalid_options_name_the_key(override, key):
    extra = ["overwrite=true"] if override == "resume=true" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SFTConfig, None, BASE + extra + [override])


def test_quantizing_a_random_model_is_an_error():
    with pytest.raises(ConfigError, match="needs model.init=pretrained"):
        load_config(SFTConfig, None, BASE + ["lora.enabled=true", "lora.quantization=4bit", "model.init=random"])


def test_validation_file_and_fraction_together_is_an_error():
    with pytest.raises(ConfigError, match="validation_fraction"):
        load_config(SFTConfig, None, BASE + ["data.validation.path=v.jsonl", "data.validation_fraction=0.1"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(SFTConfig, None, BASE + ["lora.enabled=true", "data.train.columns.prompt=question"])
    path = tmp_path / "config.yaml"
    path.write_text(C.to_yaml(cfg))
    assert load_config(SFTConfig, path) == cfg


def _config_classes():
    seen, todo = [], list(C.STAGES.values())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            sub = C._dataclass_in(hint)
            if sub is not None:
                todo.append(sub)
    return seen


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls):
    docs = C.field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not undocumented, f"{cls.__name__}: fields without a docstring: {undocumented}"


def test_help_lists_keys_with_their_documentation():
    text = C.describe(SFTConfig)
    assert "train.learning_rate = 2e-05" in text and "Peak learning rate." in text
    assert "data.train.path (required)" in text


def test_yaml_syntax_errors_and_a_top_level_that_is_not_a_mapping_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: a\nmodel:\n  name_or_path: m\n   init: random\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, bad)
    assert str(err.value) == f"{bad}:4: YAML syntax error: mapping values are not allowed here"
    listed = tmp_path / "list.yaml"
    listed.write_text("- output_dir: a\n- model: m\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, listed)
    assert str(err.value) == (f"{listed}: a recipe is a mapping of keys (e.g. `output_dir: ...`); its top level is "
                              f"a list")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"output_dir: a\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"{latin1}:2: not UTF-8 text \(byte 0xe9\)"):
        load_config(SFTConfig, latin1)


def test_a_recipe_keeps_yaml_floats_written_without_a_point(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("\ufeffoutput_dir: a\nmodel: {name_or_path: m}\ndata: {train: {path: d.jsonl}}\n"
                      "train: {learning_rate: 1e-4}\n")  # a BOM, and 1e-4 (a string to plain YAML 1.1)
    assert load_config(SFTConfig, recipe).train.learning_rate == 1e-4


def test_negative_warmup_steps_and_ppo_top_p_are_refused():
    with pytest.raises(ConfigError, match=r"train.warmup_steps: must be >= 0; got -5"):
        load_config(SFTConfig, None, BASE + ["train.warmup_steps=-5"])
    ppo = ["output_dir=/tmp/x", "model.name_or_path=m", "data.train.path=d.jsonl", "reward.rule=length"]
    for knob in ("rollout.top_p=0.9", "rollout.top_k=20"):
        with pytest.raises(ConfigError, match="full tempered softmax, so responses must be sampled from it"):
            load_config(C.PPOConfig, None, ppo + [knob])


def test_evaluation_engine_is_hf_or_a_colocated_vllm():
    base = {"policy": "p", "baseline": "b", "reward": {"rule": "length"}, "prompts": {"path": "x.jsonl"}}
    assert load_config(C.EvalConfig, layers=[base], where="t").engine == "hf"
    cfg = load_config(C.EvalConfig, layers=[{**base, "engine": "vllm", "vllm": {"cpu_kv_cache_gib": 2}}], where="t")
    assert cfg.engine == "vllm" and cfg.vllm.cpu_kv_cache_gib == 2 and cfg.vllm.mode == "colocate"
    with pytest.raises(ConfigError, match="engine"):
        load_config(C.EvalConfig, layers=[{**base, "engine": "sglang"}], where="t")
    with pytest.raises(ConfigError, match=r"vllm\.mode=server.*colocate"):
        load_config(C.EvalConfig, layers=[{**base, "engine": "vllm", "vllm": {"mode": "server"}}], where="t")
    with pytest.raises(ConfigError, match="cpu_kv_cache_gib"):
        load_config(C.EvalConfig, layers=[{**base, "engine": "vllm", "vllm": {"cpu_kv_cache_gib": 0}}], where="t")


def test_evaluate_command_line_takes_the_engine():
    from align.evaluate import parse_args

    flags = ["--policy", "p", "--baseline", "b", "--rule", "length", "--prompts", "x.jsonl"]
    assert parse_args(flags).engine == "hf"
    assert parse_args([*flags, "--engine", "vllm"]).engine == "vllm"
    with pytest.raises(ConfigError, match="engine"):
        parse_args([*flags, "--engine", "vlm"])


@pytest.mark.parametrize("overrides, message", [
    (["loss.type=ipo", "loss.rdpo_alpha=0.01"], "rdpo_alpha (R-DPO) applies to type sigmoid, robust or hinge, not ipo"),
    (["loss.type=simpo", "loss.ld_alpha=0.5"], "ld_alpha (LD-DPO) re-weights the reference's log-probs too"),
    (["loss.ld_alpha=1.5"], "ld_alpha: must be in [0, 1]"),
])
def test_length_robust_dpo_options_are_checked_with_the_loss_type(overrides, message):
    from align.config import DPOConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DPOConfig, None, ["output_dir=x", "model.name_or_path=m", "data.train.path=f", *overrides])
    # a negative alpha (against "shorter wins") is allowed
    load_config(DPOConfig, None, ["output_dir=x", "model.name_or_path=m", "data.train.path=f", "loss.rdpo_alpha=-0.02"])
