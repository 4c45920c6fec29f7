"""The forgetting check in align.sft, end to end on the tiny model: training hard on one sentence is flagged, a mild
run is not, and report.json carries the result."""

import json

import torch
from safetensors.torch import load_file

from align import forgetting, sft
from align.config import SFTConfig, load_config

NARROW = "The same sentence, over and over again, until nothing else is left."


def run(tmp_path, name, *overrides):
    narrow = tmp_path / "narrow.jsonl"
    narrow.write_text((json.dumps({"text": NARROW}) + "\n") * 16)
    cfg = load_config(SFTConfig, "recipes/tiny/sft.yaml", [
        f"output_dir={tmp_path / name}", "log.progress=false", "overwrite=false", f"data.train.path={narrow}",
        "data.train.limit=null", "data.validation_fraction=0", "train.batch_size=8", "train.micro_batch_size=8",
        "forgetting.max_new_tokens=8", "forgetting.micro_batch_size=16", "forgetting.max_kl=1.0",
        "forgetting.text={path: data/general_reference.jsonl, format: text, limit: 16}", *overrides])
    return sft.main(cfg)


def check_schema(result):
    assert set(result) == {"text_loss", "text_ppl", "kl_from_start", "records", "prompts", "flags", "flagged"}
    assert set(result["text_loss"]) == {"before", "after", "rise", "ci95"}
    assert set(result["text_ppl"]) == {"before", "after"} and set(result["kl_from_start"]) == {"value", "ci95"}
    assert result["records"] == 16 and result["prompts"] == forgetting.DEFAULT_PROMPTS  # the shipped file's
    lo, hi = result["text_loss"]["ci95"]
    assert lo <= result["text_loss"]["rise"] <= hi


def test_training_hard_on_one_sentence_is_flagged_as_forgetting(tmp_path):
    report = run(tmp_path, "hard", "forgetting.enabled=true", "train.max_steps=8", "train.learning_rate=3e-2",
                 "train.warmup_ratio=0")
    result = json.loads((tmp_path / "hard" / "report.json").read_text())["forgetting"]
    assert result == report["forgetting"]
    check_schema(result)
    assert result["text_loss"]["rise"] > 1.0 and result["text_loss"]["ci95"][0] > 0.1
    assert result["kl_from_start"]["value"] > 1.0
    assert result["flagged"] and len(result["flags"]) == 2
    assert "max_loss_rise=0.1" in result["flags"][0] and "max_kl=1.0" in result["flags"][1]
    assert (tmp_path / "hard" / forgetting.BEFORE_FILE).is_file()


def test_a_mild_run_is_not_flagged_and_the_check_does_not_change_training(tmp_path):
    mild = ["train.max_steps=2", "train.learning_rate=1e-5"]
    report = run(tmp_path, "mild", "forgetting.enabled=true", *mild)
    result = report["forgetting"]
    check_schema(result)
    assert abs(result["text_loss"]["rise"]) < 0.01 and abs(result["kl_from_start"]["value"]) < 0.01
    assert result["flags"] == [] and result["flagged"] is False

    run(tmp_path, "without", *mild)  # the same run without the check: the same weights
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("mild", "without"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
