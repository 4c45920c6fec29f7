"""The few helpers every stage's loop shares: accelerator, optimizer and schedule, the run folder (config,
metrics, atomic checkpoints, exact resume, the final report) and progress.

Run folder of a stage:
    config.yaml               the resolved config
    metrics.jsonl             one JSON object per logged step (and tb/ for TensorBoard)
    checkpoints/step-000040/  model/ (standard layout), optimizer.pt, scheduler.pt, rng-<rank>.pt, state.json
    model/                    the final model (adapter or full), and merged/ with LoRA
    report.json               written last: its presence means the run finished
Everything is written to a temporary name and renamed, so a crash never leaves a half-written folder that looks
complete, and the newest complete checkpoint survives any failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from . import models
from .config import ConfigError, LogConfig, TrainConfig, to_yaml

log = logging.getLogger("align")


def setup_logging(is_main: bool) -> None:
    """INFO lines from the main process on stdout; other processes only warn."""
    logger = logging.getLogger("align")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[align] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for noisy in ("transformers", "datasets", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Deprecation notices raised inside the libraries (not by align's own calls) are noise for a user.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl|accelerate)\.")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision for the recipe's `train.precision`."""
    if precision == "auto":
        return "bf16" if models.has_fast_bf16() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(train: TrainConfig, seed: int):
    accelerator = plain_accelerator(train.precision, seed)
    check_batch_split(train, accelerator.num_processes)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED") and (train.save_every or False):
        raise ConfigError("train.save_every: mid-run checkpoints under FSDP/DeepSpeed are not supported yet; "
                          "set train.save_every=0 (the final model is saved)")
    return accelerator


def plain_accelerator(precision: str, seed: int):
    """The accelerator with logging set up and every RNG seeded; no training settings to check (evaluation)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # cpu=True on a machine without CUDA makes accelerate join a torchrun/`accelerate launch` group over gloo
    # (MULTI_CPU) instead of silently running each process alone.
    accelerator = Accelerator(mixed_precision=resolve_precision(precision), cpu=not torch.cuda.is_available())
    setup_logging(accelerator.is_main_process)
    set_seed(seed)
    return accelerator


def check_batch_split(train: TrainConfig, num_processes: int, at: str = "train") -> None:
    """A global batch splits into processes x micro-batches (checked again by the pipeline before any stage runs)."""
    per_step = train.micro_batch_size * num_processes
    if train.batch_size % per_step:
        raise ConfigError(
            f"{at}.batch_size={train.batch_size} is not a multiple of {at}.micro_batch_size x processes "
            f"= {train.micro_batch_size} x {num_processes}"
        )


def accumulation_steps(train: TrainConfig, num_processes: int) -> int:
    return train.batch_size // (train.micro_batch_size * num_processes)


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * steps_per_epoch))


def make_optimizer(model, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.learning_rate,
                             betas=tuple(train.adam_betas), eps=train.adam_eps)


def make_scheduler(optimizer, train: TrainConfig, num_steps: int):
    from transformers import get_scheduler

    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * num_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_steps)


# --------------------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = Path(path).with_name(f".tmp-{Path(path).name}")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# --------------------------------------------------------------------------------------------------------------
# RNG state (exact resume: dropout masks and sampling continue as if never interrupted)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------------
# The run folder


class Run:
    """One stage's run folder: refuses to clobber a run, writes the config, logs metrics, saves and finds
    checkpoints, and marks completion with report.json."""

    def __init__(self, cfg: Any, accelerator, stage: str):
        """Check the folder (nothing is written until `start`, so bad input leaves no run folder behind)."""
        self.cfg, self.accelerator, self.stage = cfg, accelerator, stage
        self.dir = Path(cfg.output_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.is_main = accelerator.is_main_process
        holds_run = self.dir.is_dir() and any(self.dir.iterdir())
        if holds_run and not (cfg.overwrite or cfg.resume):
            raise ConfigError(
                f"output_dir={self.dir} already holds a run; pass resume=true to continue it or overwrite=true "
                f"to start again"
            )
        self._tb = self._wandb = None
        self._metrics_file = None

    def start(self) -> None:
        """Create (or clear, with overwrite=true) the folder, write the resolved config, open the metric writers."""
        if self.is_main:
            self._prepare_folder()
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self._open_writers(self.cfg.log)

    # -- folder -----------------------------------------------------------------------------------------------
    def _prepare_folder(self) -> None:
        if self.cfg.overwrite and self.dir.is_dir():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / "config.yaml"
        new = to_yaml(self.cfg)
        if config_path.is_file() and self.cfg.resume:
            old = config_path.read_text()
            changed = _changed_keys(old, new) - {"resume", "overwrite"}
            if changed:
                log.warning("resuming with changed settings: %s (the result can differ from an uninterrupted run)",
                            ", ".join(sorted(changed)))
        config_path.write_text(new)

    @property
    def finished(self) -> bool:
        """The folder holds a completed run (and overwrite=true does not ask to redo it)."""
        return not self.cfg.overwrite and (self.dir / "report.json").is_file()

    def report(self) -> dict:
        return json.loads((self.dir / "report.json").read_text())

    # -- metrics ----------------------------------------------------------------------------------------------
    def _open_writers(self, log_cfg: LogConfig) -> None:
        self._metrics_file = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        if "tensorboard" in log_cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))
        if "wandb" in log_cfg.report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError("log.report_to has wandb, but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=log_cfg.wandb_project or "align", name=self.dir.name,
                                     config=json.loads(json.dumps(_plain(self.cfg), default=str)), dir=str(self.dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _jsonable(v) if not isinstance(v, (int, float)) else v for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def _truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric rows logged after the checkpoint (they are recomputed)."""
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    # -- checkpoints ------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Optional[Path]:
        found = sorted(self.checkpoints.glob("step-*")) if self.checkpoints.is_dir() else []
        return found[-1] if found else None

    def save_checkpoint(self, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                        base_location: Optional[str] = None, extra: Optional[dict[str, tuple]] = None) -> Path:
        """checkpoints/step-N/: the model, its optimizer and schedule, every process's RNG, `state`, and for each
        `extra` part (e.g. PPO's critic: name -> (model, optimizer, scheduler)) the same under its name."""
        acc = self.accelerator
        final = self.checkpoints / f"step-{step:06d}"
        tmp = self.checkpoints / f".tmp-step-{step:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
        if self.is_main:
            parts = {"": (model, optimizer, scheduler), **{f"{k}_": v for k, v in (extra or {}).items()}}
            for prefix, (part_model, part_optimizer, part_scheduler) in parts.items():
                models.save(acc.unwrap_model(part_model), tokenizer, tmp / f"{prefix}model",
                            base_location if prefix == "" else None)
                torch.save(part_optimizer.state_dict(), tmp / f"{prefix}optimizer.pt")
                torch.save(part_scheduler.state_dict(), tmp / f"{prefix}scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=_jsonable))
        acc.wait_for_everyone()
        if self.is_main:
            os.replace(tmp, final)
            for old in sorted(self.checkpoints.glob("step-*"))[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def resume(self, model, optimizer, scheduler, extra: Optional[dict[str, tuple]] = None) -> dict:
        """With resume=true, load the newest checkpoint into these objects (before accelerator.prepare) and
        return its state; otherwise (or with none yet) {"step": 0}. Metric rows past that step are dropped."""
        checkpoint = self.latest_checkpoint() if self.cfg.resume else None
        if checkpoint is None:
            if self.is_main and self.cfg.resume:
                log.info("resume=true but %s has no checkpoint yet: starting from step 0", self.dir)
                self._truncate_metrics_after(-1)
            return {"step": 0}
        return self.load_checkpoint(checkpoint, model, optimizer, scheduler, extra)

    def load_checkpoint(self, path: Path, model, optimizer, scheduler, extra: Optional[dict[str, tuple]] = None
                        ) -> dict:
        """Restore model weights (before accelerator.prepare), optimizer, schedule, the `extra` parts and this
        process's RNG."""
        parts = {"": (model, optimizer, scheduler), **{f"{k}_": v for k, v in (extra or {}).items()}}
        for prefix, (part_model, part_optimizer, part_scheduler) in parts.items():
            models.load_trained_weights(part_model, path / f"{prefix}model")
            part_optimizer.load_state_dict(torch.load(path / f"{prefix}optimizer.pt", weights_only=False))
            part_scheduler.load_state_dict(torch.load(path / f"{prefix}scheduler.pt", weights_only=False))
        rng_file = path / f"rng-{self.accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise ConfigError(f"{path}: no RNG state for process {self.accelerator.process_index}; resume with the "
                              f"same number of processes as the interrupted run")
        set_rng_state(torch.load(rng_file, weights_only=False))
        state = json.loads((path / "state.json").read_text())
        if self.is_main:
            self._truncate_metrics_after(state["step"])
        log.info("resumed from %s (step %d)", path, state["step"])
        return state

    # -- the end ----------------------------------------------------------------------------------------------
    def finish(self, report: dict) -> None:
        if self.is_main:
            write_json_atomic(self.dir / "report.json", {"stage": self.stage, **report})
        self.close()
        self.accelerator.wait_for_everyone()


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _changed_keys(old_yaml: str, new_yaml: str) -> set[str]:
    from omegaconf import OmegaConf

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a = flat(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    b = flat(OmegaConf.to_container(OmegaConf.create(new_yaml)))
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


# --------------------------------------------------------------------------------------------------------------
# The loop's chores, shared by every stage


@contextlib.contextmanager
def evaluating(model, accelerator=None) -> Iterator[Any]:
    """The bare network in eval mode for the block, its previous mode restored after. Unwrapped from DDP:
    processes may run different numbers of evaluation forwards, which a DDP forward must not."""
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def save_policy(run: "Run", model, tokenizer, cfg: Any, base_location: Optional[str], report: dict,
                settings: Optional[Callable[[Path, bool], None]] = None) -> None:
    """The final policy in run.dir/model (adapter or full) and, with LoRA and cfg.save_merged, the merged model in
    run.dir/merged, each written atomically on the main process; `settings(folder, merged)` adds a stage's files."""
    if not run.is_main:
        return
    net = run.accelerator.unwrap_model(model)
    with atomic_dir(run.dir / "model") as tmp:
        models.save(net, tokenizer, tmp, base_location)
        if settings is not None:
            settings(tmp, False)
    if cfg.lora.enabled and cfg.save_merged:
        with atomic_dir(run.dir / "merged") as tmp:
            models.save_merged(net, tokenizer, tmp)
            if settings is not None:
                settings(tmp, True)
        report["merged_model"] = str(run.dir / "merged")


def begin(cfg: Any, stage: str) -> tuple[Any, "Run"]:
    """The accelerator and the (checked, not yet created) run folder of a stage."""
    accelerator = make_accelerator(cfg.train, cfg.seed)
    return accelerator, Run(cfg, accelerator, stage)


@dataclass
class Schedule:
    """What the loop needs to know about the optimisation: data order, length, optimizer, LR schedule, and
    where it starts (after a resume)."""

    sampler: Any
    num_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start: int
    state: dict


def prepare(model, cfg: Any, accelerator, run: "Run", num_examples: int):
    """Optimizer, schedule and data order for `num_examples` training examples; resume from the newest checkpoint
    when asked; wrap for the accelerator. Returns (model, schedule)."""
    from .data import StepSampler

    sampler = StepSampler(num_examples, cfg.train.batch_size, cfg.seed)
    num_steps = total_steps(cfg.train, sampler.steps_per_epoch)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, num_steps)
    state = run.resume(model, optimizer, scheduler)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)  # the LR scheduler stays ours: one step per step
    log.info("%d steps of %d examples (%d per micro-batch, %d accumulation, %d processes), %.2f epochs",
             num_steps, cfg.train.batch_size, cfg.train.micro_batch_size,
             accumulation_steps(cfg.train, accelerator.num_processes), accelerator.num_processes,
             num_steps / sampler.steps_per_epoch)
    return model, Schedule(sampler, num_steps, optimizer, scheduler, state["step"], state)


class Loop:
    """Iterate a run's optimizer steps and do the chores around each one.

        for step, micro_batches in loop:          # this process's share of the global batch, in micro-batches
            for k, ids in enumerate(micro_batches):
                with loop.accumulating(k, len(micro_batches)):
                    accelerator.backward(loss)
            loop.end_step(metrics, tokens=n)      # optimizer step, progress, log, evaluation, checkpoint

    `loop.batch_ids` holds the whole global batch of the current step (the same on every process), so a recipe
    can normalise its loss by global counts without communication.
    """

    def __init__(self, cfg: Any, run: "Run", accelerator, model, tokenizer, schedule: Schedule,
                 evaluate: Optional[Callable[[], dict]] = None, base_location: Optional[str] = None,
                 checkpoint_state: Optional[Callable[[], dict]] = None):
        self.cfg, self.run, self.accelerator, self.model, self.tokenizer = cfg, run, accelerator, model, tokenizer
        self.schedule, self.evaluate, self.base_location = schedule, evaluate, base_location
        self.checkpoint_state = checkpoint_state or (lambda: {})
        self.batch_ids: list[int] = []
        self.last_metrics: dict[str, float] = {}
        self._progress = Progress(schedule.num_steps, schedule.start,
                                  accelerator.is_main_process and cfg.log.progress, run.stage)
        self._timer = Timer()
        self._window_tokens = self._window_steps = 0

    def __iter__(self) -> Iterator[tuple[int, list[list[int]]]]:
        from .data import chunks, shard

        acc = self.accelerator
        for step in range(self.schedule.start, self.schedule.num_steps):
            self.batch_ids = self.schedule.sampler.indices(step)
            mine = shard(self.batch_ids, acc.process_index, acc.num_processes)
            yield step, chunks(mine, self.cfg.train.micro_batch_size)
        self._progress.close()

    def accumulating(self, k: int, n: int):
        """Gradient sync only on the last of n micro-batches (DDP all-reduces once per step)."""
        return contextlib.nullcontext() if k == n - 1 else self.accelerator.no_sync(self.model)

    def end_step(self, step: int, metrics: dict[str, float], tokens: int) -> None:
        """Clip, step the optimizer and the schedule; then progress, the metrics window, evaluation and
        checkpoints at their intervals. `metrics` are this step's (already reduced over processes)."""
        cfg, schedule = self.cfg, self.schedule
        grad_norm = None
        if cfg.train.max_grad_norm:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
        schedule.optimizer.step()
        schedule.scheduler.step()
        schedule.optimizer.zero_grad(set_to_none=True)

        done = step + 1
        self._progress.update(**{k.split("/")[0]: v for k, v in metrics.items() if k.startswith("loss/")})
        self._window_tokens += tokens
        self._window_steps += 1
        if done % cfg.log.every == 0 or done == schedule.num_steps:
            elapsed = self._timer.lap()
            row = {**metrics, "optim/lr": schedule.scheduler.get_last_lr()[0],
                   "perf/tokens_per_s": self._window_tokens / elapsed,
                   "perf/step_s": elapsed / self._window_steps,
                   "data/epoch": done / schedule.sampler.steps_per_epoch}
            if grad_norm is not None:
                row["optim/grad_norm"] = float(grad_norm)
            self.run.log(row, step=done)
            self.last_metrics = row
            self._window_tokens = self._window_steps = 0
        if done == schedule.num_steps:
            return
        if self.evaluate is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0:
            self.run.log(self.evaluate(), step=done)
        if cfg.train.save_every and done % cfg.train.save_every == 0:
            self.run.save_checkpoint(done, self.model, self.tokenizer, schedule.optimizer, schedule.scheduler,
                                     {"epoch": schedule.sampler.epoch_of(step), **self.checkpoint_state()},
                                     self.base_location)


# --------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A progress bar with ETA on the main process (a line every few seconds when not on a terminal)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 10.0, file=sys.stderr)

    def update(self, **shown: float) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
