import copy
import json
import subprocess
import sys

import pytest
import torch

from align import data, dpo, formats, losses
from align.config import ConfigError, DPOConfig, load_config
from align.formats import DataError, PreferenceExample

from helpers import ROOT, TINY, tiny_causal_lm

TINY_DPO = "recipes/tiny/dpo.yaml"
ROWS = [
    {"prompt": [{"role": "user", "content": "How do I bake bread?"}],
     "chosen": [{"role": "assistant", "content": "Mix flour, water, yeast and salt; knead, let it rise, bake."}],
     "rejected": [{"role": "assistant", "content": "No idea."}]},
    {"prompt": [{"role": "user", "content": "Hi there"}],
     "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
     "rejected": [{"role": "assistant", "content": "What do you want?"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "It is Lyon, I think, but maybe not."}]},
]


def run(tmp_path, name, *overrides, recipe=TINY_DPO):
    cfg = load_config(DPOConfig, recipe, [f"output_dir={tmp_path / name}", "log.progress=false", *overrides])
    return cfg, dpo.main(cfg)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def polite_vs_rude(n=48):
    polite = ["Sure, happy to help with that.", "Of course, here is what I know.", "Certainly, let me explain."]
    rude = ["No. Figure it out yourself.", "Go away, stupid question.", "Not my problem, idiot."]
    return [{"prompt": f"Question number {i}: can you help me?", "chosen": polite[i % 3], "rejected": rude[i % 3]}
            for i in range(n)]


# ---- against TRL's DPOTrainer ---------------------------------------------------------------------------------

TRL_CASES = {  # ours (loss.type, label_smoothing, rpo_alpha) -> TRL (loss_type, loss_weights, label_smoothing),
    # and LD-DPO's ld_alpha (both)
    "sigmoid": (("sigmoid", 0.0, 0.0), (["sigmoid"], None, 0.0)),
    "hinge": (("hinge", 0.0, 0.0), (["hinge"], None, 0.0)),
    "ipo": (("ipo", 0.0, 0.0), (["ipo"], None, 0.0)),
    "robust": (("robust", 0.2, 0.0), (["robust"], None, 0.2)),
    "rpo": (("sigmoid", 0.0, 0.7), (["sigmoid", "sft"], [1.0, 0.7], 0.0)),
    "ld": (("sigmoid", 0.0, 0.0), (["sigmoid"], None, 0.0), 0.3),
    "ld-ipo": (("ipo", 0.0, 0.0), (["ipo"], None, 0.0), 0.3),
    "ld-rpo": (("sigmoid", 0.0, 0.7), (["sigmoid", "sft"], [1.0, 0.7], 0.0), 0.5),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_loss_and_gradients_equal_trl_dpo_trainer(tmp_path, tiny_tokenizer, case):
    """TRL's DPOTrainer (written by others) on the same tiny model, reference and batch: the same token ids, the
    same loss and the same gradient on every parameter, within 1e-5."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    (kind, smoothing, alpha), (trl_types, trl_weights, trl_smoothing), *ld = TRL_CASES[case]
    ld_alpha = ld[0] if ld else None
    beta = 0.5
    policy = tiny_causal_lm(init_std=0.1, seed=3)
    reference = tiny_causal_lm(init_std=0.1, seed=4)  # a different reference, so h != 0 and gradients are rich
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, report_to="none", use_cpu=True,
                     bf16=False, loss_type=trl_types, loss_weights=trl_weights, label_smoothing=trl_smoothing,
                     beta=beta, max_length=None, disable_dropout=True, ld_alpha=ld_alpha)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=tiny_tokenizer)
    features = [trainer.train_dataset[i] for i in range(len(ROWS))]
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(features))
    trl_loss.backward()

    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    pairs, _ = data.tokenize_pairs(examples, tiny_tokenizer, "chat", 1024)
    for pair, f in zip(pairs, features):
        assert pair.chosen.input_ids == f["prompt_ids"] + f["chosen_ids"]
        assert pair.rejected.input_ids == f["prompt_ids"] + f["rejected_ids"]
        assert pair.chosen.num_targets == len(f["chosen_ids"])
    if ld_alpha is not None:  # the LD split matters: the pairs' responses differ in length
        assert any(p.chosen.num_targets != p.rejected.num_targets for p in pairs)
    ours = copy.deepcopy(policy).train()
    lp = dpo.pair_logps(ours, pairs, True, 0, "cpu")
    with torch.no_grad():
        r = dpo.pair_logps(reference, pairs, True, 0, "cpu")
    ref = dpo.ReferenceLogps(r.chosen, r.rejected, r.chosen_tail, r.rejected_tail)
    cfg = load_config(DPOConfig, TINY_DPO, ["output_dir=unused", f"loss.type={kind}", f"loss.beta={beta}",
                                            f"loss.label_smoothing={smoothing}",
                                            f"loss.ld_alpha={'null' if ld_alpha is None else ld_alpha}"])
    loss = dpo.pair_loss(cfg, lp, ref)[0].mean()
    if alpha:
        loss = loss + alpha * losses.nll_loss(lp.chosen, lp.chosen_count.sum())  # TRL's "sft": never LD-weighted
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    theirs = dict(trainer.model.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in ours.parameters())


# ---- LoRA reference -------------------------------------------------------------------------------------------

def test_lora_with_adapters_disabled_gives_exactly_the_base_log_probs(tiny_tokenizer):
    from align.config import LoraConfig
    from align.models import add_lora

    base = tiny_causal_lm(init_std=0.1, seed=5)
    policy = add_lora(copy.deepcopy(base), LoraConfig(enabled=True, r=4), "CAUSAL_LM", seed=0)
    with torch.no_grad():  # trained-looking adapters: B != 0, so the adapters do change the outputs
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pairs, _ = data.tokenize_pairs([PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS],
                                   tiny_tokenizer, "chat", 1024)
    with torch.no_grad():
        expected = dpo.pair_logps(base, pairs, True, 0, "cpu")
        adapted = dpo.pair_logps(policy, pairs, True, 0, "cpu")
        with policy.disable_adapter():
            disabled = dpo.pair_logps(policy, pairs, True, 0, "cpu")
    assert not torch.allclose(adapted[0], expected[0])
    assert torch.equal(disabled[0], expected[0]) and torch.equal(disabled[1], expected[1])


def test_padded_and_packed_batches_give_the_same_log_probs(tiny_tokenizer):
    model = tiny_causal_lm(init_std=0.1, seed=6)
    pairs, _ = data.tokenize_pairs([PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS],
                                   tiny_tokenizer, "chat", 1024)
    with torch.no_grad():
        packed = dpo.pair_logps(model, pairs, True, 0, "cpu")
        padded = dpo.pair_logps(model, pairs, False, 0, "cpu")
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# ---- the recipe -----------------------------------------------------------------------------------------------

def test_short_run_learns_its_training_preferences(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", polite_vs_rude())
    _, report = run(tmp_path, "learn", f"data.train.path={path}", f"data.validation.path={path}",
                    "data.validation_fraction=0", "train.epochs=6", "train.learning_rate=3e-3", "loss.beta=0.5",
                    "data.train.skip_invalid=false")
    assert report["val_accuracy_before"] == 0.5  # policy == reference: every margin is exactly 0 (a tie)
    assert report["val_margin_before"] == 0.0
    assert report["val_accuracy"] >= 0.9
    assert report["val_margin"] > 0


def test_reference_cache_is_reused_across_runs_and_missed_when_tokens_change(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    _, first = run(tmp_path, "a", "train.max_steps=3")
    assert first["reference"]["forwards"] > 0 and first["reference"]["cache"]["train"].startswith("miss")
    losses_a = [json.loads(x)["loss/train"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
                if "loss/train" in x]

    def no_reference_forward(*args, **kwargs):
        raise AssertionError("the reference forward ran although its log-probs are cached")

    with monkeypatch.context() as m:
        m.setattr(dpo, "_compute_reference", no_reference_forward)
        _, second = run(tmp_path, "b", "train.max_steps=3")
    assert second["reference"]["forwards"] == 0 and second["reference"]["cache"]["train"].startswith("hit")
    losses_b = [json.loads(x)["loss/train"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
                if "loss/train" in x]
    assert losses_b == losses_a

    _, other_beta = run(tmp_path, "c", "train.max_steps=1", "loss.beta=0.3", "loss.type=hinge")
    assert other_beta["reference"]["forwards"] == 0
    _, truncated = run(tmp_path, "d", "train.max_steps=1", "data.truncation=right")
    assert truncated["reference"]["cache"]["train"].startswith("miss")
    _, plain = run(tmp_path, "e", "train.max_steps=1", "data.template=plain")
    assert plain["reference"]["cache"]["train"].startswith("miss")


def test_a_named_reference_is_used_and_shares_the_cache_when_its_weights_are_the_policys(tmp_path, monkeypatch,
                                                                                       tiny_pretrained):
    from helpers import tiny_causal_lm as build

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    policy = [f"model.name_or_path={tiny_pretrained}", "model.init=pretrained", "train.max_steps=1"]
    _, default = run(tmp_path, "default", *policy)
    _, same = run(tmp_path, "same", *policy, f"reference.name_or_path={tiny_pretrained}")
    assert same["reference"]["forwards"] == 0  # identical weights and tokens: the same cache entry
    other = tmp_path / "other-reference"
    build(init_std=0.1, seed=11).save_pretrained(other)
    _, different = run(tmp_path, "different", *policy, f"reference.name_or_path={other}")
    assert different["reference"]["forwards"] > 0
    assert default["val_margin_before"] == 0.0 and different["val_margin_before"] != 0.0


def test_simpo_needs_no_reference_and_trains(tmp_path):
    """SimPO on polite-vs-rude pairs: no reference pass, and training widens the held-out margin of its own
    reward beta/|y| log pi(y|x) between chosen and rejected, as the loss asks."""
    path = write_jsonl(tmp_path / "pairs.jsonl", polite_vs_rude(24))
    _, report = run(tmp_path, "simpo", f"data.train.path={path}", "data.validation_fraction=0.25",
                    "loss.type=simpo", "loss.beta=2.0", "loss.simpo_gamma=0.5", "train.max_steps=4",
                    "train.learning_rate=1e-2", "data.train.skip_invalid=false")
    assert report["reference"] == {"used": False}
    assert report["val_margin"] > report["val_margin_before"] + 0.1
    assert report["val_accuracy"] >= report["val_accuracy_before"]


def test_rpo_logs_the_preference_loss_beside_the_total_it_optimises(tmp_path):
    """loss/train is what is optimised (DPO + alpha x NLL); the DPO part keeps its own key. At step 1 the weights are
    the same with and without RPO, so the DPO part equals plain DPO's loss."""
    common = ["train.max_steps=1", "log.every=1"]
    run(tmp_path, "dpo", *common)
    run(tmp_path, "rpo", *common, "loss.rpo_alpha=0.5")
    plain, = [r for r in map(json.loads, open(tmp_path / "dpo" / "metrics.jsonl")) if "loss/train" in r]
    rpo, = [r for r in map(json.loads, open(tmp_path / "rpo" / "metrics.jsonl")) if "loss/train" in r]
    assert rpo["loss/preference/train"] == pytest.approx(plain["loss/train"], abs=1e-6)
    assert rpo["loss/train"] == pytest.approx(rpo["loss/preference/train"] + 0.5 * rpo["nll/train"], abs=1e-5)
    assert rpo["nll/train"] > 1.0


def test_length_robust_losses_run_and_report_accuracy_by_length(tmp_path, monkeypatch):
    """The tiny recipe with LD-DPO and R-DPO: report.json holds the held-out accuracy by length before and after,
    equal to the logged metrics, its counts covering every validation pair; before training every bucket is an
    exact tie (the rewards stay DPO's whole-response ones). A second run reads the split reference log-probs from
    the cache and trains identically."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    common = ["train.max_steps=2", "log.every=1", "loss.ld_alpha=0.5", "loss.rdpo_alpha=0.01"]
    _, report = run(tmp_path, "robust", *common)
    saved = json.loads((tmp_path / "robust" / "report.json").read_text())
    assert saved["ld_alpha"] == 0.5 and saved["rdpo_alpha"] == 0.01
    before, after = saved["val_by_length_before"], saved["val_by_length"]
    validation = saved["data"]["validation"]
    n_val = validation["total"] - sum(validation["dropped"].values())
    counts = [after[b]["n"] for b in ("chosen_longer", "chosen_shorter", "same_length")]
    assert counts == [before[b]["n"] for b in ("chosen_longer", "chosen_shorter", "same_length")]
    assert counts[0] > 0 and counts[1] > 0 and sum(counts) == n_val
    assert all(before[b]["accuracy"] == 0.5 for b in ("chosen_longer", "chosen_shorter"))
    rows = [json.loads(line) for line in open(tmp_path / "robust" / "metrics.jsonl")]
    last = [r for r in rows if "accuracy/chosen_longer/val" in r][-1]
    assert last["accuracy/chosen_longer/val"] == after["chosen_longer"]["accuracy"]
    assert last["accuracy/chosen_shorter/val"] == after["chosen_shorter"]["accuracy"]
    assert last["pairs/chosen_shorter/val"] == after["chosen_shorter"]["n"]
    assert after["shorter_wins_heuristic"] == pytest.approx((counts[1] + 0.5 * counts[2]) / sum(counts))
    # the overall accuracy is the count-weighted mean of the buckets'
    overall = sum(after[b]["accuracy"] * after[b]["n"] for b in ("chosen_longer", "chosen_shorter", "same_length")
                  if after[b]["n"]) / sum(counts)
    assert report["val_accuracy"] == pytest.approx(overall, abs=1e-6)  # summed in float32

    def no_reference_forward(*args, **kwargs):
        raise AssertionError("the reference forward ran although its log-probs are cached")

    monkeypatch.setattr(dpo, "_compute_reference", no_reference_forward)
    _, again = run(tmp_path, "again", *common)
    assert again["reference"]["forwards"] == 0
    losses_of = lambda d: [r["loss/train"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))  # noqa: E731
                           if "loss/train" in r]
    assert losses_of("again") == losses_of("robust")
    _, plain = run(tmp_path, "plain", "train.max_steps=2", "log.every=1")
    assert losses_of("plain")[0] != losses_of("robust")[0]  # the length controls change the loss from step 1


def test_rankings_become_pairs(tmp_path):
    rows = [{"prompt": "Pick a color", "responses": ["Blue", "Green", "Red", "Beige"], "ranks": [0, 1, 1, 2]}]
    examples = formats.convert_records([formats.Record(r, formats.Origin("x.jsonl", 1)) for r in rows], "ranking",
                                       "preference")
    every = formats.ranking_pairs(examples, "all_pairs")
    assert len(every) == 5  # C(4, 2) = 6 pairs minus the tie Green = Red
    assert {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in every} == {
        ("Blue", "Green"), ("Blue", "Red"), ("Blue", "Beige"), ("Green", "Beige"), ("Red", "Beige")}
    extremes = formats.ranking_pairs(examples, "best_worst")
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in extremes] == [("Blue", "Beige")]


# ---- bad input ------------------------------------------------------------------------------------------------

def test_identical_pair_is_reported_with_its_line_and_counted_when_skipped(tmp_path):
    rows = polite_vs_rude(16)
    rows[3] = {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs.jsonl:4.*identical"):
        run(tmp_path, "strict", f"data.train.path={path}", "data.train.skip_invalid=false", "train.max_steps=1")
    assert not (tmp_path / "strict").exists()  # bad input leaves no run folder
    _, report = run(tmp_path, "lenient", f"data.train.path={path}", "data.train.skip_invalid=true",
                    "train.max_steps=1", "data.validation_fraction=0")
    assert report["data"]["skipped_records"] == {"chosen and rejected are identical": 1}


def test_empty_response_is_an_error_naming_file_line_and_field(tmp_path):
    rows = polite_vs_rude(8)
    rows[5]["rejected"] = "   "
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs.jsonl:6.*'rejected'.*empty"):
        run(tmp_path, "empty", f"data.train.path={path}", "data.train.skip_invalid=false")


@pytest.mark.parametrize("overrides, message", [
    (["loss.type=robust"], "label_smoothing > 0"),
    (["loss.type=ipo", "loss.label_smoothing=0.1"], "label_smoothing applies"),
    (["loss.type=simpo", f"reference.name_or_path={TINY}"], "reference-free"),
    (["loss.kind=sigmoid"], "kind"),
])
def test_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DPOConfig, TINY_DPO, [f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["loss.type=ipo", "loss.rdpo_alpha=0.01"], r"loss.rdpo_alpha \(R-DPO\) applies to type sigmoid, robust or hinge"),
    (["loss.type=simpo", "loss.rdpo_alpha=0.01"], r"loss.rdpo_alpha \(R-DPO\) applies .* not simpo"),
    (["loss.type=simpo", "loss.ld_alpha=0.5"], r"loss.ld_alpha \(LD-DPO\) re-weights the reference's log-probs"),
])
def test_length_controls_on_a_loss_they_do_not_apply_to_are_refused_before_the_run(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DPOConfig, TINY_DPO, [f"output_dir={tmp_path / 'run'}", *overrides])
    assert not (tmp_path / "run").exists()


# ---- a DPO policy as a reward model ---------------------------------------------------------------------------

def test_evaluate_policy_scores_the_implicit_reward_like_training(tmp_path, tiny_pretrained):
    """reward_models.evaluate --policy on a LoRA adapter folder (reference: its base, adapters disabled) gives
    the held-out accuracy the run itself reported, on the same pairs."""
    path = write_jsonl(tmp_path / "pairs.jsonl", polite_vs_rude(32))
    _, report = run(tmp_path, "lora", f"model.name_or_path={tiny_pretrained}", "model.init=pretrained",
                    "lora.enabled=true", "lora.r=4", f"data.train.path={path}", f"data.validation.path={path}",
                    "data.validation_fraction=0", "train.max_steps=3", "train.learning_rate=1e-2",
                    "data.train.skip_invalid=false")
    out = subprocess.run([sys.executable, "-m", "reward_models.evaluate", "--policy", str(tmp_path / "lora" / "model"),
                          "--data", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["n"] == 32
    assert summary["accuracy"] == pytest.approx(report["val_accuracy"], abs=1e-9)
    assert 0 <= summary["ci95"][0] <= summary["accuracy"] <= summary["ci95"][1] <= 1


def test_evaluate_policy_uses_the_reference_an_adapter_was_trained_against(tmp_path, tiny_pretrained):
    """LoRA DPO against a separate `reference:` model: the implicit reward is scored against that recorded reference,
    not the adapter's base with adapters disabled, so the held-out accuracy is the run's own."""
    other = tmp_path / "other-reference"
    tiny_causal_lm(init_std=0.1, seed=11).save_pretrained(other)
    path = write_jsonl(tmp_path / "pairs.jsonl", polite_vs_rude(32))
    _, report = run(tmp_path, "lora", f"model.name_or_path={tiny_pretrained}", "model.init=pretrained",
                    "lora.enabled=true", "lora.r=4", f"data.train.path={path}", f"data.validation.path={path}",
                    "data.validation_fraction=0", "train.max_steps=2", "train.learning_rate=1e-2",
                    "data.train.skip_invalid=false", f"reference.name_or_path={other}", "reference_cache=false")
    assert report["val_accuracy_before"] != 0.5  # another reference: the margins start away from 0
    from reward_models.implicit import ImplicitRewardScorer

    folder = tmp_path / "lora" / "model"
    scorer = ImplicitRewardScorer(str(folder))
    assert scorer.description["reference"] == str(other)
    pairs = [formats.PreferenceExample([{"role": "user", "content": r["prompt"]}],
                                       [{"role": "assistant", "content": r["chosen"]}],
                                       [{"role": "assistant", "content": r["rejected"]}])
             for r in polite_vs_rude(32)]
    chosen = scorer.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = scorer.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    margin = chosen - rejected
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()
    assert accuracy == pytest.approx(report["val_accuracy"], abs=1e-9)


# ---- resume and processes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["on", "off"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, cache):
    """A crash after step 3 of 6: resuming from the step-2 checkpoint gives the same losses and final weights. With
    the cache off the reference is recomputed from the policy before the checkpoint is loaded into it."""
    import shutil

    from safetensors.torch import load_file

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    common = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5", "log.every=1",
              f"reference_cache={'true' if cache == 'on' else 'false'}", "overwrite=false"]
    run(tmp_path, "whole", *common)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    for leftover in ("checkpoints/step-000004", "checkpoints/step-000006", "model"):
        shutil.rmtree(crashed / leftover, ignore_errors=True)
    (crashed / "report.json").unlink()
    run(tmp_path, "crashed", *common, "resume=true")

    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "whole", crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(folder):
        logged = map(json.loads, open(folder / "metrics.jsonl"))
        return [(r["step"], r["loss/train"], r["accuracy/train"]) for r in logged if "loss/train" in r]

    assert rows(crashed) == rows(tmp_path / "whole") and len(rows(crashed)) == 6


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_match_one_process(tmp_path):
    """The reference pass splits its chunks over processes and gathers them (a cache miss), or every process reads
    the cache (a hit); training splits each batch. Both match one process."""
    import os

    overrides = ["log.every=1", "train.max_steps=3", "log.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "align.dpo", TINY_DPO]
    runs = {"one": [sys.executable, "-m", "align.dpo", TINY_DPO, "reference_cache=false"],
            "two-cold": launch, "two-warm": launch}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, f"output_dir={tmp_path / name}", *overrides], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    reports = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in runs}
    assert reports["two-cold"]["reference"]["forwards"] > 0 and reports["two-warm"]["reference"]["forwards"] == 0
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]  # noqa: E731
    pick = lambda rs, k: [r[k] for r in rs if k in r]  # noqa: E731
    one = rows("one")
    assert len(pick(one, "loss/train")) == 3
    for two in ("two-cold", "two-warm"):
        for key in ("loss/train", "accuracy/train", "loss/val", "accuracy/val", "rewards/margin/val"):
            assert pick(one, key) == pytest.approx(pick(rows(two), key), abs=1e-5), (two, key)
