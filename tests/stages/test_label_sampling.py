"""align.label rank --policy: candidates sampled once from several policies, kept beside --out, reused on restart."""

import json

import pytest

from align import formats, rollout
from align.config import ConfigError, DataSource
from align.label.__main__ import parse, rank_items
from align.label.sample import sample_candidates

from helpers import LabelServer, tiny_causal_lm

PROMPTS = [{"prompt": f"Tell me about the number {i}."} for i in range(4)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def second_policy(tmp_path, tiny_tokenizer):
    folder = tmp_path / "other"
    tiny_causal_lm(init_std=0.1, seed=7).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_each_policy_fills_its_share_of_the_k_responses_and_sampling_is_seeded(tmp_path, tiny_pretrained,
                                                                                tiny_tokenizer):
    prompts = formats.load_examples(DataSource(path=str(write_jsonl(tmp_path / "p.jsonl", PROMPTS))), "prompt")
    policies = [str(tiny_pretrained), str(second_policy(tmp_path, tiny_tokenizer))]
    sampling = rollout.Sampling(max_new_tokens=12, temperature=1.0)
    rows = sample_candidates(prompts, policies, 3, sampling, seed=0)
    assert len(rows) == 4
    assert all(r["policies"] == [policies[0], policies[1], policies[0]] for r in rows)
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": p["prompt"]}] for p in PROMPTS]
    assert rows == sample_candidates(prompts, policies, 3, sampling, seed=0)
    assert rows != sample_candidates(prompts, policies, 3, sampling, seed=1)
    # the two policies' responses differ (different weights), and one policy's two responses to a prompt differ
    assert any(r["responses"][0] != r["responses"][1] for r in rows)
    assert any(r["responses"][0] != r["responses"][2] for r in rows)


def test_the_cli_samples_once_and_a_restart_with_other_settings_or_prompts_is_refused(tmp_path, tiny_pretrained):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "rankings.jsonl"
    args = ["rank", "--prompts", str(prompts), "--policy", str(tiny_pretrained), "--k", "2", "--max-new-tokens", "8",
            "--out", str(out)]
    server = LabelServer(*args)
    server.stop()
    kept = tmp_path / "rankings.candidates.jsonl"
    rows = [json.loads(x) for x in kept.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["responses"]) == 2 for r in rows)
    before = kept.read_bytes()

    # a restart reads them back (checked in-process: starting the server again adds nothing to what is tested)
    items, _ = rank_items(parse(args))
    assert [it.responses for it in items] == [r["responses"] for r in rows] and kept.read_bytes() == before
    with pytest.raises(ConfigError, match="holds candidates sampled with other prompts, policies or settings"):
        rank_items(parse([*args, "--seed", "1"]))  # another seed: other candidates than those kept
    with pytest.raises(ConfigError, match="holds candidates sampled with other"):
        rank_items(parse([*args, "--n", "3"]))  # fewer prompts than were sampled
    assert kept.read_bytes() == before and out.read_text() == ""
