"""The run folder keeps a user's files safe: overwrite touches only a run's own files, one run per folder (a lock),
nothing unpickled on resume, damaged checkpoints and metric logs survived, non-finite losses stopped, Ctrl-C one
line, and a resumed or skipped run must be the same run (stage, settings, data by content)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from align import losses, sft, train
from align.config import ConfigError, SFTConfig, load_config

from helpers import ROOT

TINY_SFT = "recipes/tiny/sft.yaml"


def config(out, *overrides):
    return load_config(SFTConfig, TINY_SFT, [f"output_dir={out}", "log.progress=false", "overwrite=false",
                                             *overrides])


def run(out, *overrides):
    return sft.main(config(out, *overrides))


def cli(*args, timeout=300):
    """`python -m align.sft` on the tiny recipe (whose overwrite=true is turned off unless `args` set it)."""
    overwrite = [] if any(a.startswith("overwrite=") for a in args) else ["overwrite=false"]
    return subprocess.run([sys.executable, "-m", "align.sft", TINY_SFT, "log.progress=false", *overwrite, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- overwrite: only a run's own files ------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_run_and_touches_nothing(tmp_path, monkeypatch):
    """`output_dir=. overwrite=true` once deleted a whole checkout, .git included."""
    checkout = tmp_path / "checkout"
    (checkout / ".git" / "objects").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (checkout / "notes.md").write_text("my notes\n")
    before = snapshot(checkout)
    done = subprocess.run([sys.executable, "-m", "align.sft", str(ROOT / TINY_SFT), "output_dir=.", "overwrite=true",
                           "train.max_steps=1", "log.progress=false",
                           f"data.train.path={ROOT / 'data/gsm8k_400.jsonl'}",
                           f"model.name_or_path={ROOT / 'recipes/tiny/model'}"],
                          cwd=checkout, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: output_dir=. holds files that are not an align run; choose a new or empty folder (nothing in it was "
        "touched)"]
    assert snapshot(checkout) == before


def test_overwrite_replaces_the_run_files_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "run"
    run(out, "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=5")
    (out / "my_notes.txt").write_text("keep me")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.png").write_bytes(b"png")
    old_checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert old_checkpoints == ["step-000001"]
    run(out, "train.max_steps=1", "overwrite=true")
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "analysis" / "plot.png").read_bytes() == b"png"
    assert not (out / "checkpoints").exists()  # the earlier run's checkpoints went with it
    assert json.loads((out / "report.json").read_text())["steps"] == 1


# ---- one run per folder ---------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from align.train import FolderLock
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
FolderLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / "run.json").write_text("{}")  # the holder's run has started
        done = cli(f"output_dir={out}", "resume=true", "train.max_steps=1")
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            f"error: output_dir={out}: another run is using this folder (process {holder.pid}); wait for it to "
            f"finish, or choose another output_dir"]
        with pytest.raises(ConfigError, match=f"process {holder.pid}"):
            train.FolderLock(out).acquire()  # the lock itself, taken at start, whatever __init__ saw
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is stale, and a new run takes it over.
    (out / "run.json").unlink()
    done = cli(f"output_dir={out}", "train.max_steps=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"took over the lock left by process {holder.pid}" in done.stdout
    assert (out / ".align.lock").read_text().strip() != str(holder.pid)


# ---- resume reads nothing that can execute code ---------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command that creates a file (what a planted checkpoint part could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state": Payload(marker)}, f)


@pytest.mark.parametrize("part", ["optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_resume_never_unpickles_a_planted_checkpoint_part(tmp_path, part):
    out = tmp_path / "run"
    run(out, "train.max_steps=4", "train.save_every=2")
    (out / "report.json").unlink()  # as if it had crashed after step 2
    checkpoint = out / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    if part == "rng-0.pt":  # a checkpoint in align 0.1's layout (no manifest; RNG state pickled)
        (checkpoint / "rng-0.json").unlink()
        (checkpoint / "manifest.json").unlink()
    plant(checkpoint / part, marker)
    if (checkpoint / "manifest.json").is_file():  # an attacker who can write files can rewrite the manifest too
        (checkpoint / "manifest.json").write_text(json.dumps(train._manifest(checkpoint)))
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        run(out, "train.max_steps=4", "train.save_every=2", "resume=true")
    assert not marker.exists(), "the planted payload ran"


def test_a_checkpoint_of_align_0_1_with_pickled_rng_state_still_resumes_safely(tmp_path):
    out = tmp_path / "run"
    run(out, "train.max_steps=4", "train.save_every=2")
    whole = load_file(out / "model" / "model.safetensors")
    checkpoint = out / "checkpoints" / "step-000002"
    state = json.loads((checkpoint / "rng-0.json").read_text())
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    import numpy as np

    legacy = {"python": (version, tuple(internal), gauss),
              "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
              "torch": train._bytes_tensor(state["torch"])}
    torch.save(legacy, checkpoint / "rng-0.pt")  # what align 0.1 wrote
    (checkpoint / "rng-0.json").unlink()
    (checkpoint / "manifest.json").unlink()
    (out / "report.json").unlink()
    run(out, "train.max_steps=4", "train.save_every=2", "resume=true")
    resumed = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# ---- damaged checkpoints and logs -----------------------------------------------------------------------------

def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one_and_a_torn_log_line_is_repaired(tmp_path, capsys):
    common = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5", "log.every=1"]
    run(tmp_path / "whole", *common)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    for leftover in ("model", "report.json"):
        shutil.rmtree(crashed / leftover) if (crashed / leftover).is_dir() else (crashed / leftover).unlink()
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    weights = crashed / "checkpoints" / "step-000004" / "model" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # cut short (disk full, say)
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/tr')  # killed mid-write
    capsys.readouterr()
    run(crashed, *common, "resume=true")
    said = capsys.readouterr().out
    assert f"step-000004 is damaged (model/model.safetensors has {size // 2} bytes, not {size})" in said
    assert "falling back to an older checkpoint" in said and "step-000002 (step 2)" in said
    assert "left out 1 damaged line(s)" in said
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(crashed / "model" /
                                                                                     "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2: the same result as never interrupted

    def rows(folder):
        return [(r["step"], r.get("loss/train")) for r in map(json.loads, open(folder / "metrics.jsonl"))]

    assert rows(crashed) == rows(tmp_path / "whole")


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    run(out, "train.max_steps=4", "train.save_every=2")
    (out / "report.json").unlink()
    (out / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 3}')
    done = cli(f"output_dir={out}", "train.max_steps=4", "train.save_every=2", "resume=true")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'checkpoints'}: no intact checkpoint to resume from (step-000002 damaged); pass "
        f"overwrite=true to start again")


# ---- the same run, or a clear refusal -------------------------------------------------------------------------

def test_resume_refuses_other_settings_another_stage_and_edited_data(tmp_path):
    data = tmp_path / "gsm.jsonl"
    shutil.copy(ROOT / "data" / "gsm8k_400.jsonl", data)
    out = tmp_path / "run"
    common = ["train.max_steps=2", f"data.train.path={data}"]
    run(out, *common)
    report = json.loads((out / "report.json").read_text())
    assert run(out, *common, "resume=true", "log.every=5", "train.save_every=1") == report  # logging: same run
    with pytest.raises(ConfigError, match=r"its settings differ: train\.learning_rate \(0\.003 -> 0\.01\)"):
        run(out, *common, "resume=true", "train.learning_rate=0.01")
    done = subprocess.run([sys.executable, "-m", "align.dpo", "recipes/tiny/dpo.yaml", f"output_dir={out}",
                           "resume=true", "overwrite=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "it holds a run of stage sft, not dpo" in done.stderr
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:2] + lines[:1] + lines[2:]))  # the same records, rewritten in place
    with pytest.raises(ConfigError, match=f"its data changed since the run started: {data}"):
        run(out, *common, "resume=true")


def test_a_resumed_run_reports_the_numbers_from_before_training(tmp_path):
    common = ["train.max_steps=4", "train.save_every=2"]
    whole = run(tmp_path / "whole", *common)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    (crashed / "report.json").unlink()
    resumed = run(crashed, *common, "resume=true")
    assert (resumed["val_loss_before"], resumed["val_ppl_before"]) == (whole["val_loss_before"],
                                                                       whole["val_ppl_before"])


# ---- bad folders, non-finite losses, Ctrl-C -------------------------------------------------------------------

def test_an_output_dir_that_is_a_file_or_under_one_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    under = f"output_dir={file / 'run'}: {file} is a file, so the folder cannot be created"
    for out, message in ((file, f"output_dir={file} is a file, not a folder"), (file / "run", under)):
        done = cli(f"output_dir={out}", "train.max_steps=1")
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {message}"]
    assert file.read_text() == "mine"


def test_a_non_finite_loss_stops_the_run_before_the_update_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    real, calls = losses.sft_loss, []

    def nan_on_step_3(logits, targets, num_targets):
        calls.append(1)
        loss = real(logits, targets, num_targets)
        return loss * float("nan") if len(calls) > 4 else loss  # 2 micro-batches a step: step 3 turns NaN

    monkeypatch.setattr(losses, "sft_loss", nan_on_step_3)
    out = tmp_path / "run"
    with pytest.raises(train.NonFiniteLoss) as err:
        run(out, "train.max_steps=6", "train.save_every=2", "log.every=1")
    assert str(err.value) == (f"{out}: step 3: loss/train is nan; stopped before the update; the last good checkpoint "
                              f"is {out / 'checkpoints' / 'step-000002'} (resume=true continues from it)")
    assert not (out / "report.json").exists()
    assert train.verify_checkpoint(out / "checkpoints" / "step-000002") is None
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss/train" in r] == [1, 2]


def test_ctrl_c_is_one_line_and_leaves_the_last_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "align.sft", TINY_SFT, f"output_dir={out}", "log.progress=false",
                             "overwrite=false", "train.max_steps=5000", "train.save_every=1", "train.eval_every=0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(out.glob("checkpoints/step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # a few more steps: the interrupt lands in training, not in the first save
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: {out} keeps its last checkpoint step-")
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert lines[0] == (f"interrupted: {out} keeps its last checkpoint {newest.name}; resume=true continues from it")
    assert train.verify_checkpoint(newest) is None
