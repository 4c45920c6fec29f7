"""Load, adapt and save models: transformers for architectures and templates, peft for adapters.

Model locations (`model.name_or_path`):
    a Hub id or local folder          from_pretrained as usual
    a .gguf file (or gguf_file=...)   dequantized once into $ALIGN_CACHE/gguf/<name>-<hash>/, loaded from there after
    pkg:PACKAGE/PATH                  a file or folder shipped inside an installed Python package (models from PyPI)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import data, losses
from .config import ConfigError, LoraConfig, ModelConfig

log = logging.getLogger("align")


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", "~/.cache/align")).expanduser()


# --------------------------------------------------------------------------------------------------------------
# Locations


def resolve(name: str) -> str:
    """`pkg:PACKAGE/PATH` -> the absolute path inside the installed package; `~` expanded; else unchanged."""
    if name.startswith("pkg:"):
        package, _, rest = name[4:].partition("/")
        spec = importlib.util.find_spec(package)  # find, don't import: some model packages import heavy modules
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model.name_or_path={name}: Python package {package!r} is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / rest
        if not path.exists():
            raise ConfigError(f"model.name_or_path={name}: {path} does not exist")
        return str(path)
    if name.startswith("~"):
        return str(Path(name).expanduser())
    return name


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_location(path: str, at: str = "model.name_or_path") -> None:
    """A model location that `from_pretrained` can use: a model folder, a .gguf file, or something shaped like a Hub
    id (tried later; a failure is a one-line error too). A missing path, an align run folder given instead of its
    model, or a folder without config.json is a one-line ConfigError here, before anything loads."""
    p = Path(path)
    if p.is_dir():
        if any((p / name).is_file() for name in ("config.json", "adapter_config.json", "tokenizer_config.json")):
            return
        for sub in ("merged", "model"):
            if (p / sub / "config.json").is_file() or (p / sub / "adapter_config.json").is_file():
                raise ConfigError(f"{at}={path} is an align run folder, not a model: its model is {p / sub}")
        raise ConfigError(f"{at}={path}: no config.json there, so it is not a transformers model folder")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConfigError(f"{at}={path} is a file; a model is a folder (or a .gguf file)")
        return
    if not _HUB_ID.fullmatch(path) or path.endswith(".gguf"):
        raise ConfigError(f"{at}={path}: no such file or folder")


def hub_or_folder_error(err: OSError, location: str, at: str) -> ConfigError:
    """transformers' OSError (not found locally, and the Hub unreachable or without it) as one line."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"{at}={location}: cannot load it: not a local model folder, and the Hub did not provide it "
                       f"({first})")


def materialize(cfg: ModelConfig, at: str = "model") -> str:
    """A location `from_pretrained` loads directly: GGUF files are converted once into the cache. The location is
    checked first (`check_location`)."""
    path = resolve(cfg.name_or_path)
    gguf = cfg.gguf_file
    if gguf is None and path.endswith(".gguf"):
        path, gguf = str(Path(path).parent), Path(path).name
    if gguf is None:
        check_location(path, f"{at}.name_or_path")
        return path
    src = Path(path) / gguf
    if not src.is_file():
        raise ConfigError(f"{at}: GGUF file {src} not found")
    out = cache_dir() / "gguf" / f"{src.stem}-{_file_digest(src)}"
    if (out / "config.json").is_file():
        return str(out)
    log.info("dequantizing %s once into %s (later runs load that folder)", src, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    config = quantized.config
    del config.quantization_config  # the weights we save are plain float32; save_pretrained refuses GGUF models
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right", at: str = "model"):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        location = resolve(cfg.tokenizer)
        check_location(location, f"{at}.tokenizer")
    else:
        location = materialize(cfg, at)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise hub_or_folder_error(err, location, f"{at}.tokenizer" if cfg.tokenizer else f"{at}.name_or_path") from None
    if cfg.chat_template:
        template = cfg.chat_template
        if template.endswith(".jinja"):  # a file name, never the template itself
            if not Path(resolve(template)).is_file():
                raise ConfigError(f"{at}.chat_template={template}: file not found")
            template = Path(resolve(template)).read_text()
        tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        # Batches mask padding explicitly (attention mask / loss mask), never by token id, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = padding_side
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Packed attention: exact and cheap attention for padding-free batches


def packed_segments(position_ids: torch.Tensor) -> list[int]:
    """Boundaries [0, ..., N] of the examples packed in one row: a new example starts wherever the position is
    not the previous one plus one (the rule transformers uses to detect packing)."""
    pos = position_ids[0]
    starts = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    return [0, *starts, pos.numel()]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """Causal SDPA run separately on each example of a packed row.

    Stock SDPA on a packed row builds an N x N block-diagonal mask and computes every block of the square, most of
    it masked out: with four examples per row that is ~4x the attention work, and a dense mask also keeps SDPA off
    its fastest kernels. Per example, attention is plain causal and costs only the diagonal blocks. Padded batches,
    KV-cache decoding and single sequences go to stock SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = (causal and attention_mask is None and position_ids is not None and query.shape[0] == 1
              and query.shape[2] == key.shape[2] == position_ids.shape[-1])
    bounds = packed_segments(position_ids) if packed else []
    if len(bounds) <= 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling, is_causal=True,
            enable_gqa=gqa)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # [1, N, heads, head_dim], like sdpa


def packed_sdpa_mask(*args, **kwargs):
    """No mask for a full forward without padding (the attention above is causal per example); stock SDPA's mask
    otherwise (padding, KV cache)."""
    from transformers.masking_utils import sdpa_mask

    full = (kwargs.get("attention_mask") is None and not kwargs.get("q_offset") and not kwargs.get("kv_offset")
            and kwargs.get("q_length") == kwargs.get("kv_length"))
    return None if full else sdpa_mask(*args, **kwargs)


PACKED_SDPA = "sdpa_packed"


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


_register_packed_attention()


def default_attention(cfg: ModelConfig, model_class) -> str | None:
    """The recipe's attention backend, or packed SDPA for models that support SDPA."""
    if cfg.attn_implementation:
        return cfg.attn_implementation
    return PACKED_SDPA if getattr(model_class, "_supports_sdpa", False) else None


def folder_attention(auto_cls, folder: str) -> str | None:
    """Packed SDPA for a saved model folder whose architecture supports SDPA (scorers load folders, not recipes)."""
    from transformers import AutoConfig

    model_class = _model_class(auto_cls, AutoConfig.from_pretrained(folder))
    return default_attention(ModelConfig(name_or_path=folder), model_class)


# --------------------------------------------------------------------------------------------------------------
# Models


def has_fast_bf16() -> bool:
    """The hardware multiplies bf16 natively (what `precision: auto` picks bf16 on; see align/precision.py)."""
    from .precision import auto_choice

    return auto_choice().used == "bf16"


def weight_dtype(cfg: ModelConfig, lora: LoraConfig) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    # Trainable weights stay float32 (autocast handles bf16 compute); a frozen LoRA base can live in bf16.
    return torch.bfloat16 if lora.enabled and has_fast_bf16() else torch.float32


def _quantization(lora: LoraConfig):
    if lora.quantization == "none":
        return None
    if not torch.cuda.is_available():
        raise ConfigError("lora.quantization=4bit (QLoRA) needs a CUDA GPU; this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.quantization=4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if has_fast_bf16() else torch.float16)


def load_pretrained(auto_cls, cfg: ModelConfig, lora: LoraConfig, seed: int, at: str = "model", **kwargs):
    """Build `auto_cls` (AutoModelForCausalLM, AutoModelForSequenceClassification...) from the recipe.
    With output_loading_info=True (pretrained only) returns (model, info) as transformers does."""
    from transformers import AutoConfig

    location = materialize(cfg, at)
    dtype = weight_dtype(cfg, lora)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code,
                                            **{k: v for k, v in kwargs.items() if k == "num_labels"})
    except OSError as err:
        raise hub_or_folder_error(err, location, f"{at}.name_or_path") from None
    attention = default_attention(cfg, _model_class(auto_cls, config))
    if attention:
        kwargs["attn_implementation"] = attention
    quant = _quantization(lora)  # raises on a machine that cannot quantize, whatever the init
    if cfg.init == "random":
        torch.manual_seed(seed)
        kwargs.pop("num_labels", None)
        kwargs.pop("output_loading_info", None)
        loaded = auto_cls.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)
    else:
        if quant is not None:
            kwargs["quantization_config"] = quant
        loaded = auto_cls.from_pretrained(location, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if cfg.disable_dropout:
        disable_dropout(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _model_class(auto_cls, config):
    try:
        return auto_cls._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def load_causal_lm(cfg: ModelConfig, lora: LoraConfig, seed: int, gradient_checkpointing: bool = False):
    """The policy: a causal LM, with LoRA adapters when `lora.enabled`."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, cfg, lora, seed)
    model.config.use_cache = False  # training: packed batches need it off, and no cache is reused anyway
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        model = add_lora(model, lora, task_type="CAUSAL_LM", seed=seed)
    return model


def load_policy_for_inference(name_or_path: str, at: str = "policy"):
    """(model, tokenizer) of a trained policy for sampling and scoring: a full model folder, a .gguf/`pkg:` name, or
    a LoRA adapter folder (its base, recorded in adapter_config.json, with the adapters merged in)."""
    import json

    from transformers import AutoModelForCausalLM

    location = Path(resolve(name_or_path))
    if not str(location).endswith(".gguf"):
        check_location(str(location), at)
    adapter = location / "adapter_config.json"
    if adapter.is_file():
        import peft

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base or not (Path(resolve(base)) / "config.json").is_file():
            raise ConfigError(f"{location}: an adapter whose base model ({base!r}) is not a local folder")
        model = load_pretrained(AutoModelForCausalLM, ModelConfig(name_or_path=base), LoraConfig(), seed=0)
        model = peft.PeftModel.from_pretrained(model, str(location)).merge_and_unload()
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(location)), padding_side="left")
    else:
        cfg = ModelConfig(name_or_path=name_or_path)
        model = load_pretrained(AutoModelForCausalLM, cfg, LoraConfig(), seed=0)
        tokenizer = load_tokenizer(cfg, padding_side="left")
    model.config.use_cache = False  # packed teacher-forced forwards need it off; generate turns it on per call
    model.requires_grad_(False).eval()
    return model, tokenizer


def add_lora(model, lora: LoraConfig, task_type: str, seed: int, modules_to_save: Optional[list[str]] = None):
    import peft

    if lora.quantization != "none":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
        target_modules=list(lora.target_modules) if lora.target_modules else "all-linear",
        modules_to_save=modules_to_save,
    )
    torch.manual_seed(seed)  # adapter init (A is random) is then the same in every process and every run
    try:
        return peft.get_peft_model(model, peft_config)
    except ValueError:
        if not lora.target_modules:
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules={list(lora.target_modules)}: not found in the model (its linear "
                          f"layers: {', '.join(linear)})") from None


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# Forward helpers


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if is_peft(model) else model
    base = getattr(base, "module", base)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def logits_at(model, batch) -> torch.Tensor:
    """Logits [K, V] only at the positions that predict a target (`batch.predict_mask`).

    The output head and the log-softmax over the vocabulary are the most expensive part of a small model's step;
    prompt, padding and the last position need no logits. transformers' `logits_to_keep` projects only the
    positions it is given. It is given the columns where any row predicts (a 1-D index, which every transformers 5
    release takes the same way: 5.20 added a per-row boolean mask, but vLLM's CPU build pins transformers < 5.20),
    and the rows' own positions are picked from those columns.
    """
    keep = batch.predict_mask
    inner = getattr(model, "module", model)  # DDP wraps the model
    if not _accepts_logits_to_keep(inner):
        return model(**batch.model_inputs(), use_cache=False).logits[keep]
    columns = keep.any(0).nonzero().squeeze(1)
    logits = model(**batch.model_inputs(), logits_to_keep=columns, use_cache=False).logits  # [B, len(columns), V]
    return logits[keep[:, columns]]


# --------------------------------------------------------------------------------------------------------------
# Saving and loading trained weights


def inner_model(model, state_dict: Optional[dict] = None) -> tuple:
    """The transformers/peft model that wrappers (the reward model) expose as `.hf`, and its entries of a state dict
    gathered from the wrapper (keys `hf.*`)."""
    if not hasattr(model, "hf"):
        return model, state_dict
    if state_dict is not None:
        state_dict = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
    return model.hf, state_dict


def _share_tied(model, state_dict: dict) -> dict:
    """A gathered state dict holds each tied weight (lm_head and the embeddings) as its own copy; transformers
    recognises ties by shared storage when it drops the duplicate, so the tied entries share one tensor again and
    the folder holds the same tensors as an unsharded save."""
    tied = {} if is_peft(model) else (getattr(model, "all_tied_weights_keys", None) or {})
    state_dict = dict(state_dict)
    for target, source in tied.items():
        if target in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]
    return state_dict


def save(model, tokenizer, out: Path, base_location: Optional[str] = None, state_dict: Optional[dict] = None
         ) -> None:
    """Standard layout: a peft adapter folder (adapter_config + safetensors) or a full transformers folder, with
    the tokenizer and its chat template. `base_location` is recorded in an adapter's config so that
    `from_pretrained(adapter_folder)` finds the base (a real folder, not a `pkg:` name). `state_dict`: the model's
    whole weights gathered from the processes that shard them (FSDP, ZeRO-3; train.full_state_dict); the model's
    own tensors are only this process's shard then."""
    model, state_dict = inner_model(model, state_dict)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model) and base_location is not None:
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = base_location
    had_card = (out / "README.md").exists()
    if state_dict is None:
        model.save_pretrained(out)
    else:  # peft picks the adapter's entries out of the whole state dict
        model.save_pretrained(out, state_dict=_share_tied(model, state_dict))
    if is_peft(model) and not had_card:
        # peft writes an empty model card ("[More Information Needed]" in every field): none is better than that.
        (out / "README.md").unlink(missing_ok=True)
    tokenizer.save_pretrained(out)


def save_merged(model, tokenizer, out: Path, state_dict: Optional[dict] = None) -> None:
    """Base weights with the adapters folded in, as a plain transformers folder (vLLM, TRL and
    `from_pretrained` load it without peft). Works on a copy: the trained peft model stays usable. With a gathered
    `state_dict` (sharded training) the copy is built from it, since the model itself holds only a shard."""
    import copy

    merged = (copy.deepcopy(model) if state_dict is None else unsharded_copy(model, state_dict)).merge_and_unload()
    merged.save_pretrained(Path(out))
    tokenizer.save_pretrained(Path(out))


def _unsharded_class(module: torch.nn.Module) -> type:
    """The module's own class: FSDP2's fully_shard swaps it for a subclass (FSDP<Name>) that shards on forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def unsharded_copy(model, state_dict: dict):
    """A plain single-process model of `model`'s architecture (a transformers model, or a peft model around one)
    holding `state_dict`, the whole weights gathered from the processes that shard `model`. Built on the meta device
    and given the gathered tensors themselves, so no second copy of the weights is allocated. Buffers that are no
    part of a state dict (rotary frequencies) are the same on every process and are taken from `model`."""
    import copy

    base = model.get_base_model() if is_peft(model) else model
    with torch.device("meta"):
        skeleton = _unsharded_class(base)._from_config(copy.deepcopy(base.config))
        if is_peft(model):
            import peft

            skeleton = peft.get_peft_model(skeleton, copy.deepcopy(model.peft_config[model.active_adapter]))
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    own = dict(model.named_buffers())
    for name, buffer in list(skeleton.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            skeleton.get_submodule(owner).register_buffer(leaf, own[name].detach().to("cpu").clone(),
                                                          persistent=False)
    plain = skeleton.get_base_model() if is_peft(skeleton) else skeleton
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()  # the gathered dict holds the tied weight twice; one tensor again, as trained
    return skeleton.eval()


def load_trained_weights(model, folder: Path) -> None:
    """Load what `save` wrote back into a freshly built model of the same recipe (resume)."""
    from safetensors.torch import load_file

    model = getattr(model, "hf", model)
    folder = Path(folder)
    if is_peft(model):
        import peft

        state = load_file(folder / "adapter_model.safetensors")
        result = peft.set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{folder}: adapter weights do not fit this model: {result.unexpected_keys[:3]}")
        return
    files = sorted(folder.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    tied |= {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise RuntimeError(f"{folder}: weights do not fit this model: missing {really_missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


@contextlib.contextmanager
def reference_view(policy, frozen=None):
    """The network whose log-probs are the reference: `frozen` when there is one (a separate model, or a copy of the
    initial weights); else the policy with its adapters disabled (LoRA: the base is the initial model); else the
    policy itself, which must not have been updated yet (DPO's reference pass before training)."""
    if frozen is not None:
        yield frozen
    elif is_peft(policy):
        with policy.disable_adapter():
            yield policy
    else:
        yield policy


# --------------------------------------------------------------------------------------------------------------
# Teacher-forced forwards of sampled responses on packed rows (PPO, GRPO, evaluation)


def sequences(ro, ids: Sequence[int]) -> list[data.Tokenized]:
    """prompt + response, targets on the response tokens."""
    return [data.Tokenized(ro.prompt_ids[i] + ro.response_ids[i],
                           [False] * len(ro.prompt_ids[i]) + [True] * len(ro.response_ids[i])) for i in ids]


def response_logprobs(model, seqs: list[data.Tokenized], temperature: float, pad_id: int, device,
                      entropy: Optional[str] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(a_t | s_t) of every response token [K] (sequence by sequence), under softmax(logits / T), and the
    per-token entropy [K] when asked: "grad" (it is in the loss) or "metric" (no backward through a second
    full-vocabulary softmax)."""
    batch = data.collate(seqs, padding_free=True, pad_token_id=pad_id).to(device)
    logits = logits_at(model, batch).float() / temperature
    logps = losses.token_logprobs(logits, batch.targets)
    if entropy is None:
        return logps, None
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        return logps, losses.entropy_from_logits(logits if entropy == "grad" else logits.detach())


@torch.no_grad()
def policy_and_reference_logprobs(policy, frozen_ref, ro, micro_batch_size: int,
                                  temperature: float, pad_id: int, accelerator, with_reference: bool = True
                                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi and log pi_ref of every response token of a rollout [K] each (log pi_ref None without the reference),
    in micro-batches."""
    from . import data
    from .train import evaluating  # train imports this module

    logps, ref_logps = [], []
    with evaluating(policy, accelerator) as net, accelerator.autocast():
        for chunk in data.chunks(range(len(ro)), micro_batch_size):
            seqs = sequences(ro, chunk)
            logps.append(response_logprobs(net, seqs, temperature, pad_id, accelerator.device)[0])
            if with_reference:
                with reference_view(net, frozen_ref) as ref:
                    ref_logps.append(response_logprobs(ref, seqs, temperature, pad_id, accelerator.device)[0])
    return torch.cat(logps), (torch.cat(ref_logps) if with_reference else None)


def response_values(critic, seqs: list[data.Tokenized], pad_id: int, device) -> torch.Tensor:
    """V(s_t) at every response token [K]: the value head read where token t is predicted."""
    batch = data.collate(seqs, padding_free=True, pad_token_id=pad_id).to(device)
    out = critic(**batch.model_inputs()).logits.squeeze(-1)  # [1, N]
    return out[batch.predict_mask].float()
