"""The few helpers every stage's loop shares: accelerator, optimizer and schedule, the run folder (config,
metrics, atomic checkpoints, exact resume, the final report) and progress.

Run folder of a stage:
    run.json                  written first: the stage, its settings and its data files' sha256 (marks a run folder)
    .align.lock               held (flock) for the run's life: one run per folder
    config.yaml               the resolved config
    metrics.jsonl             one JSON object per logged step (and tb/ for TensorBoard)
    before.json               held-out numbers before the first update
    audit.md, audit.json      what the data audit found (align/audit.py), before training
    best/                     with train.keep_best: the model of the best held-out evaluation, and best.json
    checkpoints/step-000040/  model/ (standard layout), optimizer.pt, scheduler.pt (tensors only: read with
                              weights_only=True), rng-<rank>.json, state.json, manifest.json (every file's sha256)
    model/                    the final model (adapter or full), and merged/ with LoRA
    report.json               written last: its presence means the run finished
Everything is written to a temporary name and renamed, so a crash never leaves a half-written folder that looks
complete, and the newest complete checkpoint survives any failure; a checkpoint damaged later is recognised by its
manifest and passed over for an older one. overwrite=true removes only the entries above, in a folder that holds a
run; a folder holding anything else is never touched. A resume or a rerun must be the same run (stage, settings less
logging and checkpoint frequency, data by content) or it is refused.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
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
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from . import models
from .config import AlignError, ConfigError, LogConfig, TrainConfig, to_yaml
from .precision import resolve as resolve_precision

log = logging.getLogger("align")


class NonFiniteLoss(AlignError):
    """Training produced a NaN or infinite loss (or gradient): the run stops before that update, so its last
    checkpoint holds the last good weights."""


def stop_if_not_finite(run: "Run", step: int, values: dict[str, float]) -> None:
    """Raise NonFiniteLoss naming the first non-finite value and the checkpoint a resume would start from."""
    bad = next(((k, v) for k, v in values.items() if v is not None and not math.isfinite(v)), None)
    if bad is None:
        return
    last = run.latest_checkpoint()
    where = (f"the last good checkpoint is {last} (resume=true continues from it)" if last is not None else
             "no checkpoint was written (train.save_every=0), so nothing was saved")
    raise NonFiniteLoss(f"{run.dir}: step {step}: {bad[0]} is {bad[1]}; stopped before the update; {where}")


def reduce_sums(accelerator, sums: dict[str, Any]) -> dict[str, float]:
    """Metric sums by name (tensors or numbers), summed over every process in one all-reduce. Every process must
    pass the same names."""
    names = sorted(sums)
    if not names:
        return {}
    stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).to(accelerator.device).reshape(())
                           for k in names])
    return dict(zip(names, accelerator.reduce(stacked, "sum").tolist()))


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


def make_accelerator(train: TrainConfig, seed: int):
    accelerator = plain_accelerator(train.precision, seed)
    check_batch_split(train, accelerator.num_processes)
    if accelerator.distributed_type.value == "DEEPSPEED" and (train.save_every or False):
        # A ZeRO optimizer's state lives in DeepSpeed's own partitions, which no torch API gathers into one file.
        raise ConfigError("train.save_every: mid-run checkpoints under DeepSpeed are not supported (the final model "
                          "is saved in full); set train.save_every=0, or use recipes/accelerate/fsdp2.yaml")
    return accelerator


def sharded(accelerator) -> bool:
    """Whether the processes hold only shards of the weights (FSDP, DeepSpeed): reading them whole is then a
    collective that every process must join."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def full_state_dict(accelerator, model) -> Optional[dict]:
    """The prepared model's whole weights gathered on the main process when they are sharded (accelerate's
    get_state_dict: FSDP2's full state dict, ZeRO-3's 16-bit consolidation), for models.save/save_merged; None
    when each process holds them whole (one process, DDP), and the unwrapped model is saved as it is. Every process
    must call it."""
    if not sharded(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    return state if accelerator.is_main_process else None


def _optimizer_state(accelerator, model, optimizer) -> Optional[dict]:
    """The optimizer's state for a checkpoint, on the main process. Under FSDP every process holds a shard of it:
    torch gathers it into a full state dict keyed by parameter name (a collective), which a resume shards again
    after `prepare` (Run.restore_sharded_optimizers)."""
    if accelerator.distributed_type.value != "FSDP":
        return optimizer.state_dict() if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if accelerator.is_main_process else None


def plain_accelerator(precision: str, seed: int):
    """The accelerator with logging set up and every RNG seeded; no training settings to check (evaluation)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    choice = resolve_precision(precision)
    # cpu=True on a machine without CUDA makes accelerate join a torchrun/`accelerate launch` group over gloo
    # (MULTI_CPU) instead of silently running each process alone.
    accelerator = Accelerator(mixed_precision=choice.mixed_precision, cpu=not torch.cuda.is_available())
    setup_logging(accelerator.is_main_process)
    log.info("precision: %s", choice.describe())
    asked = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"]
    if asked and not sharded(accelerator):
        # accelerate (1.15) shards only on GPUs and other accelerators: CPU processes silently run plain DDP.
        log.warning("the accelerate config asks for %s, but accelerate runs these %s processes as %s: every "
                    "process holds the whole model", asked[0], accelerator.device.type,
                    accelerator.distributed_type.value)
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
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename. Only for folders the
    caller's own run wrote (a run's model/, merged/): whatever `final` held is replaced."""
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
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 whatever the locale, on disk (fsync) before the rename: after a crash the file is whole or absent."""
    tmp = Path(path).with_name(f".tmp-{Path(path).name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_jsonl_rows(path: Path) -> tuple[list[dict], int]:
    """The rows of a JSONL file the run wrote (metrics.jsonl) and how many lines were damaged (a half-written last
    line after a crash, say) and left out."""
    rows, damaged = [], 0
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            damaged += 1
    return rows, damaged


# --------------------------------------------------------------------------------------------------------------
# RNG state (exact resume: dropout masks and sampling continue as if never interrupted). Stored as JSON: a resumed
# run reads nothing that could execute code.


def _tensor_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": _tensor_bytes(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_bytes(t) for t in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(t) for t in state["cuda"]])


def _load_tensors(path: Path) -> Any:
    """torch.load of tensors and plain containers only (weights_only=True). A file that holds anything else fails
    here, and the caller says why in one line: torch's warnings about a foreign pickle protocol add nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=True)


def _legacy_rng_state(path: Path) -> dict:
    """RNG state of a checkpoint written by align 0.1 (rng-<rank>.pt), read with weights_only=True: only tensors,
    numpy arrays and plain containers are allowed, nothing that runs code."""
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        old = _load_tensors(path)
    version, internal, gauss = old["python"]
    kind, keys, pos, has_gauss, cached = old["numpy"]
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": _tensor_bytes(old["torch"])}
    if "cuda" in old:
        state["cuda"] = [_tensor_bytes(t) for t in old["cuda"]]
    return state


# --------------------------------------------------------------------------------------------------------------
# What a run is: its settings and the content of its data (a resumed or skipped run must be the same run)

# Settings that change nothing a run computes: where it is, how it logs and how often it checkpoints.
# The model card's words (card.) are written at the end and change no number either.
VOLATILE_SETTINGS = ("output_dir", "resume", "overwrite", "log.", "train.save_every", "train.keep_checkpoints", "card.")


def flat_settings(cfg: Any) -> dict[str, Any]:
    """The resolved config as {dotted.key: value}, less VOLATILE_SETTINGS."""
    return _lasting(_flatten(_plain(cfg)))


def _lasting(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if not any(k == p or (p.endswith(".") and k.startswith(p))
                                                     for p in VOLATILE_SETTINGS)}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def input_files(cfg: Any) -> list[str]:
    """The data files a config reads: every DataSource, and a rule's files (e.g. gsm8k_exact's `data`)."""
    from .config import DataSource, RewardConfig

    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, DataSource):
            found.append(node.path)
        elif isinstance(node, RewardConfig):
            found.extend(v for v in node.rule_args.values() if isinstance(v, str) and Path(v).is_file())
        elif dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))

    walk(cfg)
    return sorted(set(found))


_digests: dict[tuple, str] = {}


def content_digest(path: str) -> Optional[str]:
    """sha256 of a file's bytes (remembered per size and mtime: a pipeline asks several times); for a folder, of its
    listing (names, sizes, mtimes); None for anything else (a Hub dataset id)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _digests:
            _digests[key] = _file_sha256(p)
        return _digests[key]
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return "listing:" + h.hexdigest()
    return None


def run_identity(cfg: Any, stage: str) -> dict:
    """What makes two runs the same run: the stage, its settings (less VOLATILE_SETTINGS) and its data by content."""
    return {"stage": stage, "settings": flat_settings(cfg),
            "inputs": {path: content_digest(path) for path in input_files(cfg)}}


PRECISION_KEY = "train.precision"


def identity_mismatch(recorded: dict, current: dict) -> Optional[str]:
    """Why a run recorded as `recorded` is not the run `current` describes (None when it is)."""
    if recorded.get("stage") not in (None, current["stage"]):
        return f"it holds a run of stage {recorded['stage']}, not {current['stage']}"
    old, new = recorded.get("settings", {}), current["settings"]
    # Precision is compared by what the run computes in: `auto` may pick another precision on other hardware, and an
    # explicit setting that names what `auto` picked is the same run.
    before = recorded.get("precision") if old.get(PRECISION_KEY) == "auto" else old.get(PRECISION_KEY)
    after = current.get("precision") if new.get(PRECISION_KEY) == "auto" else new.get(PRECISION_KEY)
    known = before is not None and after is not None  # run.json written before precision was recorded: not known
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not (k == PRECISION_KEY and known))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        return f"its settings differ: {shown}{more}"
    if known and before != after:
        return (f"it computed in {before} and this run would compute in {after}, which would change the numbers "
                f"mid-run; set {PRECISION_KEY}={before} to go on as it ran")
    old_inputs = recorded.get("inputs")
    if old_inputs is not None:
        edited = sorted(p for p in old_inputs.keys() & current["inputs"].keys()
                        if old_inputs[p] != current["inputs"][p])
        if edited:
            return f"its data changed since the run started: {', '.join(edited)}"
    return None


# --------------------------------------------------------------------------------------------------------------
# One run per folder: an exclusive lock for the run's life


LOCK_FILE = ".align.lock"
_held_locks: dict[str, "FolderLock"] = {}


class FolderLock:
    """An exclusive advisory lock (flock) on FOLDER/.align.lock, holding the owner's process id. The kernel drops it
    when the owner exits, however it exits, so a lock left by a dead process is simply taken over. Runs in one
    process follow each other (a pipeline's stages, a failed stage and its resume): a folder this process already
    locked is handed to the newer run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: Optional[int] = None

    def refuse_if_held(self, at: str) -> None:
        """A one-line ConfigError naming the process that holds the folder, if another live one does."""
        pid = self.holder()
        if pid is not None:
            raise ConfigError(f"{at}={self.folder}: another run is using this folder (process {pid}); wait for it "
                              f"to finish, or choose another output_dir")

    def holder(self) -> Optional[int]:
        """The process id of another live process holding the lock, or None."""
        if not self.path.is_file() or str(self.path.resolve()) in _held_locks:
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        finally:
            os.close(fd)
        return None

    def acquire(self) -> None:
        key = str(self.path.resolve())
        if key in _held_locks:
            _held_locks.pop(key).release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise ConfigError(f"{self.folder}: another run is using this folder (process {pid if pid else '?'}); "
                              f"wait for it to finish, or choose another output_dir") from None
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            log.info("%s: took over the lock left by process %d (no longer running)", self.folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _held_locks[key] = self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            _held_locks.pop(str(self.path.resolve()), None)


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (ValueError, OSError):
        return None


def check_output_dir(folder: Path, at: str = "output_dir") -> None:
    """A folder a run can create or use: not a file, under a writable folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{at}={folder} is a file, not a folder")
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{at}={folder}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{at}={folder}: {parent} is not writable")


def make_dir(folder: Path, at: str = "output_dir") -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{at}={folder}: cannot create it ({err.strerror or err})") from None


def holds_files(folder: Path) -> bool:
    """The folder exists and holds something besides a lock file."""
    return Path(folder).is_dir() and any(e.name != LOCK_FILE for e in Path(folder).iterdir())


def clear_entries(folder: Path, names: Sequence[str], what: str) -> None:
    """Delete what an earlier run of ours wrote in `folder` (the `names`, and temporary `.tmp-*` leftovers) and
    nothing else; say what was left in place. Never in a folder another live process has locked."""
    FolderLock(folder).refuse_if_held("overwrite=true: output_dir")
    kept = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.name in names or entry.name.startswith(".tmp-"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        elif entry.name != LOCK_FILE:
            kept.append(entry.name)
    if kept:
        log.info("overwrite=true: replaced the %s in %s; left %d files that are not its own in place: %s", what,
                 folder, len(kept), ", ".join(kept[:5]) + (" ..." if len(kept) > 5 else ""))


# --------------------------------------------------------------------------------------------------------------
# The run folder

RUN_FILE = "run.json"  # written when a run starts: stage, settings and data digests (it marks the folder as a run)
BEFORE_FILE = "before.json"  # held-out numbers measured before the first update (a resumed run reports them too)
# Everything a run writes in its folder: overwrite=true removes these (and .tmp-* leftovers), nothing else.
BEST_DIR = "best"  # train.keep_best: the model of the best held-out evaluation, with best.json
RUN_ENTRIES = (RUN_FILE, "config.yaml", "metrics.jsonl", "tb", "wandb", "checkpoints", "model", "merged",
               BEFORE_FILE, "report.json", BEST_DIR, "audit.md", "audit.json", "forgetting_before.json")


class Run:
    """One stage's run folder: refuses any folder that holds something other than a run of ours, and a resume that
    is not the same run; holds the folder's lock for the run's life; writes the config, logs metrics, saves and finds
    checkpoints (falling back to an older one when the newest is damaged), and marks completion with report.json."""

    def __init__(self, cfg: Any, accelerator, stage: str):
        """Check the folder (nothing is written until `start`, so bad input leaves no run folder behind)."""
        self.cfg, self.accelerator, self.stage = cfg, accelerator, stage
        self.dir = Path(cfg.output_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.is_main = accelerator.is_main_process
        self.precision = resolve_precision(cfg.train.precision)  # what plain_accelerator set up
        self.identity = {**run_identity(cfg, stage), "precision": self.precision.used}
        self._lock = FolderLock(self.dir)
        self._tb = self._wandb = None
        self._metrics_file = None
        self._sharded_optimizer_states: dict[str, dict] = {}  # resumed under FSDP, loaded after prepare
        self.audit = None  # what the data audit found (run.start), for report.json and the model card
        check_output_dir(self.dir)
        if not holds_files(self.dir):
            return
        self._lock.refuse_if_held("output_dir")
        recorded = self.recorded_identity()
        if recorded is None:
            raise ConfigError(f"output_dir={self.dir} holds files that are not an align run; choose a new or empty "
                              f"folder (nothing in it was touched)")
        if not (cfg.overwrite or cfg.resume):
            raise ConfigError(
                f"output_dir={self.dir} already holds a run; pass resume=true to continue it or overwrite=true "
                f"to start again"
            )
        problem = None if cfg.overwrite else identity_mismatch(recorded, self.identity)
        if problem and problem.startswith("it computed in"):
            raise ConfigError(f"output_dir={self.dir} cannot be resumed by this run: {problem} (here "
                              f"{PRECISION_KEY}={cfg.train.precision} is {self.precision.describe()}), or pass "
                              f"overwrite=true to start again")
        if problem:
            remedy = "" if problem.startswith("it holds a run of stage") else "restore them, "
            raise ConfigError(f"output_dir={self.dir} cannot be resumed by this run: {problem}; {remedy}pass "
                              f"overwrite=true to start again, or choose another output_dir")

    def recorded_identity(self) -> Optional[dict]:
        """The identity of the run this folder holds (None when it holds no run of ours). Folders written by align 0.1
        have no run.json: their config.yaml and report.json stand in (no data digests)."""
        path = self.dir / RUN_FILE
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return recorded if isinstance(recorded, dict) and "settings" in recorded else None
        config = self.dir / "config.yaml"
        if not (config.is_file() and any((self.dir / n).exists() for n in ("metrics.jsonl", "report.json"))):
            return None
        from omegaconf import OmegaConf

        try:
            settings = OmegaConf.to_container(OmegaConf.load(config))
        except Exception:  # noqa: BLE001 - any unreadable config.yaml means: not a folder we recognise
            return None
        report = self.dir / "report.json"
        stage = json.loads(report.read_text()).get("stage") if report.is_file() else None
        return {"stage": stage, "settings": _lasting(_flatten(settings))}

    def start(self, held_out: bool = True) -> None:
        """Create the folder and lock it (with overwrite=true, clear the earlier run's files), write the run's identity
        and resolved config, open the metric writers. `held_out`: whether the stage has held-out data, which early
        stopping and keep_best act on (checked here, before anything is written)."""
        train_cfg = self.cfg.train
        if (train_cfg.early_stopping.enabled or train_cfg.keep_best) and not held_out:
            raise ConfigError("train.early_stopping and train.keep_best act on held-out evaluations, and this run has "
                              "no held-out data: set data.validation or data.validation_fraction")
        check_final_model(train_cfg, self.accelerator)
        audit_cfg = getattr(self.cfg, "audit", None)
        if audit_cfg is not None and audit_cfg.enabled:  # every process reads the same data: all decide alike
            from . import audit

            self.audit = audit.audit_stage(self.cfg, self.stage)
            log.info("%s", self.audit.summary())
            if audit_cfg.fail_on_leak and self.audit.leaks:
                raise ConfigError(f"the data audit found {self.audit.leaks} held-out record(s) that are also in the "
                                  f"training data (audit.fail_on_leak=true); `python -m align.data audit RECIPE` "
                                  f"names their lines")
        self.accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes in it
        if self.is_main:
            self._prepare_folder()
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self._open_writers(self.cfg.log)
            if self.audit is not None:
                self.audit.write(self.dir)

    # -- folder -----------------------------------------------------------------------------------------------
    def _prepare_folder(self) -> None:
        make_dir(self.dir)
        self._lock.acquire()
        if self.cfg.overwrite:
            clear_entries(self.dir, RUN_ENTRIES, f"earlier {self.stage} run")
        if not (self.dir / RUN_FILE).is_file():  # a resumed run keeps the identity it started with
            write_json_atomic(self.dir / RUN_FILE, {**self.identity, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_text_atomic(self.dir / "config.yaml", to_yaml(self.cfg))

    @property
    def finished(self) -> bool:
        """The folder holds a completed run of this stage, settings and data (checked in __init__), and overwrite=true
        does not ask to redo it."""
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
        row = {"step": step, **{k: v if v is None or isinstance(v, (int, float)) else _jsonable(v)
                                for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def _truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric rows logged after the checkpoint (they are recomputed), and damaged lines (a
        half-written last line when the run was killed)."""
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return
        rows, damaged = read_jsonl_rows(path)
        if damaged:
            log.warning("%s: left out %d damaged line(s) (the run was interrupted while writing)", path, damaged)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))
        if self._metrics_file is not None:  # the writer holds the replaced file: reopen it on the new one
            self._metrics_file.close()
            self._metrics_file = open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self._lock.release()

    # -- held-out numbers before training ------------------------------------------------------------------------
    def before_training(self, start: int, evaluate: Optional[Callable[[], dict]]) -> dict:
        """The held-out metrics of the starting model: measured (and logged, and kept in before.json) on a fresh
        start; read back from before.json on a resume, so the report still says where training started."""
        if evaluate is None:
            return {}
        path = self.dir / BEFORE_FILE
        if start > 0:
            return json.loads(path.read_text()) if path.is_file() else {}
        before = evaluate()
        self.log(before, step=0)
        if self.is_main:
            write_json_atomic(path, before)
        return before

    # -- checkpoints ------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Optional[Path]:
        found = sorted(self.checkpoints.glob("step-*")) if self.checkpoints.is_dir() else []
        return found[-1] if found else None

    def save_checkpoint(self, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                        base_location: Optional[str] = None, extra: Optional[dict[str, tuple]] = None) -> Path:
        """checkpoints/step-N/: the model, its optimizer and schedule, every process's RNG, `state`, and for each
        `extra` part (e.g. PPO's critic: name -> (model, optimizer, scheduler)) the same under its name; last, a
        manifest of every file's size and sha256, so that a damaged checkpoint is recognised on resume."""
        acc = self.accelerator
        final = self.checkpoints / f"step-{step:06d}"
        tmp = self.checkpoints / f".tmp-step-{step:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        (tmp / f"rng-{acc.process_index}.json").write_text(json.dumps(rng_state()))
        parts = {"": (model, optimizer, scheduler), **{f"{k}_": v for k, v in (extra or {}).items()}}
        for prefix, (part_model, part_optimizer, part_scheduler) in parts.items():
            # Sharded weights and optimizer state are gathered by every process together, then written by the main
            # one: the model in the same files and layout as an unsharded run's; under FSDP the optimizer's state is
            # keyed by parameter name (torch's full optimizer state dict), so a resume needs the same launch config.
            weights = full_state_dict(acc, part_model)
            optimizer_state = _optimizer_state(acc, part_model, part_optimizer)
            if self.is_main:
                models.save(acc.unwrap_model(part_model), tokenizer, tmp / f"{prefix}model",
                            base_location if prefix == "" else None, state_dict=weights)
                torch.save(optimizer_state, tmp / f"{prefix}optimizer.pt")
                torch.save(part_scheduler.state_dict(), tmp / f"{prefix}scheduler.pt")
        if self.is_main:
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=_jsonable))
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
            os.replace(tmp, final)
            for old in sorted(self.checkpoints.glob("step-*"))[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def resume(self, model, optimizer, scheduler, extra: Optional[dict[str, tuple]] = None) -> dict:
        """With resume=true, load the newest intact checkpoint into these objects (before accelerator.prepare) and
        return its state; otherwise (or with none yet) {"step": 0}. A damaged checkpoint (a file missing, cut short or
        changed since it was written, or one that does not load) is passed over for the next older one, and the log
        says so. Metric rows past the loaded step are dropped."""
        if not self.cfg.resume:
            return {"step": 0}
        found = sorted(self.checkpoints.glob("step-*"), reverse=True) if self.checkpoints.is_dir() else []
        damaged = []
        for checkpoint in found:
            problem = verify_checkpoint(checkpoint)
            if problem is None:
                try:
                    state = self.load_checkpoint(checkpoint, model, optimizer, scheduler, extra)
                except Exception as err:  # noqa: BLE001 - whatever fails to load, the checkpoint cannot be used
                    problem = f"it does not load: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                else:
                    self._drop_superseded(damaged)
                    return state
            damaged.append(checkpoint.name)
            log.warning("%s is damaged (%s): falling back to an older checkpoint", checkpoint, problem)
        if found:
            raise ConfigError(f"{self.checkpoints}: no intact checkpoint to resume from ({', '.join(damaged)} damaged);"
                              f" pass overwrite=true to start again")
        if self.is_main:
            log.info("resume=true but %s has no checkpoint yet: starting from step 0", self.dir)
            self._truncate_metrics_after(-1)
        return {"step": 0}

    def _drop_superseded(self, names: list[str]) -> None:
        """Damaged checkpoints newer than the one resumed from: the resumed run recomputes their steps (as it does
        their metric rows), and a damaged one must not outlive good ones when old checkpoints are pruned."""
        self.accelerator.wait_for_everyone()  # every process has read the checkpoint it resumes from
        if self.is_main:
            for name in names:
                shutil.rmtree(self.checkpoints / name)
                log.info("removed the damaged %s (its steps are run again)", name)

    def load_checkpoint(self, path: Path, model, optimizer, scheduler, extra: Optional[dict[str, tuple]] = None
                        ) -> dict:
        """Restore model weights (before accelerator.prepare), optimizer, schedule, the `extra` parts and this
        process's RNG. Nothing is unpickled: weights are safetensors, optimizer and schedule states are read with
        weights_only=True (tensors and plain containers only), the RNG state and `state` are JSON."""
        parts = {"": (model, optimizer, scheduler), **{f"{k}_": v for k, v in (extra or {}).items()}}
        self._sharded_optimizer_states = {}  # none from a damaged checkpoint tried before this one
        for prefix, (part_model, part_optimizer, part_scheduler) in parts.items():
            models.load_trained_weights(part_model, path / f"{prefix}model")
            optimizer_state = _load_tensors(path / f"{prefix}optimizer.pt")
            if self.accelerator.distributed_type.value == "FSDP":
                # `prepare` swaps the parameters for sharded ones and the optimizer's state would stay with the
                # old ones: the full state is sharded onto the new parameters after it (restore_sharded_optimizers).
                self._sharded_optimizer_states[prefix] = optimizer_state
            else:
                part_optimizer.load_state_dict(optimizer_state)
            part_scheduler.load_state_dict(_load_tensors(path / f"{prefix}scheduler.pt"))
        rank = self.accelerator.process_index
        rng_file, legacy = path / f"rng-{rank}.json", path / f"rng-{rank}.pt"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        elif legacy.is_file():
            set_rng_state(_legacy_rng_state(legacy))
        else:
            raise ConfigError(f"{path}: no RNG state for process {rank}; resume with the same number of processes "
                              f"as the interrupted run")
        state = json.loads((path / "state.json").read_text())
        if self.is_main:
            self._truncate_metrics_after(state["step"])
        log.info("resumed from %s (step %d)", path, state["step"])
        return state

    def restore_sharded_optimizers(self, model, optimizer, extra: Optional[dict[str, tuple]] = None) -> None:
        """After `accelerator.prepare` under FSDP: shard the resumed checkpoint's full optimizer states onto the
        prepared (sharded) models' parameters; `extra` maps a part's name to its (model, optimizer). Nothing to do
        otherwise: `resume` loaded them before `prepare`."""
        parts = {"": (model, optimizer), **{f"{k}_": v for k, v in (extra or {}).items()}}
        pending, self._sharded_optimizer_states = self._sharded_optimizer_states, {}
        for prefix, state in pending.items():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            part_model, part_optimizer = parts[prefix]
            set_optimizer_state_dict(part_model, getattr(part_optimizer, "optimizer", part_optimizer), state,
                                     options=StateDictOptions(full_state_dict=True))

    # -- the end ----------------------------------------------------------------------------------------------
    def finish(self, report: dict) -> None:
        """report.json (which marks the run complete), then a model card (README.md) in every model folder the run
        wrote, made from that report (align/card.py)."""
        from . import card

        report["precision"] = self.precision.as_dict()  # what it computed in, and why (auto's reason)
        if self.audit is not None:
            report["audit"] = self.audit.counts
        if self.is_main:
            write_json_atomic(self.dir / "report.json", {"stage": self.stage, **report})
            for kind in ("model", "merged", BEST_DIR):
                if (self.dir / kind).is_dir():
                    card.write(self.dir / kind, self.cfg, self.stage, report, kind)
        self.close()
        self.accelerator.wait_for_everyone()


MANIFEST = "manifest.json"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {str(p.relative_to(folder)): [p.stat().st_size, _file_sha256(p)] for p in files}}


def verify_checkpoint(folder: Path) -> Optional[str]:
    """Why a checkpoint cannot be used (None when every file its manifest lists is there, whole and unchanged).
    Checkpoints written by align 0.1 have no manifest: their state.json must read."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            return "its manifest is unreadable"
        for name, (size, digest) in sorted(files.items()):
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, not {size}"
            if _file_sha256(path) != digest:
                return f"{name} changed since it was written"
        return None
    try:
        json.loads((folder / "state.json").read_text())["step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return "state.json is missing or unreadable"
    return None


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


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
    weights = full_state_dict(run.accelerator, model)  # sharded weights: every process gathers, the main one writes
    if not run.is_main:
        return
    net = run.accelerator.unwrap_model(model)
    with atomic_dir(run.dir / "model") as tmp:
        models.save(net, tokenizer, tmp, base_location, state_dict=weights)
        if settings is not None:
            settings(tmp, False)
    if cfg.lora.enabled and cfg.save_merged:
        with atomic_dir(run.dir / "merged") as tmp:
            models.save_merged(net, tokenizer, tmp, state_dict=weights)
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
    run.restore_sharded_optimizers(model, optimizer)
    if sharded(accelerator):
        log.info("weights sharded over %d processes (%s)", accelerator.num_processes,
                 accelerator.distributed_type.value)
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
                 checkpoint_state: Optional[Callable[[], dict]] = None, before: Optional[dict] = None):
        self.cfg, self.run, self.accelerator, self.model, self.tokenizer = cfg, run, accelerator, model, tokenizer
        self.schedule, self.evaluate, self.base_location = schedule, evaluate, base_location
        self.checkpoint_state = checkpoint_state or (lambda: {})
        self.batch_ids: list[int] = []
        self.last_metrics: dict[str, float] = {}
        self.steps_done = schedule.start
        self.final_model = "last"
        self.watch = Watch(cfg.train, run.stage, schedule.state)  # early stopping and the best model
        self._last_evaluation: tuple[int, dict] = (-1, {})
        if before and schedule.start == 0:  # the starting model is a candidate for the best one
            self._observe(0, before)
        self._progress = Progress(schedule.num_steps, schedule.start,
                                  accelerator.is_main_process and cfg.log.progress, run.stage)
        self._timer = Timer()
        self._window_tokens = self._window_steps = 0

    def __iter__(self) -> Iterator[tuple[int, list[list[int]]]]:
        from .data import chunks, shard

        acc = self.accelerator
        for step in range(self.schedule.start, self.schedule.num_steps):
            if self.watch.stopped_at is not None:  # early stopping (or a resume of a run that had stopped)
                break
            self.batch_ids = self.schedule.sampler.indices(step)
            mine = shard(self.batch_ids, acc.process_index, acc.num_processes)
            yield step, chunks(mine, self.cfg.train.micro_batch_size)
            self.steps_done = step + 1
        self._progress.close()

    def accumulating(self, k: int, n: int):
        """Gradient sync only on the last of n micro-batches (DDP all-reduces once per step)."""
        return contextlib.nullcontext() if k == n - 1 else self.accelerator.no_sync(self.model)

    def end_step(self, step: int, metrics: dict[str, float], tokens: int) -> None:
        """Clip, step the optimizer and the schedule; then progress, the metrics window, evaluation and
        checkpoints at their intervals. `metrics` are this step's (already reduced over processes)."""
        cfg, schedule = self.cfg, self.schedule
        stop_if_not_finite(self.run, step + 1, {k: v for k, v in metrics.items() if k.startswith("loss/")})
        grad_norm = None
        if cfg.train.max_grad_norm:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
            stop_if_not_finite(self.run, step + 1, {"optim/grad_norm": float(grad_norm)})
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
            held_out = self.evaluate()
            self.run.log(held_out, step=done)
            if self._observe(done, held_out):
                return  # the loop ends here; no checkpoint is needed for a run about to finish
        if cfg.train.save_every and done % cfg.train.save_every == 0:
            self.run.save_checkpoint(done, self.model, self.tokenizer, schedule.optimizer, schedule.scheduler,
                                     {"epoch": schedule.sampler.epoch_of(step), "watch": self.watch.state_dict(),
                                      **self.checkpoint_state()}, self.base_location)

    def _observe(self, step: int, held_out: dict) -> bool:
        self._last_evaluation = (step, held_out)
        return self.watch.observe(step, held_out, self._save_best)

    def _save_best(self, step: int, value: float) -> None:
        save_best(self.run, step, self.watch.metric, value, self.model, self.tokenizer, self.base_location)

    def final_evaluation(self, evaluate: Optional[Callable[[], dict]] = None) -> dict:
        """The held-out numbers after the loop (logged at the last step), taken as the watch's last evaluation; with
        train.final_model=best, the best model's weights are put back first when the last is not the best, and the
        numbers are that model's. `evaluate` replaces the loop's own callable (e.g. a fuller final report)."""
        evaluate = evaluate or self.evaluate
        if evaluate is None:
            return {}
        step, held_out = self._last_evaluation
        if step != self.steps_done or evaluate is not self.evaluate:  # not evaluated at this step yet (in this form)
            held_out = evaluate()
            if step != self.steps_done:
                self._last_evaluation = (self.steps_done, held_out)
                self.watch.observe(self.steps_done, held_out, self._save_best, last=True)
        self.run.log({k: v for k, v in held_out.items() if isinstance(v, (int, float))}, step=self.steps_done)
        if self.cfg.train.final_model == "best" and self.watch.best_step not in (None, self.steps_done):
            best_step = load_best(self.run, self.model)
            log.info("train.final_model=best: the model of step %d (%s %.6g) replaces the last (step %d)",
                     best_step, self.watch.metric, self.watch.best, self.steps_done)
            self.final_model = f"best (step {best_step})"
            held_out = evaluate()
        return held_out

    def outcome(self) -> dict:
        """For report.json: steps run, and with early stopping or keep_best what the watch decided."""
        out = {"steps": self.steps_done}
        if self.watch.active:
            out.update(early_stopping=self.watch.summary(), final_model=self.final_model)
        return out


# --------------------------------------------------------------------------------------------------------------
# Early stopping and the best model

# The held-out metric each stage ranks by when train.early_stopping.metric is null (transformers' Trainer and TRL rank
# by the evaluation loss; an RL policy has no loss on held-out data, its held-out reward is what it optimises).
HEADLINE_METRIC = {"sft": "loss/val", "rm": "loss/val", "dpo": "loss/val", "ppo": "reward/val", "grpo": "reward/val"}


def metric_mode(metric: str, mode: str) -> str:
    """min or max: `auto` is min for a loss, a perplexity or a KL, max for anything else (accuracy, reward)."""
    if mode != "auto":
        return mode
    return "min" if any(word in metric for word in ("loss", "ppl", "kl")) else "max"


class Watch:
    """Early stopping and the best model, from the held-out evaluations (the evaluation before training counts: if
    training only makes things worse, the best model is the starting one). Its state goes into every checkpoint, so a
    resumed run stops at the step an uninterrupted one would.

        watch.observe(step, held_out_metrics, save_best)   # -> True when the run should stop now

    An evaluation improves on the best when it beats it by more than min_delta; after `patience` evaluations in a row
    that do not, the run stops (with early_stopping.enabled). A metric that is not finite never improves."""

    def __init__(self, train_cfg: TrainConfig, stage: str, state: Optional[dict] = None):
        es = train_cfg.early_stopping
        self.stops, self.keeps_best = es.enabled, train_cfg.keep_best
        self.metric = es.metric or HEADLINE_METRIC[stage]
        self.mode = metric_mode(self.metric, es.mode)
        self.patience, self.min_delta = es.patience, es.min_delta
        saved = (state or {}).get("watch") or {}
        self.best: Optional[float] = saved.get("best")
        self.best_step: Optional[int] = saved.get("best_step")
        self.since_best: int = saved.get("since_best", 0)
        self.evaluations: int = saved.get("evaluations", 0)
        self.stopped_at: Optional[int] = saved.get("stopped_at")

    @property
    def active(self) -> bool:
        return self.stops or self.keeps_best

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best,
                "evaluations": self.evaluations, "stopped_at": self.stopped_at}

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def observe(self, step: int, metrics: dict, save_best: Optional[Callable[[int, float], None]] = None,
                last: bool = False) -> bool:
        """Take the evaluation at `step` (after `step` updates); call save_best(step, value) when it is the best so far
        and keep_best is on. Returns whether the run should stop (never for the `last` evaluation, after the final
        step: that run was not stopped). Every process calls it with the same (reduced) metrics, so all decide
        alike."""
        if not self.active:
            return False
        if self.metric not in metrics:
            raise ConfigError(f"train.early_stopping.metric={self.metric}: the held-out evaluation has no such metric; "
                              f"it has {', '.join(sorted(k for k in metrics if k.endswith('/val')))}")
        value = float(metrics[self.metric])
        self.evaluations += 1
        if self.improves(value):
            self.best, self.best_step, self.since_best = value, step, 0
            if self.keeps_best and save_best is not None:
                save_best(step, value)
        else:
            self.since_best += 1
        if self.stops and not last and self.stopped_at is None and self.since_best >= self.patience:
            self.stopped_at = step
            log.info("early stopping at step %d: %s has not improved on %.6g (step %d) by more than %g in %d "
                     "evaluations", step, self.metric, self.best, self.best_step, self.min_delta, self.since_best)
        return self.stopped_at is not None

    def summary(self) -> dict:
        """For report.json and the model card."""
        if self.stopped_at is not None:
            reason = (f"{self.metric} did not improve on {self.best:.6g} (step {self.best_step}) by more than "
                      f"{self.min_delta:g} in {self.patience} evaluations")
        elif self.stops:
            reason = "ran to the end: the metric kept improving within the patience"
        else:
            reason = "early stopping off; the best evaluation is kept (train.keep_best)"
        return {"metric": self.metric, "mode": self.mode, "patience": self.patience if self.stops else None,
                "min_delta": self.min_delta, "stopped_at": self.stopped_at, "best_step": self.best_step,
                "best": self.best, "evaluations": self.evaluations, "reason": reason}


def save_best(run: "Run", step: int, metric: str, value: float, model, tokenizer,
              base_location: Optional[str] = None) -> None:
    """output_dir/best: the model in the checkpoints' layout (standard transformers/peft, loadable by from_pretrained)
    and best.json (step, metric, value), written atomically; every process calls it (sharded weights are gathered)."""
    weights = full_state_dict(run.accelerator, model)
    if run.is_main:
        with atomic_dir(run.dir / BEST_DIR) as tmp:
            models.save(run.accelerator.unwrap_model(model), tokenizer, tmp, base_location, state_dict=weights)
            (tmp / "best.json").write_text(json.dumps({"step": step, "metric": metric, "value": value}, indent=1))
        log.info("best %s so far: %.6g at step %d, saved to %s", metric, value, step, run.dir / BEST_DIR)
    run.accelerator.wait_for_everyone()


def load_best(run: "Run", model) -> int:
    """Put the weights of output_dir/best back into the (prepared) model; returns the step they are from."""
    check_final_model(run.cfg.train, run.accelerator)  # checked before training too (Loop / ppo)
    run.accelerator.wait_for_everyone()  # the main process has finished writing best/
    folder = run.dir / BEST_DIR
    models.load_trained_weights(run.accelerator.unwrap_model(model), folder)
    return json.loads((folder / "best.json").read_text())["step"]


def check_final_model(train_cfg: TrainConfig, accelerator) -> None:
    if train_cfg.final_model == "best" and sharded(accelerator):
        raise ConfigError("train.final_model=best is not supported with sharded weights (FSDP, ZeRO-3) yet: use "
                          "final_model=last (the best model is still kept in output_dir/best with keep_best)")


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
