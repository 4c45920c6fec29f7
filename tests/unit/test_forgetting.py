"""align.forgetting against hand computations on a tiny random model: the text loss, the KL from the starting model,
the intervals, the flags, and the before file that a resumed run reads back."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from align import forgetting
from align.config import DataSource, ForgettingConfig
from align.formats import DataError

from helpers import tiny_causal_lm

TEXTS = ["The river rose after three days of rain, and the bridge was closed until the water went down.",
         "A good loaf needs flour, water, salt and time.",
         "Mount Everest is the highest mountain above sea level.",
         "She wrote the letter twice before she sent it.",
         "Cats sleep for most of the day."]
PROMPTS = ["What is the capital of France?", "How do I boil an egg?", "Name a prime number.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return text, prompts


def config(files, **kw) -> ForgettingConfig:
    text, prompts = files
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("micro_batch_size", 2)  # several micro-batches: packing and splitting are exercised
    return ForgettingConfig(enabled=True, text=DataSource(path=str(text)), prompts=DataSource(path=str(prompts)), **kw)


def model():
    return tiny_causal_lm(init_std=0.1, seed=3, attn_implementation="sdpa_packed")


def perturbed(net, scale=0.05, seed=1):
    out = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


def test_text_loss_equals_cross_entropy_by_hand(files, tiny_tokenizer, accelerator, tmp_path):
    net = model()
    check = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path, seed=0)
    before = check.before(net, 0)
    nll, tokens = [], []
    for text in TEXTS:  # each record alone, unpacked: the whole sequence's next-token loss
        ids = tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = net(x).logits[0, :-1]
        nll.append(F.cross_entropy(logits, x[0, 1:], reduction="sum").item())
        tokens.append(len(ids) - 1)
    assert before["text"]["tokens"] == tokens
    assert before["text"]["nll"] == pytest.approx(nll, rel=1e-5)
    result = check.after(net)
    assert result["text_loss"]["before"] == pytest.approx(sum(nll) / sum(tokens), rel=1e-5)
    assert result["text_ppl"]["before"] == pytest.approx(math.exp(sum(nll) / sum(tokens)), rel=1e-5)
    assert result["records"] == len(TEXTS) and result["prompts"] == len(PROMPTS)


def test_kl_and_loss_rise_are_zero_for_the_unchanged_model(files, tiny_tokenizer, accelerator, tmp_path):
    net = model()
    check = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path, seed=0)
    check.before(net, 0)
    result = check.after(net)
    assert result["kl_from_start"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    assert result["text_loss"]["rise"] == 0.0 and result["text_loss"]["ci95"] == [0.0, 0.0]
    assert result["flags"] == [] and result["flagged"] is False


def test_kl_equals_a_hand_computation_for_a_perturbed_model(files, tiny_tokenizer, accelerator, tmp_path):
    start = model()
    check = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path, seed=0)
    before = check.before(start, 0)
    trained = perturbed(start)
    result = check.after(trained)

    def logprob(net, prompt, response):  # log p(response | prompt) by a plain forward of the whole sequence
        x = torch.tensor([prompt + response])
        with torch.no_grad():
            logps = torch.log_softmax(net(x).logits[0, :-1].float(), -1)
        targets = x[0, len(prompt):]
        return logps[len(prompt) - 1:].gather(-1, targets.unsqueeze(-1)).sum().item()

    pairs = list(zip(before["kl"]["prompt_ids"], before["kl"]["response_ids"]))
    assert len(pairs) == len(PROMPTS) and all(len(r) >= 1 for _, r in pairs)
    k = [logprob(start, p, r) - logprob(trained, p, r) for p, r in pairs]
    assert before["kl"]["logprob"] == pytest.approx([logprob(start, p, r) for p, r in pairs], rel=1e-5)
    assert result["kl_from_start"]["value"] == pytest.approx(np.mean(k), rel=1e-4, abs=1e-6)
    half = forgetting.Z95 * np.std(k, ddof=1) / math.sqrt(len(k))
    assert result["kl_from_start"]["ci95"] == pytest.approx([np.mean(k) - half, np.mean(k) + half], rel=1e-4, abs=1e-6)
    assert result["kl_from_start"]["value"] > 0.1


def test_the_samples_are_seeded_and_leave_the_global_rng_alone(files, tiny_tokenizer, accelerator, tmp_path):
    net = model()
    for name in "abc":
        (tmp_path / name).mkdir()
    torch.manual_seed(123)
    a = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path / "a", seed=0).before(net, 0)
    after_check = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_check)  # measuring consumed none of the run's random numbers
    b = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path / "b", seed=0).before(net, 0)
    c = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path / "c", seed=1).before(net, 0)
    assert a["kl"]["response_ids"] == b["kl"]["response_ids"] != c["kl"]["response_ids"]


def test_loss_rise_interval_by_hand():
    # before [2, 3, 1] nats over [2, 2, 1] tokens, after [3, 3, 2]: rise = (1 + 0 + 1) / 5 = 0.4.
    # Linearised terms ((a - b) - 0.4 n) / mean(n) = [0.2, -0.8, 0.6] / (5/3) = [0.12, -0.48, 0.36]; their sd
    # (n - 1) is 0.432666, so half = 1.96 * 0.432666 / sqrt(3).
    rise, ci = forgetting.loss_rise([2, 3, 1], [3, 3, 2], [2, 2, 1])
    z = np.array([0.12, -0.48, 0.36])
    half = forgetting.Z95 * z.std(ddof=1) / math.sqrt(3)
    assert rise == pytest.approx(0.4) and ci == pytest.approx([0.4 - half, 0.4 + half])


def test_intervals_contain_the_estimate_and_shrink_with_more_records():
    rng = np.random.default_rng(0)

    def widths(m):
        tokens = rng.integers(20, 200, size=m)
        before = tokens * rng.normal(3.0, 0.3, size=m)
        after = before + tokens * rng.normal(0.2, 0.2, size=m)
        rise, (lo, hi) = forgetting.loss_rise(before, after, tokens)
        kl, (klo, khi) = forgetting.mean_ci(rng.normal(1.0, 2.0, size=m))
        assert lo < rise < hi and klo < kl < khi
        return hi - lo, khi - klo

    small, large = widths(16), widths(1600)
    assert large[0] < small[0] / 5 and large[1] < small[1] / 5  # ~ 1 / sqrt(m): 10 times narrower


def test_the_accuracy_drop_interval_is_never_zero_width():
    drop, (lo, hi) = forgetting.accuracy_drop([1, 0, 1, 0], [1, 0, 1, 0])
    assert drop == 0.0 and lo < 0 < hi
    drop, (lo, hi) = forgetting.accuracy_drop([1, 1, 1, 1, 0, 1], [0, 1, 0, 1, 0, 1])
    assert drop == pytest.approx(2 / 6) and lo < drop < hi


def result_with(rise=0.0, lo=0.01, kl=0.0, drop=None):
    out = {"text_loss": {"before": 2.0, "after": 2.0 + rise, "rise": rise, "ci95": [lo, rise + 1]},
           "kl_from_start": {"value": kl, "ci95": [kl - 1, kl + 1]}}
    if drop is not None:
        out["exact_match"] = {"before": 0.5, "after": 0.5 - drop, "drop": drop, "ci95": [drop - 0.1, drop + 0.1]}
    return out


def test_flags_fire_exactly_past_the_thresholds():
    cfg = ForgettingConfig(enabled=True, max_loss_rise=0.1, max_kl=2.0, max_accuracy_drop=0.05)
    assert forgetting.flags(result_with(rise=0.1), cfg) == []  # at the threshold: not a flag
    (line,) = forgetting.flags(result_with(rise=0.1 + 1e-9), cfg)
    assert "max_loss_rise=0.1" in line and "0.1000" in line
    assert forgetting.flags(result_with(rise=0.5, lo=0.0), cfg) == []  # the interval reaches 0: not shown to rise
    assert forgetting.flags(result_with(rise=0.5, lo=-0.2), cfg) == []
    assert forgetting.flags(result_with(kl=2.0), cfg) == []
    (line,) = forgetting.flags(result_with(kl=2.0 + 1e-9), cfg)
    assert "max_kl=2.0" in line
    assert forgetting.flags(result_with(kl=1e6), ForgettingConfig(max_kl=None)) == []  # report only
    assert forgetting.flags(result_with(drop=0.05), cfg) == []
    (line,) = forgetting.flags(result_with(drop=0.05 + 1e-9), cfg)
    assert "max_accuracy_drop=0.05" in line
    assert len(forgetting.flags(result_with(rise=1.0, kl=3.0, drop=0.5), cfg)) == 3


def test_a_resumed_run_reads_the_before_file_and_gets_the_same_result(files, tiny_tokenizer, accelerator, tmp_path):
    start = model()
    first = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path, seed=0)
    first.before(start, 0)
    trained = perturbed(start)
    whole = first.after(trained)
    kept = json.loads((tmp_path / forgetting.BEFORE_FILE).read_text())
    assert set(kept) == {"version", "text", "kl"} and kept["kl"]["response_ids"]

    resumed = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path, seed=0)
    resumed.before(None, 7)  # a resume: no starting model needed
    assert resumed.after(trained) == whole

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "Something else entirely."}) + "\n" + json.dumps({"text": "And more."}) + "\n")
    changed = forgetting.Check(config((other, files[1])), tiny_tokenizer, accelerator, tmp_path, seed=0)
    with pytest.raises(DataError, match="field 'text': it was measured on other tokens"):
        changed.before(None, 7)


def test_a_resume_without_the_before_file_reports_nothing(files, tiny_tokenizer, accelerator, tmp_path):
    check = forgetting.Check(config(files), tiny_tokenizer, accelerator, tmp_path, seed=0)
    assert check.before(None, 3) is None and check.after(model()) is None


def test_bad_records_name_the_file_line_and_field(files, tiny_tokenizer, accelerator, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text'"):
        forgetting.Check(config((bad, files[1])), tiny_tokenizer, accelerator, tmp_path, seed=0)
    questions = tmp_path / "qa.jsonl"
    questions.write_text(json.dumps({"question": "2 + 2?", "answer": "#### 4"}) + "\n" +
                         json.dumps({"question": "Why?", "answer": "Because."}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'answer'"):
        forgetting.Check(config(files, exact_match=DataSource(path=str(questions))), tiny_tokenizer, accelerator,
                         tmp_path, seed=0)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "alone"}) + "\n")
    with pytest.raises(DataError, match="at least 2 text records"):
        forgetting.Check(config((one, files[1])), tiny_tokenizer, accelerator, tmp_path, seed=0)


def test_lora_model_with_exact_match_keeps_its_mode_and_reports_every_part(files, tiny_tokenizer, accelerator,
                                                                         tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                                 for i in range(3)))
    net = get_peft_model(model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    net.train()
    cfg = config(files, exact_match=DataSource(path=str(questions)), max_new_tokens=4)
    check = forgetting.Check(cfg, tiny_tokenizer, accelerator, tmp_path, seed=0)
    # Answers stand in for greedy decoding: "I think 0" and "2" are right, "5" is not (question 2 wants 4).
    answers = iter([["I think 0", "2", "5"], ["0", "7", "5"]])
    real = forgetting.generate

    def fake_generate(net, tokenizer, prompt_ids, sampling, batch_size, acc, seeds=None):
        if sampling.temperature > 0:
            return real(net, tokenizer, prompt_ids, sampling, batch_size, acc, seeds)
        return [tokenizer(t)["input_ids"] for t in next(answers)]

    monkeypatch.setattr(forgetting, "generate", fake_generate)
    before = check.before(net, 0)
    assert net.training and before["exact_match"]["correct"] == [1, 1, 0]
    result = check.after(net)
    assert net.training
    em = result["exact_match"]
    assert (em["before"], em["after"], em["drop"]) == pytest.approx((2 / 3, 1 / 3, 1 / 3))
    assert em["ci95"][0] < em["drop"] < em["ci95"][1]
    assert set(result) == {"text_loss", "text_ppl", "kl_from_start", "exact_match", "records", "prompts", "flags",
                           "flagged"}
    assert result["flagged"] and any("max_accuracy_drop" in f for f in result["flags"])
    assert result["kl_from_start"]["value"] == 0.0  # adapters start as a no-op and nothing was trained


def test_the_shipped_file_is_the_default(tiny_tokenizer, accelerator, tmp_path):
    check = forgetting.Check(ForgettingConfig(enabled=True), tiny_tokenizer, accelerator, tmp_path, seed=0)
    rows = [json.loads(line) for line in open(forgetting.SHIPPED)]
    assert len(rows) >= 64 and len(check.texts) == forgetting.DEFAULT_TEXTS
    assert len(check.prompts) == forgetting.DEFAULT_PROMPTS
    first = tiny_tokenizer(rows[0]["text"])["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert check.texts[0].input_ids == first  # the text field as plain text, not the prompt
    assert all(set(r) == {"text", "prompt", "source"} for r in rows)
