"""The whole chain as one command: SFT -> reward model -> DPO and/or PPO -> evaluation, in one run folder with one
report.

    python -m align.pipeline recipes/smollm2-135m/pipeline_hh.yaml [key=value ...]
    accelerate launch --num_processes 8 -m align.pipeline recipes/smollm2-135m/pipeline_hh_gpu.yaml

Each stage is the stage's own recipe (align/sft.py, rm.py, dpo.py, ppo.py), run in this process in
OUTPUT_DIR/<stage>/. Its settings are layered (later wins): the stage's schema <- its recipe file (`<stage>.recipe`)
<- what the pipeline wires in from earlier stages <- its inline settings (`<stage>.overrides`). The wiring:

    sft -> dpo, ppo   the SFT model (merged, under LoRA) is their starting policy and so their KL reference
    rm  -> ppo        the reward model is PPO's reward (and its critic's start when the two share a tokenizer)

DPO and PPO both start from SFT: they are alternatives, and the evaluation compares each with the SFT model.
Every stage's config (batch splits over the launched processes included), the evaluation's prompts and the recorded
settings of complete stages are checked before the first stage runs, so a typo fails in seconds, not hours.

Re-running the same command: a stage whose folder holds a complete run made with the same settings and inputs is
skipped (the log says so); one that failed resumes from its own last checkpoint (`train.save_every`) if its settings
and inputs are those it started with; otherwise (a complete or unfinished stage whose settings or inputs changed) it
is an error (pass overwrite=true, or delete that stage's folder and the later ones). OUTPUT_DIR/pipeline.json
records each stage's state, fingerprint and time.

The end: each trained policy is evaluated against the baseline (align/evaluate.py) in OUTPUT_DIR/eval_<stage>/, and
OUTPUT_DIR/report.md (with report.json and PNG curves) gathers every stage's headline numbers.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Optional

import torch

from . import card, formats, train
from .config import (
    STAGES,
    AlignError,
    ConfigError,
    EvalConfig,
    PipelineConfig,
    RewardConfig,
    interrupted,
    load_config,
    parse_cli,
    read_yaml,
    to_yaml,
)
from .evaluate import show

log = logging.getLogger("align")
POLICY_STAGES = ("sft", "dpo", "ppo", "grpo")


# --------------------------------------------------------------------------------------------------------------
# The plan: every stage's config, built and checked up front


@dataclass
class Stage:
    name: str
    cfg: Any  # the stage's config object (SFTConfig, RMConfig, DPOConfig, PPOConfig)
    inputs: list[str]  # earlier stages whose outputs it reads

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output_dir)


def policy_output(stage_cfg: Any) -> str:
    """Where a policy stage leaves its model: the merged model under LoRA (a plain folder that any stage loads and
    puts new adapters on) when it writes one, else model/ (full weights, or the adapter folder)."""
    merged = stage_cfg.lora.enabled and stage_cfg.save_merged
    return str(Path(stage_cfg.output_dir) / ("merged" if merged else "model"))


def read_recipe(path: Optional[str], where: str) -> dict:
    return {} if path is None else read_yaml(path, where)


def plan(cfg: PipelineConfig, where: str, num_processes: int = 1) -> list[Stage]:
    """Every stage's config, layered and checked, with the stages it reads."""
    root = Path(cfg.output_dir)
    stages: list[Stage] = []
    built: dict[str, Any] = {}
    for name in cfg.stages:
        spec = getattr(cfg, name)
        stage_where = f"{where}: stage {name}" + (f" ({spec.recipe})" if spec.recipe else "")
        if spec.recipe is None and not spec.overrides:
            raise ConfigError(f"{where}: stage {name} has neither {name}.recipe nor {name}.overrides")
        recipe = read_recipe(spec.recipe, stage_where)
        wired: dict[str, Any] = {"output_dir": str(root / name), "resume": True, "overwrite": False}
        inputs = []
        if name == "sft":
            wired["save_merged"] = True
        if name in POLICY_STAGES and cfg.forgetting:
            wired["forgetting"] = {"enabled": True}
        if name in ("dpo", "ppo", "grpo") and "sft" in built:
            wired["model"] = {"name_or_path": policy_output(built["sft"]), "gguf_file": None, "init": "pretrained"}
            inputs.append("sft")
        named = {**(recipe.get("reward") or {}), **(spec.overrides.get("reward") or {})}
        own_reward = any(named.get(k) for k in ("rule", "model", "function", "terms"))
        if name == "ppo" and "rm" in built or name == "grpo" and "rm" in built and not own_reward:
            # PPO: the recipe's reward (a rule, or another model) gives way to the trained reward model; its other
            # settings (max_length) stay. GRPO keeps a reward its recipe names (a rule checks answers better than a
            # reward model) and takes the rm stage's model otherwise.
            theirs = recipe.get("reward") or {}
            if theirs.get("rule") or theirs.get("model"):
                log.info("stage ppo: the recipe's reward (%s) gives way to the rm stage's reward model",
                         f"rule {theirs['rule']}" if theirs.get("rule") else theirs["model"])
            recipe["reward"] = {k: v for k, v in theirs.items() if k not in ("rule", "rule_args", "model")}
            wired["reward"] = {"model": str(Path(built["rm"].output_dir) / "model"), "rule": None}
            inputs.append("rm")
        built[name] = load_config(STAGES[name], layers=[recipe, wired, spec.overrides], where=stage_where)
        feeds = [n for n in ("dpo", "ppo", "grpo") if n in cfg.stages]
        check_stage(name, built[name], num_processes, stage_where, feeds=feeds)
        stages.append(Stage(name, built[name], inputs))
    return stages


def check_stage(name: str, cfg: Any, num_processes: int, where: str, feeds: list[str]) -> None:
    """What a stage would only find out once it starts (hours in, for the last one): its batches must split over
    the processes, and SFT must leave a merged model for the stages that start from it."""
    try:
        train.check_batch_split(cfg.train, num_processes)
        if name in ("ppo", "grpo"):
            mini = cfg.algorithm.mini_batch_size or cfg.train.batch_size * cfg.rollout.n
            if mini % (num_processes * cfg.train.micro_batch_size):
                raise ConfigError(f"algorithm.mini_batch_size={mini} is not a multiple of train.micro_batch_size x "
                                  f"processes = {cfg.train.micro_batch_size} x {num_processes}")
        if name == "sft" and cfg.lora.enabled and not cfg.save_merged and feeds:
            raise ConfigError(f"save_merged=false: {' and '.join(feeds)} start from SFT's merged model")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def stage_main(name: str):
    from . import dpo, ppo, rm, sft

    return {"sft": sft.main, "rm": rm.main, "dpo": dpo.main, "ppo": ppo.main, "grpo": ppo.main}[name]


# --------------------------------------------------------------------------------------------------------------
# Bookkeeping: pipeline.json (main process only)


class Ledger:
    """OUTPUT_DIR/pipeline.json: per stage its status (running, failed, complete), fingerprint and seconds."""

    def __init__(self, root: Path, is_main: bool):
        self.path, self.is_main = root / "pipeline.json", is_main
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}, "evaluations": {}}

    def set(self, group: str, name: str, **fields) -> None:
        self.state[group].setdefault(name, {}).update(fields)
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            train.write_json_atomic(self.path, self.state)

    def get(self, group: str, name: str) -> dict:
        return self.state[group].get(name, {})


def fingerprint(identity: dict, input_files: list[Path]) -> str:
    """Identity of a step's work: its settings and its data files' contents (`train.run_identity`), and the exact
    outputs of earlier stages it reads (their report files, which change whenever the stage that wrote them runs
    again)."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for path in input_files:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_fingerprint(stage: Stage) -> str:
    """Settings that change what a stage produces (not logging, progress bars or how often it checkpoints), its data
    by content, and the outputs it reads."""
    return fingerprint(train.run_identity(stage.cfg, stage.name),
                       [stage.folder.parent / name / "report.json" for name in stage.inputs])


def release_memory() -> None:
    """Between stages: drop the last stage's models and let the next stage build its own accelerate state (stages
    may ask for different precisions; the process group, PartialState, is kept)."""
    from accelerate.state import AcceleratorState

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    AcceleratorState._reset_state()


def is_complete(stage: Stage, ledger: Ledger) -> bool:
    """The stage's folder holds a finished run of exactly these settings and inputs; a finished run of other ones
    is an error (its outputs would silently feed the later stages)."""
    if not (stage.folder / "report.json").is_file():
        return False
    if ledger.get("stages", stage.name).get("fingerprint") != stage_fingerprint(stage):
        raise ConfigError(
            f"stage {stage.name}: {stage.folder} holds a complete run made with other settings or inputs; pass "
            f"overwrite=true to run the pipeline again, or delete {stage.folder} (and the stages after it)")
    return True


# What a pipeline writes at its top level (stage and evaluation folders are cleared by their own rules).
PIPELINE_FILES = ("pipeline.json", "pipeline.yaml", "report.md", "report.json", "audit.md", "audit.json",
                  *(f"curves_{name}.png" for name in STAGES))


def check_folder(root: Path) -> None:
    """The pipeline's folder is new, empty, or holds a pipeline of ours that no other process is running."""
    train.check_output_dir(root)
    if train.holds_files(root):
        if not (root / "pipeline.json").is_file():
            raise ConfigError(f"output_dir={root} holds files that are not an align pipeline; choose a new or empty "
                              f"folder (nothing in it was touched)")
        train.FolderLock(root).refuse_if_held("output_dir")


def clear_folder(root: Path) -> None:
    """overwrite=true: remove what an earlier pipeline wrote (its stages' run files, its evaluations, its report and
    ledger) and nothing else."""
    from .evaluate import EVAL_FILES

    for name in STAGES:
        if (root / name).is_dir():
            train.clear_entries(root / name, train.RUN_ENTRIES, f"earlier {name} run")
            _remove_if_empty(root / name)
    for folder in sorted(root.glob("eval_*")):
        if folder.is_dir():
            train.clear_entries(folder, EVAL_FILES, "earlier evaluation")
            _remove_if_empty(folder)
    train.clear_entries(root, PIPELINE_FILES, "earlier pipeline")


def _remove_if_empty(folder: Path) -> None:
    """A stage or evaluation folder the clearing left empty (but for its lock file, which no one holds: checked by
    clear_entries) goes too."""
    if not train.holds_files(folder):
        (folder / train.LOCK_FILE).unlink(missing_ok=True)
        folder.rmdir()


def run_stage(stage: Stage, index: int, total: int, ledger: Ledger) -> dict:
    if is_complete(stage, ledger):
        log.info("stage %d/%d %s: complete in %s, skipped", index, total, stage.name, stage.folder)
        return json.loads((stage.folder / "report.json").read_text())
    fp = stage_fingerprint(stage)
    checkpoints = sorted((stage.folder / "checkpoints").glob("step-*")) if stage.folder.is_dir() else []
    if checkpoints and ledger.get("stages", stage.name).get("fingerprint") != fp:
        raise ConfigError(
            f"stage {stage.name}: {stage.folder} holds an unfinished run started with other settings or inputs; "
            f"restore them to resume it, or delete {stage.folder} to start the stage again")
    if checkpoints:
        log.info("stage %d/%d %s: resuming the failed run in %s from %s", index, total, stage.name, stage.folder,
                 checkpoints[-1].name)
    else:
        log.info("stage %d/%d %s: running in %s", index, total, stage.name, stage.folder)
    # The fingerprint goes in first: a run that dies (even after writing report.json) is resumed or recognised
    # only under the same settings and inputs.
    ledger.set("stages", stage.name, status="running", fingerprint=fp, error=None)
    start = time.perf_counter()
    try:
        report = stage_main(stage.name)(stage.cfg)
    except BaseException as err:
        ledger.set("stages", stage.name, status="failed", error=f"{type(err).__name__}: {err}"[:500])
        raise
    finally:
        release_memory()
    seconds = time.perf_counter() - start
    ledger.set("stages", stage.name, status="complete", seconds=seconds)
    log.info("stage %d/%d %s: done in %s", index, total, stage.name, _duration(seconds))
    return report


# --------------------------------------------------------------------------------------------------------------
# Evaluation of each trained policy against the baseline


def start_of(stage_cfg: Any) -> str:
    """The model a stage started from, as one location (a GGUF file inside a folder joined to its path)."""
    m = stage_cfg.model
    return str(Path(m.name_or_path) / m.gguf_file) if m.gguf_file else m.name_or_path


def evaluation_plan(cfg: PipelineConfig, stages: list[Stage]) -> tuple[list[tuple[str, EvalConfig]], Optional[str]]:
    """(policy stage, its EvalConfig) pairs, or why there are none. The baseline is evaluate.baseline when set,
    else SFT's model for DPO and PPO (SFT's own start when SFT is the only policy stage), else each stage's start."""
    by_name = {s.name: s for s in stages}
    ev = cfg.evaluate
    for owned in ("policy", "output_dir"):
        if getattr(ev, owned) is not None:
            raise ConfigError(f"evaluate.{owned}: the pipeline sets it (each trained policy, eval_<stage>/)")
    if ev.prompts is None:
        return [], "evaluate.prompts is not set"
    reward = ev.reward
    if reward is None and "rm" in by_name:
        reward = RewardConfig(model=str(by_name["rm"].folder / "model"))
    elif reward is None and ("ppo" in by_name or "grpo" in by_name):
        reward = by_name["ppo" if "ppo" in by_name else "grpo"].cfg.reward
    if reward is None:
        return [], "no judge: no rm stage, no ppo or grpo reward and no evaluate.reward"
    candidates = [n for n in ("dpo", "ppo", "grpo") if n in by_name] or [n for n in ("sft",) if n in by_name]
    if not candidates:
        return [], "no policy stage (sft, dpo, ppo, grpo) to evaluate"
    out = []
    for name in candidates:
        baseline = ev.baseline
        if baseline is None:
            starts_from_sft = name != "sft" and "sft" in by_name
            baseline = policy_output(by_name["sft"].cfg) if starts_from_sft else start_of(by_name[name].cfg)
            if not starts_from_sft and by_name[name].cfg.model.init == "random":
                return [], f"{name} starts from random weights: there is no baseline to compare (set evaluate.baseline)"
        # overwrite: eval_<stage> is the pipeline's own folder; a changed evaluation replaces its files there.
        out.append((name, dataclass_replace(ev, policy=policy_output(by_name[name].cfg), baseline=baseline,
                                            reward=reward, output_dir=str(Path(cfg.output_dir) / f"eval_{name}"),
                                            overwrite=True)))
    return out, None


def held_out_overlap(ev: EvalConfig, stages: list[Stage]) -> list[str]:
    """Stages that trained on records the evaluation also uses (same file, overlapping record ranges)."""
    if ev.prompts is None:
        return []
    lo = ev.prompts.offset
    hi = lo + ev.prompts.limit if ev.prompts.limit is not None else float("inf")
    found = []
    for stage in stages:
        sources = [stage.cfg.data.train] + ([stage.cfg.data.validation] if stage.cfg.data.validation else [])
        for src in sources:
            s_lo = src.offset
            s_hi = s_lo + src.limit if src.limit is not None else float("inf")
            if Path(src.path).resolve() == Path(ev.prompts.path).resolve() and s_lo < hi and lo < s_hi:
                found.append(stage.name)
    return sorted(set(found))


def run_evaluations(todo: list[tuple[str, EvalConfig]], stages: list[Stage], ledger: Ledger) -> dict[str, dict]:
    from . import evaluate

    results, cache = {}, {}
    for name, ev in todo:
        out = Path(ev.output_dir)
        inputs = [s.folder / "report.json" for s in stages if s.name in (name, "sft", "rm")]
        fp = fingerprint(train.run_identity(ev, "evaluate"), inputs)
        if (out / "eval.json").is_file() and ledger.get("evaluations", name).get("fingerprint") == fp:
            log.info("evaluation of %s: complete in %s, skipped", name, out)
            results[name] = json.loads((out / "eval.json").read_text())
            continue
        log.info("evaluation of %s against %s on %s", name, ev.baseline, ev.prompts.path)
        start = time.perf_counter()
        results[name] = evaluate.main(ev, baseline_cache=cache)
        release_memory()
        ledger.set("evaluations", name, fingerprint=fp, seconds=time.perf_counter() - start)
        if ledger.is_main:  # the stage's model card gets the win rate (a rerun replaces the block)
            folder = next(s.folder for s in stages if s.name == name)
            for kind in ("model", "merged"):  # the block names the baseline and the judge
                if (folder / kind).is_dir():
                    card.add_evaluation(folder / kind, results[name], "Win rate against the baseline")
    return results


# --------------------------------------------------------------------------------------------------------------
# The report


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return train.read_jsonl_rows(path)[0] if path.is_file() else []


# Per stage: (metric key, title) of the curves worth a look, and the headline of its report.json.
CURVES = {
    "sft": [("loss/train", "training loss"), ("loss/val", "held-out loss")],
    "rm": [("loss/train", "training loss"), ("accuracy/val", "held-out accuracy")],
    "dpo": [("loss/train", "training loss"), ("accuracy/val", "held-out preference accuracy"),
            ("rewards/margin/train", "implicit reward margin")],
    "ppo": [("reward/score", "reward (rollouts)"), ("kl/ref", "KL to the reference"),
            ("response/length", "response length (tokens)")],
    "grpo": [("reward/score", "reward (rollouts)"), ("kl/ref", "KL to the reference"),
             ("response/length", "response length (tokens)")],
}


def plot_curves(name: str, rows: list[dict], path: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [(key, title) for key, title in CURVES[name] if any(key in r for r in rows)]
    if not curves:
        return False
    fig = Figure(figsize=(4.2 * len(curves), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (key, title) in zip(axes, curves):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="o" if len(points) < 8 else None, ms=4)
        ax.set(title=title, xlabel="iteration" if name in ("ppo", "grpo") else "step")
        ax.grid(alpha=0.3)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def stage_headline(name: str, report: dict) -> str:
    """One line of what a stage achieved, from its report.json (the numbers its metrics.jsonl holds)."""
    if name == "sft":
        return (f"held-out loss {show(report.get('val_loss_before'), 4)} -> {show(report.get('val_loss'), 4)} "
                f"(perplexity {show(report.get('val_ppl_before'), 2)} -> {show(report.get('val_ppl'), 2)})")
    if name == "rm":
        return (f"held-out pairwise accuracy {show(report.get('val_accuracy_before'))} -> "
                f"{show(report.get('val_accuracy'))}")
    if name == "dpo":
        return (f"held-out preference accuracy {show(report.get('val_accuracy_before'))} -> "
                f"{show(report.get('val_accuracy'))}, implicit reward margin {show(report.get('val_margin_before'), 4)}"
                f" -> {show(report.get('val_margin'), 4)}")
    before, after = report.get("before", {}), report.get("after", {})
    return (f"held-out reward {show(before.get('reward/val'), 4)} -> {show(after.get('reward/val'), 4)}, KL to the "
            f"reference {show(after.get('kl/val'))}, length {show(before.get('response/length/val'), 1)} -> "
            f"{show(after.get('response/length/val'), 1)} tokens")


def eval_row(name: str, ev: dict) -> str:
    lo, hi = ev["win_rate_ci95"]
    lengths = f"{ev['length_candidate']['mean']:.1f} / {ev['length_baseline']['mean']:.1f}"
    return (f"| {name} | {ev['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {show_interval(ev, 'lc_win_rate')} | "
            f"{ev['wins']} / {ev['ties']} / {ev['losses']} | {ev['reward_candidate']:.4f} / "
            f"{ev['reward_baseline']:.4f} | {show(ev['kl'])} | {lengths} | {ev['n']} |")


def show_interval(ev: dict, key: str) -> str:
    """`0.512 [0.401, 0.620]`, or n/a when the statistic could not be estimated."""
    interval = ev.get(f"{key}_ci95")
    if ev.get(key) is None or interval is None:
        return show(ev.get(key))
    return f"{ev[key]:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


EVAL_HEADER = ("| policy | win rate [95% CI] | LC win rate [95% CI] | wins / ties / losses "
               "| mean reward (policy / baseline) | KL to baseline | length, tokens (policy / baseline) | prompts |\n"
               "| --- | --- | --- | --- | --- | --- | --- | --- |")


def precision_lines(stages: list[Stage], reports: dict[str, dict], evals: dict[str, dict]) -> list[str]:
    """What each stage and evaluation computed in, and why (their reports' `precision`), one line per decision."""
    used: dict[str, list[str]] = {}
    for name, report in [*((s.name, reports[s.name]) for s in stages), *((f"eval {n}", ev) for n, ev in evals.items())]:
        p = report.get("precision")
        if p:  # absent from reports written before precision was recorded
            used.setdefault(f"{p['used']} ({'auto: ' if p['asked'] == 'auto' else ''}{p['reason']})", []).append(name)
    return ["", *(f"Precision of {', '.join(names)}: {what}." for what, names in used.items())] if used else []


def forgetting_line(name: str, f: dict) -> str:
    """One stage's forgetting check, as measured (its report's `forgetting`)."""
    loss = f.get("text_loss") or {}
    kl = f.get("kl_from_start") or {}
    parts = [f"general-text loss {show(loss.get('before'), 4)} -> {show(loss.get('after'), 4)} (rise "
             f"{show(loss.get('rise'), 4)}, 95% CI {_ci(loss.get('ci95'))})",
             f"KL from its start on general prompts {show(kl.get('value'), 4)} (95% CI {_ci(kl.get('ci95'))})"]
    em = f.get("exact_match")
    if em:
        parts.append(f"exact-match accuracy {show(em.get('before'))} -> {show(em.get('after'))}")
    verdict = "**flagged**: " + "; ".join(f.get("flags", [])) if f.get("flagged") else "not flagged"
    return f"- {name}: {', '.join(parts)}; {verdict}."


def _ci(ci: Optional[list]) -> str:
    return "n/a" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def length_warning(name: str, report: dict) -> Optional[str]:
    """Whether a stage's held-out accuracy after training is carried by length (reward_models.metrics.length_carried,
    on the accuracy split by which response is longer: the rm stage's validation report, DPO's val_by_length)."""
    from reward_models.metrics import length_carried

    split = (report.get("validation") or {}).get("length_bias") if name == "rm" else report.get("val_by_length")
    return length_carried(split) if split else None


def safeguard_lines(stages: list[Stage], reports: dict[str, dict], audit_counts: Optional[dict]) -> list[str]:
    """The report's safeguards: what the data audit found, each stage's forgetting check, results carried by length,
    and early stopping."""
    lines = ["", "## Safeguards", ""]
    if audit_counts:
        c = audit_counts
        lines.append(f"Data audit (audit.md): {c['records']} records read by the stages; {c['exact_duplicates']} exact "
                     f"and {c['near_duplicates']} near duplicates, {c['leaks']} held-out records also in training "
                     f"data, {c['contradictory_pairs']} contradictory pairs, {c['empty_responses']} empty responses, "
                     f"{c['personal_data']} personal-data values (e-mail, phone, card numbers; lines in audit.md).")
    else:
        lines.append("Data audit: off (audit.enabled=false).")
    checked = [(s.name, reports[s.name]["forgetting"]) for s in stages if reports[s.name].get("forgetting")]
    if checked:
        lines += ["", "Forgetting (each policy stage against the model it started from, on general text and prompts "
                      "it was not trained on):", ""]
        lines += [forgetting_line(name, f) for name, f in checked]
    for s in stages:
        warning = length_warning(s.name, reports[s.name])
        if warning:
            lines += ["", f"**Carried by length ({s.name}):** {warning}"]
    for s in stages:
        es = reports[s.name].get("early_stopping")
        if es:
            stopped = f"stopped at step {es['stopped_at']}" if es.get("stopped_at") is not None else "ran to the end"
            kept = reports[s.name].get("final_model", "last")
            lines += ["", f"Early stopping ({s.name}): {stopped}; best {es['metric']} {show(es.get('best'), 4)} at "
                          f"step {es.get('best_step')}; model/ holds the {kept}."]
    return lines


def write_report(cfg: PipelineConfig, stages: list[Stage], reports: dict[str, dict], evals: dict[str, dict],
                 ledger: Ledger, overlap: list[str], audit_counts: Optional[dict] = None) -> Path:
    root = Path(cfg.output_dir)
    lines = [f"# align pipeline: {root}", "",
             f"Stages: {' -> '.join(s.name for s in stages)}. Every number below is read from the stage's report.json "
             f"(the same values as its metrics.jsonl) and the evaluations' eval.json.", "",
             "| stage | result | time | folder |", "| --- | --- | --- | --- |"]
    for s in stages:
        seconds = ledger.get("stages", s.name).get("seconds")
        lines.append(f"| {s.name} | {stage_headline(s.name, reports[s.name])} | {_duration(seconds)} | `{s.folder}` |")
    lines += precision_lines(stages, reports, evals)
    if evals:
        first = next(iter(evals.values()))
        sampling = first["sampling"]
        lines += ["", "## Policies against the baseline", "",
                  f"Baseline `{first['baseline']}`; judge `{first['judge']}`; {first['n']} held-out prompts from "
                  f"`{cfg.evaluate.prompts.path}`; both sides sampled with temperature {sampling['temperature']}"
                  f", at most {sampling['max_new_tokens']} new tokens, seed {sampling['seed']}. "
                  f"LC: length-controlled (the reward difference regressed on the length difference). KL: "
                  f"KL(policy || baseline) per response, in nats, on the policy's samples.", "", EVAL_HEADER]
        lines += [eval_row(name, ev) for name, ev in evals.items()]
        if overlap:
            lines += ["", f"**Warning:** the evaluation prompts overlap the training records of {', '.join(overlap)}; "
                          f"these win rates are not held out."]
        for name, ev in evals.items():
            rel = Path(ev["output_dir"]).relative_to(root) if "output_dir" in ev else Path(f"eval_{name}")
            plots = [(title, f"{rel}/{file}") for title, file in
                     (("rewards", "rewards.png"), ("KL vs reward", "kl_vs_reward.png"), ("lengths", "lengths.png"))
                     if (root / rel / file).is_file()]  # no KL plot where the KL is not defined (top_p < 1)
            lines += ["", f"### {name}", "", " ".join(f"![{title}]({path})" for title, path in plots)]
    lines += safeguard_lines(stages, reports, audit_counts)
    lines += ["", "## Stages"]
    for s in stages:
        lines += ["", f"### {s.name}", "", stage_headline(s.name, reports[s.name]) + "."]
        if plot_curves(s.name, read_metrics(s.folder), root / f"curves_{s.name}.png"):
            lines += ["", f"![{s.name} curves](curves_{s.name}.png)"]
    path = root / "report.md"
    train.write_text_atomic(path, "\n".join(lines) + "\n")
    train.write_json_atomic(root / "report.json", {
        "stages": {s.name: {"folder": str(s.folder), "headline": stage_headline(s.name, reports[s.name]),
                            "seconds": ledger.get("stages", s.name).get("seconds"), "report": reports[s.name]}
                   for s in stages},
        "evaluations": evals, "evaluation_overlaps_training": overlap, "audit": audit_counts})
    return path


# --------------------------------------------------------------------------------------------------------------
# The recipe


def main(cfg: PipelineConfig, where: str = "pipeline") -> dict:
    from accelerate import PartialState

    # cpu=True without CUDA: under `accelerate launch` on CPUs the processes then see each other (gloo), as the
    # stages' own accelerators do; otherwise every process would think it is the only one.
    state = PartialState(cpu=not torch.cuda.is_available())
    is_main = state.is_main_process
    train.setup_logging(is_main)  # the stages set it up too, but a rerun may skip them all
    # ---- checked before anything runs: every stage's config, the evaluation, the held-out promise ----------------
    stages = plan(cfg, where, state.num_processes)
    evaluations, why_not = evaluation_plan(cfg, stages)
    if why_not:
        log.warning("there will be no evaluation: %s", why_not)
    for _, ev in evaluations[:1]:
        formats.check_readable(ev.prompts, "evaluate.prompts", "prompt")
    overlap = held_out_overlap(cfg.evaluate, stages) if evaluations else []
    if overlap:
        log.warning("the evaluation prompts overlap the training records of %s: the win rates will not be held out",
                    ", ".join(overlap))
    found = None
    if cfg.audit.enabled:  # the whole chain's data, and the evaluation prompts against every stage's training data
        from . import audit

        found = audit.audit_pipeline(cfg, where)
        log.info("%s", found.summary())
        if cfg.audit.fail_on_leak and found.leaks:
            raise ConfigError(f"the data audit found {found.leaks} held-out record(s) that are also in training data "
                              f"(audit.fail_on_leak=true); `python -m align.data audit {where}` names their lines")
    root = Path(cfg.output_dir)
    check_folder(root)
    if not cfg.overwrite:
        ledger = Ledger(root, is_main)
        for stage in stages:  # a complete stage whose settings changed fails here, before anything is written
            if not is_complete(stage, ledger):
                break
    lock = train.FolderLock(root)  # one pipeline per folder, for its whole life
    state.wait_for_everyone()  # every process has checked the folder before the main one writes in it
    if is_main:
        train.make_dir(root)
        lock.acquire()
        if cfg.overwrite:
            clear_folder(root)
        train.write_text_atomic(root / "pipeline.yaml", to_yaml(cfg))
        if found is not None:
            found.write(root)
    state.wait_for_everyone()
    ledger = Ledger(root, is_main)

    # ---- the stages, then the evaluations, then the report ------------------------------------------------------
    start = time.perf_counter()
    reports = {}
    for i, stage in enumerate(stages, 1):
        reports[stage.name] = run_stage(stage, i, len(stages), ledger)
    evals = run_evaluations(evaluations, stages, ledger)
    summary = {"report": str(root / "report.md"), "seconds": time.perf_counter() - start,
               "stages": {s.name: stage_headline(s.name, reports[s.name]) for s in stages},
               "evaluations": {name: {k: ev.get(k) for k in ("win_rate", "win_rate_ci95", "lc_win_rate",
                                                             "lc_win_rate_ci95", "kl", "n")}
                               for name, ev in evals.items()}}
    if is_main:
        path = write_report(cfg, stages, reports, evals, ledger, overlap, found.counts if found else None)
        print_headline(summary, path)
    lock.release()
    return summary


def print_headline(summary: dict, path: Path) -> None:
    print(f"\nreport: {path}")
    for name, line in summary["stages"].items():
        print(f"  {name:4s} {line}")
    for name, ev in summary["evaluations"].items():
        lo, hi = ev["win_rate_ci95"]
        print(f"  {name} vs baseline: win rate {ev['win_rate']:.3f} [{lo:.3f}, {hi:.3f}], length-controlled "
              f"{show_interval(ev, 'lc_win_rate')}, KL {show(ev['kl'])} ({ev['n']} prompts)")
    print(f"  total {_duration(summary['seconds'])} (this invocation)")
    sys.stdout.flush()


def cli() -> None:
    cfg = None
    try:
        cfg = parse_cli(PipelineConfig, sys.argv[1:], "python -m align.pipeline")
        main(cfg, sys.argv[1] if len(sys.argv) > 1 else "pipeline")
    except AlignError as err:  # a bad recipe, bad data (DataError), a stopped run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        stopped = None
        if cfg is not None and (Path(cfg.output_dir) / "pipeline.json").is_file():
            ledger = json.loads((Path(cfg.output_dir) / "pipeline.json").read_text())
            stopped = next((n for n, e in ledger["stages"].items() if e.get("status") == "failed"), None)
        again = "rerunning the same command skips the complete stages and resumes this one"
        line = interrupted(str(Path(cfg.output_dir) / stopped), again) if stopped else f"interrupted; {again}"
        print(line, file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
