"""The model card: a README.md in the Hugging Face model-card format in every model folder a stage saves.

    text = card.render(cfg, stage, report, folder_kind)       # folder_kind: model | merged | best
    card.write(folder, cfg, stage, report, folder_kind)      # folder/README.md (or MODEL_CARD.md, see below)
    card.add_evaluation(folder, eval_summary, label)         # the pipeline: a win rate against a baseline

The card is YAML front matter (base_model, library_name, license, datasets, language, tags, pipeline_tag: what the
Hub reads) and markdown: what was trained and how, the data files with their sha256 and record ranges, the data
audit, the held-out numbers before and after training with their intervals, the forgetting check, early stopping,
the evaluations against a baseline, and the intended use and limitations (the user's words from the recipe's `card`
section, and what the run measured). Every number comes from the run's report.json (or the evaluation's eval.json)
as it is, shown to 4 significant digits (`num`); nothing is recomputed here. A section whose report entry is missing
says "not measured".

A README.md that align did not write (one copied from a base model, say) is never overwritten: ours carry MARKER,
and where a foreign README.md is in the folder the card goes to MODEL_CARD.md instead (the log says so).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

log = logging.getLogger("align")

MARKER = "<!-- align model card: written by align (align/card.py) from the run's report.json; a rerun replaces it -->"
CARD_FILE, FALLBACK_FILE = "README.md", "MODEL_CARD.md"
NOT_MEASURED = "not measured"
NOT_STATED = "not stated"
EVALS_BEGIN, EVALS_END = "<!-- align:evaluations -->", "<!-- /align:evaluations -->"
_EVAL_BLOCK = re.compile(r"<!-- align:evaluation (?P<label>.*?) -->\n.*?<!-- /align:evaluation (?P=label) -->\n",
                         re.S)

# License ids the Hub accepts in `license:` (huggingface.co/docs/hub/repositories-licenses). Anything else is written
# as `license: other` with `license_name`, the Hub's way for a license outside its list.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openmdw-1.0
openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split())

STAGE_NAMES = {"sft": "SFT model", "rm": "Reward model", "dpo": "DPO policy", "ppo": "PPO policy",
               "grpo": "GRPO policy"}
STAGE_TAGS = {"sft": ["sft"], "rm": ["reward-model"], "dpo": ["dpo"], "ppo": ["ppo", "rlhf"], "grpo": ["grpo", "rlhf"]}
DPO_TAGS = {"robust": "rdpo", "ipo": "ipo", "hinge": "slic", "simpo": "simpo"}
FOLDER_WHAT = {
    "model": "the model at the end of training (output_dir/model)",
    "merged": "the LoRA adapters merged into the base weights, a plain transformers model (output_dir/merged)",
    "best": "the model of the best held-out evaluation (output_dir/best, kept by train.keep_best)",
}

# The settings worth a reader's attention, per stage (dotted keys of align.train.flat_settings); those a config does
# not have are left out.
COMMON_SETTINGS = ("train.learning_rate", "train.scheduler", "train.warmup_ratio", "train.warmup_steps",
                   "train.batch_size", "train.micro_batch_size", "train.epochs", "train.max_steps",
                   "train.weight_decay", "train.max_grad_norm", "seed", "lora.enabled", "lora.r", "lora.alpha",
                   "lora.target_modules", "lora.quantization")
STAGE_SETTINGS = {
    "sft": ("data.max_length", "data.truncation", "data.loss_on", "data.padding_free", "data.system_prompt"),
    "rm": ("loss.type", "loss.ties", "loss.use_margin", "loss.center_coef", "loss.length_corr_coef", "data.template",
           "data.max_length", "data.truncation"),
    "dpo": ("loss.type", "loss.beta", "loss.label_smoothing", "loss.simpo_gamma", "loss.rpo_alpha",
            "loss.rdpo_alpha", "loss.ld_alpha", "reference", "reference.name_or_path", "data.rankings",
            "data.template", "data.max_length", "data.truncation"),
    "ppo": ("algorithm.advantage", "algorithm.kl_coef", "algorithm.kl_penalty", "algorithm.kl_estimator",
            "algorithm.adaptive_kl", "algorithm.kl_target", "algorithm.gamma", "algorithm.lam", "algorithm.ppo_epochs",
            "algorithm.mini_batch_size", "algorithm.clip_eps", "algorithm.clip_eps_high",
            "algorithm.importance_ratio", "algorithm.loss_agg", "algorithm.scale_rewards",
            "algorithm.whiten_advantages", "algorithm.ent_coef", "algorithm.target_kl", "algorithm.dynamic_sampling",
            "algorithm.overlong_buffer", "algorithm.engine_is_cap", "critic.init", "critic.learning_rate",
            "reward.model", "reward.rule", "reward.rule_args", "reward.function", "reward.terms", "rollout.n",
            "rollout.max_new_tokens", "rollout.temperature", "rollout.engine", "reference",
            "reference.name_or_path", "data.max_prompt_length", "data.system_prompt"),
}
STAGE_SETTINGS["grpo"] = STAGE_SETTINGS["ppo"]
# Shown only when set (not 0, null or false): options that are off by default.
WHEN_SET = {"train.warmup_ratio", "train.warmup_steps", "train.max_steps", "train.weight_decay", "data.system_prompt",
            "loss.label_smoothing", "loss.rpo_alpha", "loss.rdpo_alpha", "loss.ld_alpha", "loss.center_coef",
            "loss.length_corr_coef", "reference", "reference.name_or_path", "algorithm.mini_batch_size",
            "algorithm.clip_eps_high", "algorithm.ent_coef", "algorithm.target_kl", "algorithm.dynamic_sampling",
            "algorithm.overlong_buffer", "algorithm.engine_is_cap", "algorithm.adaptive_kl", "critic.learning_rate",
            "reward.model", "reward.rule", "reward.rule_args", "reward.function", "reward.terms"}


def shown_settings(cfg: Any, stage: str, flat: dict) -> list[str]:
    """The dotted keys of the settings table: the stage's, then the common ones, less those that do not apply."""
    def expand(key: str) -> list[str]:  # a rule's arguments are flattened: reward.rule_args.<name>
        return [key] if key in flat or not key.endswith(".rule_args") else [k for k in flat if k.startswith(key + ".")]

    keys = [k for k in dict.fromkeys(x for key in (*STAGE_SETTINGS.get(stage, ()), *COMMON_SETTINGS)
                                     for x in expand(key)) if k in flat]
    hidden = {k for k in keys if k in WHEN_SET and flat[k] in (0, None, False, [], {}, "")}
    if not cfg.lora.enabled:
        hidden |= {k for k in keys if k.startswith("lora.") and k != "lora.enabled"}
    if flat.get("train.max_steps") is not None:
        hidden.add("train.epochs")  # max_steps overrides epochs
    if stage == "dpo" and flat.get("loss.type") != "simpo":
        hidden.add("loss.simpo_gamma")
    if stage in ("ppo", "grpo"):
        advantage = flat.get("algorithm.advantage")
        if advantage != "gae":
            hidden |= {"critic.init", "critic.learning_rate", "algorithm.lam"}
        if advantage != "grpo":
            hidden.add("algorithm.scale_rewards")
        if not flat.get("algorithm.adaptive_kl"):
            hidden.add("algorithm.kl_target")
    return [k for k in keys if k not in hidden]


# --------------------------------------------------------------------------------------------------------------
# Formatting: every number the card shows goes through `num`


def num(x: Any) -> str:
    """A number as the card shows it: 4 significant digits for a float, an int as it is, n/a for None."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return str(x) if not math.isfinite(x) else f"{x:.4g}"
    return _cell(x)


def interval(ci: Any) -> str:
    """`[lo, hi]` of a 95% interval, or not measured."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"[{num(ci[0])}, {num(ci[1])}]"
    return NOT_MEASURED


def setting(value: Any) -> str:
    """A config value as JSON (null, true, 0.001, [0.9, 0.999]); a string as it is."""
    return value if isinstance(value, str) else json.dumps(value)


def _cell(x: Any) -> str:
    """Text safe inside a markdown table cell."""
    text = x if isinstance(x, str) else json.dumps(x, default=str)
    return " ".join(text.split()).replace("|", "\\|")


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------------------------------------------
# The header


def base_model(cfg: Any) -> str:
    card = getattr(cfg, "card", None)
    return (card.base_model if card is not None and card.base_model else None) or cfg.model.name_or_path


def license_fields(cfg: Any) -> dict:
    """`license` (and `license_name` for one outside the Hub's list): `unknown` when the recipe states none."""
    card = getattr(cfg, "card", None)
    given = card.license if card is not None else None
    if not given:
        return {"license": "unknown"}
    if given.lower() in HUB_LICENSES:
        return {"license": given.lower()}
    return {"license": "other", "license_name": re.sub(r"[^a-z0-9.]+", "-", given.lower()).strip("-") or "other"}


def is_adapter(cfg: Any, stage: str, folder_kind: str) -> bool:
    """A peft adapter folder: LoRA's model/ and best/ (the reward model is always saved merged)."""
    return bool(cfg.lora.enabled) and folder_kind != "merged" and stage != "rm"


def tags(cfg: Any, stage: str) -> list[str]:
    out = ["align", stage, *STAGE_TAGS.get(stage, [])]
    if stage == "dpo" and cfg.loss.type in DPO_TAGS:
        out.append(DPO_TAGS[cfg.loss.type])
    if stage in ("ppo", "grpo") and cfg.algorithm.advantage not in ("gae", "grpo"):
        out.append(cfg.algorithm.advantage.replace("_", "-"))
    if cfg.lora.enabled:
        out.append("lora")
    card = getattr(cfg, "card", None)
    out += list(card.tags) if card is not None else []
    return list(dict.fromkeys(out))


def front_matter(cfg: Any, stage: str, adapter: bool) -> dict:
    card = getattr(cfg, "card", None)
    meta: dict[str, Any] = {"base_model": base_model(cfg), "library_name": "peft" if adapter else "transformers",
                            **license_fields(cfg)}
    if card is not None and card.datasets:
        meta["datasets"] = list(card.datasets)
    if card is not None and card.language:
        meta["language"] = list(card.language)
    meta["tags"] = tags(cfg, stage)
    meta["pipeline_tag"] = "text-classification" if stage == "rm" else "text-generation"
    return meta


# --------------------------------------------------------------------------------------------------------------
# The sections


def _algorithm(cfg: Any, stage: str, flat: dict) -> str:
    if stage == "sft":
        on = "every token" if flat.get("data.loss_on") == "all" else "the assistant turns' tokens"
        how = "LoRA adapters" if cfg.lora.enabled else "all weights"
        return f"Supervised fine-tuning ({how}): next-token cross-entropy on {on}."
    if stage == "rm":
        loss = ("the listwise Plackett-Luce likelihood of the human order" if cfg.loss.type == "plackett_luce" else
                "the pairwise Bradley-Terry loss on every ordered pair of a ranking (InstructGPT)")
        return (f"A reward model: one scalar score per (prompt, response), a one-output sequence-classification "
                f"head on the backbone, trained with {loss}.")
    if stage == "dpo":
        names = {"sigmoid": "DPO (Rafailov et al. 2023)", "robust": "robust DPO (rDPO, Chowdhury et al. 2024)",
                 "ipo": "IPO (Azar et al. 2023)", "hinge": "SLiC's hinge loss (Zhao et al. 2023)",
                 "simpo": "SimPO (Meng et al. 2024), reference-free"}
        extra = []
        if cfg.loss.type == "sigmoid" and cfg.loss.label_smoothing:
            extra.append("conservative DPO (label smoothing)")
        if cfg.loss.rpo_alpha:
            extra.append("an NLL term on the chosen responses (RPO)")
        if cfg.loss.rdpo_alpha:
            extra.append("R-DPO's length-regularised margin")
        if cfg.loss.ld_alpha is not None:
            extra.append("LD-DPO's down-weighting of the longer response's excess tokens")
        ref = ("none" if cfg.loss.type == "simpo" else
               cfg.reference.name_or_path if cfg.reference is not None else "the policy's starting weights")
        return (f"Offline preference optimisation: {names.get(cfg.loss.type, cfg.loss.type)}"
                f"{' with ' + ', '.join(extra) if extra else ''}, loss type `{cfg.loss.type}`, beta "
                f"{setting(cfg.loss.beta)}; reference model: {ref}.")
    algo = cfg.algorithm
    names = {"gae": "PPO with a learned critic and GAE (InstructGPT)", "grpo": "GRPO (group-normalised advantages)",
             "rloo": "RLOO (leave-one-out baseline)", "reinforce_pp": "REINFORCE++",
             "reinforce_pp_baseline": "REINFORCE++ with a group baseline"}
    from .config import reward_name

    reward = (" + ".join(f"{t.weight:g} x {reward_name(t)}" for t in cfg.reward.terms) if cfg.reward.terms else
              cfg.reward.model or (f"rule {cfg.reward.rule}" if cfg.reward.rule else f"function {cfg.reward.function}"))
    kl = {"reward": "a per-token penalty in the reward", "loss": "a term in the loss", "none": "not used"}
    return (f"Reinforcement learning from a reward: {names.get(algo.advantage, algo.advantage)}; reward: {reward}; "
            f"KL to the reference ({algo.kl_estimator}, coefficient {setting(algo.kl_coef)}"
            f"{', adaptive' if algo.adaptive_kl else ''}): {kl.get(algo.kl_penalty, algo.kl_penalty)}; "
            f"{cfg.rollout.n} response(s) per prompt, {algo.ppo_epochs} update epoch(s) per batch.")


# What report.json says about the end of training (the last step's training metrics, PPO's controller and critic).
END_OF_TRAINING = ("train_loss", "train_accuracy", "kl_coef_final", "critic_init")


def training_section(cfg: Any, stage: str, report: dict, flat: dict) -> list[str]:
    lines = ["## Training", "", _algorithm(cfg, stage, flat), ""]
    done = []
    for key, what in (("steps", "optimizer steps"), ("iterations", "iterations (rollout + update)")):
        if report.get(key) is not None:
            done.append(f"{num(report[key])} {what}")
    precision = report.get("precision") or {}
    if precision.get("used"):
        done.append(f"computed in {precision['used']}")
    if report.get("template"):
        done.append(f"template {report['template']}")
    if done:
        lines += [f"Run: {', '.join(done)}.", ""]
    lines += _table(("setting", "value"), ((k, setting(flat[k])) for k in shown_settings(cfg, stage, flat)))
    results = [(k, report[k]) for k in END_OF_TRAINING if report.get(k) is not None]
    if results:
        lines += ["", "At the end of training: " + ", ".join(f"{k} {num(v)}" for k, v in results) + "."]
    return lines


def data_sources(cfg: Any) -> list[tuple[str, Any]]:
    """(dotted key, DataSource) of every data source in the config, in declaration order."""
    from .config import DataSource

    found: list[tuple[str, Any]] = []

    def walk(node: Any, at: str) -> None:
        if isinstance(node, DataSource):
            found.append((at, node))
        elif dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name), f"{at}.{f.name}" if at else f.name)

    walk(cfg, "")
    return found


def reward_files(cfg: Any) -> list[tuple[str, str]]:
    """(dotted key, path) of the files a rule or function reward reads (its rule_args naming a file)."""
    reward = getattr(cfg, "reward", None)
    if reward is None:
        return []
    nodes = [("reward", reward)] + [(f"reward.terms[{i}]", t) for i, t in enumerate(reward.terms)]
    return [(f"{at}.rule_args.{k}", v) for at, node in nodes for k, v in node.rule_args.items()
            if isinstance(v, str) and Path(v).is_file()]


def _digest(path: str, report: dict) -> str:
    from .train import content_digest

    recorded = (report.get("inputs") or {}).get(path)  # what the run recorded, when the report carries it
    digest = recorded or content_digest(path)
    return digest or "n/a (not a local file)"


def _examples(report: dict, split: str) -> str:
    stats = (report.get("data") or {}).get(split)
    if not isinstance(stats, dict) or stats.get("total") is None:
        return "n/a"
    dropped = sum(v for v in (stats.get("dropped") or {}).values() if isinstance(v, (int, float)))
    return num(stats["total"]) + (f" ({num(dropped)} dropped)" if dropped else "")


def data_section(cfg: Any, report: dict) -> list[str]:
    rows = []
    for at, src in data_sources(cfg):
        split = at.split(".")[-1] if at.startswith("data.") else None
        rows.append((at, src.path, _digest(src.path, report), num(src.offset),
                     "all" if src.limit is None else num(src.limit), _examples(report, split) if split else "n/a"))
    fraction = getattr(getattr(cfg, "data", None), "validation_fraction", 0)
    if fraction:
        rows.append(("data.validation", f"a fraction {setting(fraction)} of data.train (a seeded shuffle)",
                     "(as data.train)", "", "", _examples(report, "validation")))
    forgetting = getattr(cfg, "forgetting", None)
    if forgetting is not None and forgetting.enabled and (forgetting.text is None or forgetting.prompts is None):
        shipped = Path(__file__).resolve().parents[1] / "data" / "general_reference.jsonl"
        which = " and ".join(k for k in ("text", "prompts") if getattr(forgetting, k) is None)
        if shipped.is_file():
            rows.append((f"forgetting.{which} (default)", "data/general_reference.jsonl",
                         _digest(str(shipped), report), "0", "all", "n/a"))
    rows += [(at, path, _digest(path, report), "0", "all", "n/a") for at, path in reward_files(cfg)]
    lines = ["## Data", ""]
    lines += _table(("role", "file", "sha256", "offset", "limit", "examples used"), rows)
    lines += ["", "A source with a limit reads records offset .. offset+limit-1 of its file; `examples used` are the "
              "records that became training or held-out examples (after skipped and dropped ones)."]
    skipped = (report.get("data") or {}).get("skipped_records")
    if skipped:
        lines += ["", "Records skipped as invalid (data.*.skip_invalid): " +
                  ", ".join(f"{k} {num(v)}" for k, v in skipped.items()) + "."]
    return lines


def _flat_counts(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _flat_counts(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


def audit_section(report: dict) -> list[str]:
    audit = report.get("audit")
    lines = ["## Data audit", ""]
    if not isinstance(audit, dict) or not audit:
        return lines + [f"{NOT_MEASURED.capitalize()} (audit.enabled, align/audit.py)."]
    rows = [(k, v if isinstance(v, str) else num(v) if not isinstance(v, list) else f"{len(v)} listed")
            for k, v in _flat_counts(audit)]
    return lines + _table(("check", "count"), rows) + ["", "Details: audit.md and audit.json in the run folder."]


def held_out_rows(report: dict) -> list[tuple[str, Any, Any, Any]]:
    """(metric, before, after, 95% interval after) of the held-out evaluation: the report's `val_<name>` and
    `val_<name>_before` (sft, rm, dpo), and its `before`/`after` mappings (ppo, grpo)."""
    rows = []
    validation = report.get("validation") if isinstance(report.get("validation"), dict) else {}
    for key, after in report.items():
        if not key.startswith("val_") or key.endswith(("_before", "_ci95")) or isinstance(after, (dict, list)):
            continue
        ci = report.get(f"{key}_ci95")
        if ci is None and key == "val_accuracy" and "accuracy" in validation:
            ci = validation.get("ci95")  # the reward model's bootstrap interval of its held-out accuracy
        rows.append((key, report.get(f"{key}_before"), after, ci))
    before, after = report.get("before"), report.get("after")
    if isinstance(before, dict) or isinstance(after, dict):
        before, after = before or {}, after or {}
        for key in dict.fromkeys([*before, *after]):
            if key.endswith("_ci95") or isinstance(before.get(key, after.get(key)), (dict, list)):
                continue
            rows.append((key, before.get(key), after.get(key), after.get(f"{key}_ci95")))
    return rows


RM_DETAILS = ("accuracy", "n", "groups", "ece", "length_heuristic_accuracy", "accuracy_best_vs_worst", "kendall_tau",
              "top1_accuracy")


def evaluation_section(stage: str, report: dict, folder_kind: str) -> list[str]:
    lines = ["## Evaluation on held-out data", ""]
    rows = held_out_rows(report)
    if not rows:
        return lines + [f"{NOT_MEASURED.capitalize()}: the run had no held-out data."]
    final = report.get("final_model")
    if folder_kind == "best" and final and not str(final).startswith("best"):
        lines += ["The numbers after training are those of output_dir/model (the last model), not of this folder's; "
                  "its own held-out value is under Early stopping.", ""]
    elif final and str(final).startswith("best"):
        lines += [f"After training means the model kept: {final}.", ""]
    lines += _table(("metric", "before", "after", "95% CI (after)"),
                    ((k, num(b), num(a), interval(ci)) for k, b, a, ci in rows))
    validation = report.get("validation")
    if stage == "rm" and isinstance(validation, dict) and "accuracy" in validation:
        lines += ["", "Held-out reward-model report (reward_models.metrics; pairwise accuracy with a group bootstrap "
                  "interval):", ""]
        detail = [(k, num(validation[k]), interval(validation.get("ci95")) if k == "accuracy" else "")
                  for k in RM_DETAILS if k in validation]
        for split, cell in (validation.get("length_bias") or {}).items():
            if isinstance(cell, dict):
                detail.append((f"length_bias.{split}.accuracy", num(cell.get("accuracy")), f"n = {num(cell.get('n'))}"))
        lines += _table(("measure", "value", "95% CI / count"), detail)
    split_after, split_before = report.get("val_by_length"), report.get("val_by_length_before")
    if isinstance(split_after, dict) or isinstance(split_before, dict):
        lines += ["", "Held-out preference accuracy by which response is longer (in tokens); `shorter_wins_heuristic` "
                  "is what the rule \"the shorter response wins\" scores on the same pairs:", ""]
        lines += _table(("split", "before", "after", "pairs"), length_split_rows(split_before or {}, split_after or {}))
    return lines


def length_split_rows(before: dict, after: dict) -> list[tuple[str, str, str, str]]:
    """Rows of a `val_by_length` pair ({bucket: {"accuracy", "n"}, "shorter_wins_heuristic": x}) before and after."""
    rows = []
    for key in dict.fromkeys([*before, *after]):
        b, a = before.get(key), after.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            rows.append((f"{key}.accuracy", num(b.get("accuracy")), num(a.get("accuracy")),
                         num(a.get("n", b.get("n")))))
        elif not isinstance(a, (list, str)) and not isinstance(b, (list, str)):
            rows.append((key, num(b), num(a), ""))
    return rows


def evaluations_placeholder() -> str:
    return (f"{NOT_MEASURED.capitalize()} here: `python -m align.pipeline` adds its evaluation against the baseline "
            f"(win rate with a 95% interval under its judge) after it runs.")


def evaluations_section(blocks: Optional[list[str]] = None) -> list[str]:
    body = "".join(blocks) if blocks else evaluations_placeholder() + "\n"
    return ["## Evaluation against a baseline", "", EVALS_BEGIN, body.rstrip("\n"), EVALS_END]


FORGETTING_CHANGE = ("rise", "drop", "value")


def forgetting_section(report: dict) -> list[str]:
    lines = ["## Forgetting check", ""]
    fg = report.get("forgetting")
    if not isinstance(fg, dict) or not fg:
        return lines + [f"{NOT_MEASURED.capitalize()} (forgetting.enabled: loss on general text, KL from the "
                        f"starting model on general prompts, exact-match accuracy)."]
    rows = []
    for name, m in fg.items():
        if not isinstance(m, dict):
            continue
        change = next((m[k] for k in FORGETTING_CHANGE if k in m), None)
        rows.append((name, num(m.get("before")), num(m.get("after")), num(change), interval(m.get("ci95"))))
    lines += _table(("measure", "before", "after", "change (rise, drop or value)", "95% CI of the change"), rows)
    counts = [f"{k} {num(fg[k])}" for k in ("records", "prompts") if k in fg]
    counts += [f"{name}.{k} {num(v)}" for name, m in fg.items() if isinstance(m, dict) for k, v in m.items()
               if k not in ("before", "after", "ci95", *FORGETTING_CHANGE) and isinstance(v, (int, float))]
    if counts:
        lines += ["", "Measured on: " + ", ".join(counts) + "."]
    flags = fg.get("flags") or []
    if "flagged" in fg or flags:
        lines += ["", f"Flagged: {num(bool(fg.get('flagged', bool(flags))))}" +
                  (". " + "; ".join(str(f) for f in flags) if flags else "") + "."]
    return lines


ES_KEYS = ("metric", "mode", "patience", "min_delta", "stopped_at", "best_step", "best", "evaluations", "reason")


def early_stopping_section(report: dict) -> list[str]:
    lines = ["## Early stopping", ""]
    es = report.get("early_stopping")
    if not isinstance(es, dict) or not es:
        return lines + ["Not used (train.early_stopping and train.keep_best off)."]
    rows = [(k, es[k] if isinstance(es[k], str) else num(es[k])) for k in (*ES_KEYS, *(k for k in es
                                                                                        if k not in ES_KEYS))
            if k in es]
    lines += _table(("field", "value"), rows)
    if report.get("final_model"):
        lines += ["", f"Final model: {report['final_model']}."]
    return lines


def measured_limits(cfg: Any, report: dict) -> list[str]:
    """What this run measured that limits the model's use, each in one line."""
    out = []
    if getattr(cfg.model, "init", "pretrained") == "random":
        out.append("Trained from randomly initialised weights (model.init=random): a test model, not for use.")
    fg = report.get("forgetting")
    if isinstance(fg, dict) and (fg.get("flagged") or fg.get("flags")):
        out.append("Forgetting flagged: " + ("; ".join(str(f) for f in fg.get("flags") or []) or "see the check") + ".")
    warnings = [report.get("length_warning")]
    for key in ("validation", "val_by_length"):
        if isinstance(report.get(key), dict):
            warnings.append(report[key].get("length_warning"))
    out += [f"Length: {w}" for w in warnings if isinstance(w, str) and w]
    audit = report.get("audit")
    if isinstance(audit, dict):
        notes = {"leaks": "held-out records also in the training data (held-out numbers may be optimistic)",
                 "contradictory_pairs": "contradictory preference pairs in the data",
                 "personal_data": "personal-data findings (e-mail addresses, phone or card numbers) in the data files",
                 "exact_duplicates": "exact duplicate records", "empty_responses": "empty responses"}
        for key, what in notes.items():
            count = audit.get(key)
            if isinstance(count, dict):
                count = sum(v for v in count.values() if isinstance(v, (int, float)))
            if isinstance(count, (int, float)) and count > 0:
                out.append(f"Data audit: {num(count)} {what} ({key}).")
    if not held_out_rows(report):
        out.append("No held-out evaluation: the run had no validation data.")
    return out


def use_section(cfg: Any, stage: str, report: dict) -> list[str]:
    card = getattr(cfg, "card", None)
    intended = card.intended_use if card is not None and card.intended_use else None
    stated = card.limitations if card is not None and card.limitations else None
    lines = ["## Intended use", "", intended or f"{NOT_STATED.capitalize()} (card.intended_use).", "",
             "## Limitations", "", stated or f"{NOT_STATED.capitalize()} (card.limitations).", ""]
    measured = measured_limits(cfg, report)
    lines += ["Measured by this run:", ""] + ([f"- {m}" for m in measured] or ["- nothing flagged"])
    return lines


def howto_section(stage: str, adapter: bool, folder_kind: str, cfg: Any) -> list[str]:
    where = f"{cfg.output_dir}/{folder_kind}"
    if stage == "rm":
        code = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                f'model = AutoModelForSequenceClassification.from_pretrained("{where}")  # one score per sequence',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
        extra = [f"or score (prompt, response) rows with the template it was trained with: "
                 f"`python -m reward_models.score --model {where} --data FILE --out FILE`."]
    else:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{where}")'
                + ("  # a peft adapter: transformers loads its base with peft installed" if adapter else ""),
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
        extra = []
    return ["## How to load", "", "```python", *code, "```", *([""] + extra if extra else [])]


# --------------------------------------------------------------------------------------------------------------
# The API


def render(cfg: Any, stage: str, report: dict, folder_kind: str = "model", adapter: Optional[bool] = None) -> str:
    """The model card of one of a run's model folders (folder_kind: model | merged | best) from its config and its
    report.json's content. `adapter`: whether the folder holds a peft adapter (default: from cfg.lora and the kind)."""
    import yaml

    from .train import flat_settings

    if folder_kind not in FOLDER_WHAT:
        raise ValueError(f"folder_kind: expected one of {', '.join(FOLDER_WHAT)}; got {folder_kind!r}")
    report = report or {}
    adapter = is_adapter(cfg, stage, folder_kind) if adapter is None else adapter
    flat = flat_settings(cfg)
    meta = front_matter(cfg, stage, adapter)
    base = meta["base_model"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", MARKER, "",
             f"# {STAGE_NAMES.get(stage, stage)}: {Path(cfg.output_dir).name}", "",
             f"Trained with align (`python -m align.{stage}`) from `{base}`. This folder holds "
             f"{FOLDER_WHAT[folder_kind]}{', as a LoRA adapter (peft)' if adapter else ''}."]
    if Path(str(base)).exists() or str(base).startswith("pkg:"):
        lines += ["", "`base_model` is a local path: set card.base_model to the base model's Hub id so the Hub can "
                  "link it."]
    license_ = meta["license"]
    if license_ == "unknown":
        lines += ["", "License: not stated in the recipe (card.license); the base model's license and the data's terms "
                  "apply to it."]
    elif license_ == "other":
        lines += ["", f"License: {cfg.card.license} (not one of the Hub's license ids, so the header says `other`)."]
    sections = [training_section(cfg, stage, report, flat), data_section(cfg, report), audit_section(report),
                evaluation_section(stage, report, folder_kind),
                *([] if stage == "rm" else [evaluations_section()]),  # the pipeline evaluates policies
                forgetting_section(report), early_stopping_section(report), use_section(cfg, stage, report),
                howto_section(stage, adapter, folder_kind, cfg)]
    for section in sections:
        lines += [""] + section
    return "\n".join(lines) + "\n"


def is_ours(path: Path) -> bool:
    try:
        return MARKER in Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def card_path(folder: Path) -> Optional[Path]:
    """Where align's card is (or goes) in a folder: README.md unless a README.md align did not write is there, then
    MODEL_CARD.md; None when that too is someone else's."""
    folder = Path(folder)
    for name in (CARD_FILE, FALLBACK_FILE):
        path = folder / name
        if not path.exists() or is_ours(path):
            return path
    return None


def write(folder: Path, cfg: Any, stage: str, report: dict, folder_kind: str = "model") -> Optional[Path]:
    """Write the card into a saved model folder, atomically; returns its path. A README.md that align did not write
    is kept and the card goes to MODEL_CARD.md (the log says so); with a foreign MODEL_CARD.md too nothing is
    written (None)."""
    from .train import write_text_atomic

    folder = Path(folder)
    text = render(cfg, stage, report, folder_kind, adapter=(folder / "adapter_config.json").is_file())
    path = card_path(folder)
    if path is None:
        log.warning("%s: its README.md and MODEL_CARD.md were not written by align; no model card written (they are "
                    "kept as they are)", folder)
        return None
    if path.name != CARD_FILE:
        log.info("%s holds a README.md align did not write (kept as it is); the model card is in %s", folder,
                 path.name)
    write_text_atomic(path, text)
    return path


def evaluation_block(label: str, summary: dict) -> str:
    """One evaluation against a baseline (align.evaluate's eval.json) as a card block between its own markers."""
    label = " ".join(str(label).split()).replace("-->", "")
    rows = [("win_rate", num(summary.get("win_rate")), interval(summary.get("win_rate_ci95"))),
            ("lc_win_rate", num(summary.get("lc_win_rate")), interval(summary.get("lc_win_rate_ci95")))]
    rows += [(k, num(summary[k]), "") for k in ("wins", "ties", "losses", "n", "reward_candidate", "reward_baseline",
                                                 "reward_diff", "kl") if k in summary]
    for side in ("candidate", "baseline"):
        lengths = summary.get(f"length_{side}")
        if isinstance(lengths, dict):
            rows += [(f"length_{side}.{k}", num(lengths[k]), "") for k in ("mean", "eos_rate") if k in lengths]
    sampling = summary.get("sampling") or {}
    head = [f"<!-- align:evaluation {label} -->", f"### {label}", ""]
    about = []
    if summary.get("baseline"):
        about.append(f"baseline `{summary['baseline']}`")
    if summary.get("judge"):
        about.append(f"judge `{summary['judge']}`")
    if sampling:
        about.append("sampling " + ", ".join(f"{k} {setting(v)}" for k, v in sampling.items()))
    if about:
        head += ["Against " + "; ".join(about) + ". Win rate: ties count half; its 95% interval is Wilson's; "
                 "lc_win_rate is the length-controlled win rate (AlpacaEval 2's regression, bootstrap interval).", ""]
    body = _table(("measure", "value", "95% CI"), rows)
    ci = summary.get("win_rate_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and ci[0] <= 0.5 <= ci[1]:
        body += ["", "The win rate's 95% interval includes 0.5: this evaluation does not tell the policy from the "
                 "baseline."]
    if isinstance(summary.get("length_warning"), str):
        body += ["", f"Length: {summary['length_warning']}"]
    return "\n".join(head + body + [f"<!-- /align:evaluation {label} -->"]) + "\n"


def add_evaluation(folder: Path, summary: dict, label: str = "against the baseline") -> Optional[Path]:
    """Put an evaluation's summary (align.evaluate.main's return value, or its eval.json) into the card of a model
    folder under `label` (e.g. "Win rate against the SFT model"), replacing an earlier block of the same label;
    returns the card's path, or None (logged) when the folder has no card of align's."""
    from .train import write_text_atomic

    path = next((Path(folder) / n for n in (CARD_FILE, FALLBACK_FILE) if is_ours(Path(folder) / n)), None)
    if path is None:
        log.warning("%s has no model card written by align; the evaluation %r was not added to one", folder, label)
        return None
    text = path.read_text(encoding="utf-8")
    begin, end = text.find(EVALS_BEGIN), text.find(EVALS_END)
    if begin < 0 or end < begin:
        log.warning("%s: the card has no evaluations section; the evaluation %r was not added", path, label)
        return None
    inside = text[begin + len(EVALS_BEGIN):end]
    blocks = {m.group("label"): m.group(0) for m in _EVAL_BLOCK.finditer(inside)}
    new = evaluation_block(label, summary)
    blocks[_EVAL_BLOCK.match(new).group("label")] = new
    section = "\n".join(evaluations_section(list(blocks.values()))[2:])
    write_text_atomic(path, text[:begin] + section + text[end + len(EVALS_END):])
    return path
