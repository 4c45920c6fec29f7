import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from align import data, losses, models, sft
from align.config import ConfigError, SFTConfig, load_config
from align.formats import SFTExample

from helpers import ROOT, tiny_causal_lm

TINY_SFT = "recipes/tiny/sft.yaml"


def run(tmp_path, name, *overrides):
    cfg = load_config(SFTConfig, TINY_SFT, [f"output_dir={tmp_path / name}", "log.progress=false", "overwrite=false",
                                            *overrides])
    return cfg, sft.main(cfg)


def test_tiny_recipe_trains_saves_and_reloads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, report = run(tmp_path, "a", "train.max_steps=2")
    out = tmp_path / "a"
    assert math.isfinite(report["train_loss"]) and report["steps"] == 2
    assert (out / "report.json").is_file() and (out / "config.yaml").is_file()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/train" in r] == [2]
    assert {"loss/val", "ppl/val"} <= set(rows[0]) and rows[0]["step"] == 0
    assert any((out / "tb").iterdir())

    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    initial = models.load_causal_lm(cfg.model, cfg.lora, cfg.seed)  # the same seeded random init
    changed = [n for n, p in initial.named_parameters() if not torch.equal(p, saved.state_dict()[n])]
    assert len(changed) == len(list(initial.parameters())), "every parameter should have moved"
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == models.load_tokenizer(cfg.model).chat_template


def test_lora_adapter_and_merged_model_load_with_plain_transformers(tmp_path, tiny_pretrained):
    from transformers import AutoModelForCausalLM

    _, report = run(tmp_path, "lora", "train.max_steps=3", f"model.name_or_path={tiny_pretrained}",
                    "model.init=pretrained", "lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2")
    out = tmp_path / "lora"
    assert (out / "model" / "adapter_config.json").is_file()
    adapter = AutoModelForCausalLM.from_pretrained(out / "model")  # transformers + peft find the base
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(x).logits, merged(x).logits, atol=1e-5, rtol=1e-4)
        assert (merged(x).logits - base(x).logits).abs().max() > 1e-4  # the adapters did something


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_pretrained, mode):
    common = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5", "log.every=1",
              f"model.name_or_path={tiny_pretrained}", "model.init=pretrained"]
    if mode == "lora":  # dropout makes the RNG state part of what must be restored
        common += ["lora.enabled=true", "lora.r=4", "lora.dropout=0.3", "train.learning_rate=5e-3"]
    run(tmp_path, "whole", *common)
    # A crash after step 3: the step-4 checkpoint and the outputs never got written.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    for leftover in ("checkpoints/step-000004", "model", "merged"):
        shutil.rmtree(crashed / leftover, ignore_errors=True)
    (crashed / "report.json").unlink()
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-000002"]
    run(tmp_path, "crashed", *common, "resume=true")

    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "whole" / "model" / weights), load_file(crashed / "model" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def loss(folder):
        rows = map(json.loads, open(folder / "metrics.jsonl"))
        return [(r["step"], r["loss/train"]) for r in rows if "loss/train" in r]

    assert loss(crashed) == loss(tmp_path / "whole") and len(loss(crashed)) == 6


def test_existing_run_is_not_clobbered_and_a_finished_run_is_not_redone(tmp_path):
    run(tmp_path, "a", "train.max_steps=1")
    with pytest.raises(ConfigError, match="already holds a run; pass resume=true"):
        run(tmp_path, "a", "train.max_steps=1")
    before = (tmp_path / "a" / "report.json").read_text()
    _, report = run(tmp_path, "a", "train.max_steps=1", "resume=true")
    assert json.loads(before) == report


def _chatml_with_generation_markers(tokenizer):
    """The tiny ChatML template, with TRL's {% generation %} markers around exactly the span align trains on
    (the answer and its end-of-turn), so TRL's assistant masks come from the markers and ours from rendering."""
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    return tokenizer


def test_sft_loss_equals_trl_sfttrainer_assistant_only(tmp_path, tiny_tokenizer, chat):
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    tokenizer = _chatml_with_generation_markers(tiny_tokenizer)
    rows = [json.loads(line) for line in open(ROOT / "data" / "gsm8k_400.jsonl")][:3]
    chats = [chat] + [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                      for r in rows]
    model = tiny_causal_lm(init_std=0.2)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, per_device_train_batch_size=4,
                     max_length=None, report_to="none", use_cpu=True, bf16=False, padding_free=False)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": c} for c in chats]))
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(model, batch)

    ours = [data.tokenize_sft_example(SFTExample(messages=c), tokenizer) for c in chats]
    # The same targets token by token (TRL shuffles, so match rows by their ids).
    trl_rows = {tuple(ids[m.bool()].tolist()): lab[m.bool()].tolist()
                for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])}
    for tok in ours:
        assert trl_rows[tuple(tok.input_ids)] == data._labels(tok)
    packed = data.collate(ours, padding_free=True)
    loss = losses.sft_loss(models.logits_at(model, packed), packed.targets, packed.num_targets)
    assert abs(loss.item() - trl_loss.item()) < 1e-5


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_match_one_process(tmp_path):
    overrides = ["log.every=1", "train.max_steps=4", "log.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "align.sft", TINY_SFT, f"output_dir={tmp_path / 'one'}", *overrides]
    double = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "align.sft", TINY_SFT, f"output_dir={tmp_path / 'two'}", *overrides]
    for cmd in (single, double):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]  # noqa: E731
    one, two = rows("one"), rows("two")
    pick = lambda rs, k: [r[k] for r in rs if k in r]  # noqa: E731
    assert len(pick(one, "loss/train")) == 4
    for key in ("loss/train", "loss/val"):
        assert pick(one, key) == pytest.approx(pick(two, key), abs=1e-5)


def test_bad_input_from_the_command_line_is_one_line_and_leaves_no_finished_run(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "only a question"}\n')
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "align.sft", TINY_SFT, f"output_dir={out}",
                           f"data.train.path={bad}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {bad}:2: missing field 'answer' (format question_answer; "
                                                f"rename columns with data.*.columns)"]
    assert not out.exists()  # the inputs are checked before the run folder is created


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = run(tmp_path, "plain", "train.max_steps=3", "log.every=1")[1]
    ckpt = run(tmp_path, "ckpt", "train.max_steps=3", "log.every=1", "train.gradient_checkpointing=true")[1]
    assert ckpt["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5)
    assert ckpt["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-5)


def test_validation_runs_at_the_interval(tmp_path):
    run(tmp_path, "ev", "train.max_steps=4", "train.eval_every=2")
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "ev" / "metrics.jsonl")) if "loss/val" in r]
    assert steps == [0, 2, 4]


def test_qlora_without_a_gpu_and_wandb_without_the_package_are_clear_errors(tmp_path, tiny_pretrained):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="4bit .*needs a CUDA GPU"):
            run(tmp_path, "q", "lora.enabled=true", "lora.quantization=4bit", "train.max_steps=1",
                f"model.name_or_path={tiny_pretrained}", "model.init=pretrained")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="wandb is not installed"):
            run(tmp_path, "w", "log.report_to=[wandb]", "train.max_steps=1")
