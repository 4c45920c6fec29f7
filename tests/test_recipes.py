"""Every recipe under recipes/ loads and validates; every tiny recipe runs end to end in seconds."""

import json
from pathlib import Path

import pytest

from align.config import STAGES, load_config, stage_of_recipe

from helpers import ROOT

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))
TINY_STAGE_RECIPES = sorted(p for p in (ROOT / "recipes" / "tiny").glob("*.yaml")
                            if not p.stem.startswith("pipeline"))  # the tiny pipeline: tests/stages/test_pipeline.py


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT / "recipes"))


ACCELERATE = ROOT / "recipes" / "accelerate"


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_recipe_loads_and_validates(path):
    if path.parent == ACCELERATE:  # launch configs, not align recipes: test_accelerate_config_says_what_it_is_for
        return
    if path.stem.startswith("pipeline"):  # the pipeline and, through it, each of its stages' layered configs
        from align.config import PipelineConfig
        from align.pipeline import plan

        cfg = load_config(PipelineConfig, path)
        assert [s.name for s in plan(cfg, str(path))] == cfg.stages
        return
    stage = stage_of_recipe(path)
    assert stage in STAGES, f"{path.name}: name it <stage>_*.yaml for a stage in {sorted(STAGES)}"
    load_config(STAGES[stage], path)


def test_there_is_a_tiny_recipe_for_every_stage():
    tiny = {stage_of_recipe(p) for p in TINY_STAGE_RECIPES}
    assert set(STAGES) <= tiny


@pytest.mark.parametrize("path", TINY_STAGE_RECIPES, ids=_ids)
def test_tiny_recipe_runs(path, tmp_path, monkeypatch):
    import importlib

    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.chdir(ROOT)
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    stage = stage_of_recipe(path)
    cfg = load_config(STAGES[stage], path, [f"output_dir={tmp_path / stage}", "log.progress=false"])
    importlib.import_module(f"align.{stage}").main(cfg)
    report = json.loads((tmp_path / stage / "report.json").read_text())
    assert report["stage"] == stage


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_gpu_pipeline_batches_split_over_the_processes_it_is_launched_with(processes):
    from align.config import PipelineConfig
    from align.pipeline import plan

    path = ROOT / "recipes" / "smollm2-135m" / "pipeline_hh_gpu.yaml"
    plan(load_config(PipelineConfig, path), str(path), num_processes=processes)  # raises ConfigError otherwise


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero3"])
def test_accelerate_config_loads_with_accelerate_and_says_what_it_is_for(name):
    """accelerate's own loader reads each launch config; the fields that decide how align trains are checked: the
    kind of parallelism, FSDP version 2 with full (gathered) state dicts, ZeRO stage 3 gathering weights on save."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE / f"{name}.yaml"
    assert sorted(p.stem for p in ACCELERATE.glob("*.yaml")) == ["ddp", "fsdp2", "zero3"]
    cfg = load_config_from_file(str(path))
    assert cfg.use_cpu is False and cfg.num_machines == 1 and cfg.mixed_precision == "no"  # recipes set precision
    expected = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}[name]
    assert cfg.distributed_type.value == expected
    if name == "fsdp2":
        assert str(cfg.fsdp_config["fsdp_version"]) == "2"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # one block at a time
    if name == "zero3":
        assert cfg.deepspeed_config["zero_stage"] == 3
        assert cfg.deepspeed_config["zero3_save_16bit_model"] is True  # else get_state_dict cannot gather weights
        assert cfg.deepspeed_config["zero3_init_flag"] is False  # align loads and copies models before prepare
    header = path.read_text().split("compute_environment")[0]
    assert f"accelerate launch --config_file recipes/accelerate/{name}.yaml" in header
