"""align.label rank --policy: candidates sampled once from several policies, kept beside --out, reused on restart."""

import json
import subprocess
import sys

from align import rollout
from align.config import DataSource
from align.label.sample import sample_candidates

from helpers import ROOT, LabelServer, tiny_causal_lm

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
    prompts = DataSource(path=str(write_jsonl(tmp_path / "p.jsonl", PROMPTS)))
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


def test_the_cli_samples_once_keeps_the_candidates_and_refuses_other_settings_on_restart(tmp_path, tiny_pretrained):
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

    server = LabelServer(*args)  # a restart reuses them: nothing is sampled again
    assert any("sampled by an earlier run" in line for line in server.output)
    server.stop()
    assert kept.read_bytes() == before

    other = [*args, "--seed", "1", "--port", "0"]  # another seed: other candidates than those kept
    run = subprocess.run([sys.executable, "-m", "align.label", *other], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert "holds candidates sampled with other prompts, policies or settings" in run.stderr.strip().splitlines()[-1]
    assert kept.read_bytes() == before and out.read_text() == ""
