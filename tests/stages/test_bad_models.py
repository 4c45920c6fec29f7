"""A model location that cannot be used is one line before anything loads: a missing path, a run folder given for its
model, adapters on layers the model lacks, a chat template file that is not there."""

import subprocess
import sys

import pytest

from align import card, sft
from align.config import ConfigError, SFTConfig, load_config

from helpers import ROOT

TINY_SFT = "recipes/tiny/sft.yaml"


def run(out, *overrides):
    return sft.main(load_config(SFTConfig, TINY_SFT, [f"output_dir={out}", "log.progress=false", "overwrite=false",
                                                      "train.max_steps=1", *overrides]))


def test_a_model_path_that_does_not_exist_is_one_line_and_writes_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "align.sft", TINY_SFT, f"output_dir={tmp_path / 'run'}",
                           "model.name_or_path=/nonexistent/models/policy"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: model.name_or_path=/nonexistent/models/policy: no such file or folder"]
    assert not (tmp_path / "run").exists()


def test_a_run_folder_given_for_its_model_names_the_model_inside(tmp_path):
    run(tmp_path / "first")
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "second", f"model.name_or_path={tmp_path / 'first'}", "model.init=pretrained")
    assert str(err.value) == (f"model.name_or_path={tmp_path / 'first'} is an align run folder, not a model: its "
                              f"model is {tmp_path / 'first' / 'model'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json there, so it is not a transformers model folder"):
        run(tmp_path / "third", f"model.name_or_path={empty}")


def test_lora_target_modules_the_model_lacks_name_the_ones_it_has(tmp_path, tiny_pretrained):
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "run", f"model.name_or_path={tiny_pretrained}", "model.init=pretrained", "lora.enabled=true",
            "lora.target_modules=[attn_qkv]")
    assert str(err.value) == ("lora.target_modules=['attn_qkv']: not found in the model (its linear layers: down_proj, "
                              "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)")
    assert not (tmp_path / "run").exists()


def test_a_chat_template_file_that_is_missing_is_not_taken_as_the_template(tmp_path):
    with pytest.raises(ConfigError, match=r"model.chat_template=templates/mine.jinja: file not found"):
        run(tmp_path / "run", "model.chat_template=templates/mine.jinja")


def test_saved_adapters_carry_no_empty_model_card(tmp_path, tiny_pretrained):
    out = tmp_path / "run"
    run(out, f"model.name_or_path={tiny_pretrained}", "model.init=pretrained", "lora.enabled=true", "lora.r=4",
        "train.max_steps=2", "train.save_every=1")
    assert (out / "model" / "adapter_config.json").is_file()
    cards = sorted(out.rglob("README.md"))
    # peft's empty cards ("[More Information Needed]" in every field) are removed; align's own card is in model/ and
    # merged/ (none in the checkpoints)
    assert cards == [out / "merged" / "README.md", out / "model" / "README.md"]
    assert all(card.MARKER in p.read_text() and "More Information Needed" not in p.read_text() for p in cards)
