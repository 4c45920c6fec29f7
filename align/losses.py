"""Losses as pure tensor functions. Imports torch only.

Each function takes tensors and returns tensors; none touches a model. Each is tested against a hand computation,
a naive loop, or TRL's implementation on the same inputs (tests/unit/test_losses.py).

Shapes: K = number of target tokens selected from a batch, V = vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_k | context_k) for each selected position.

    logits: [K, V] (the positions that predict a target), targets: [K] -> [K].
    Computed as -cross_entropy, which fuses log_softmax and the gather without a [K, V] log-prob copy.
    Upcast to float32 first: log_softmax in bf16 loses ~2 decimal digits on a 50k vocabulary.
    """
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, num_targets: int | torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood summed over these targets and divided by `num_targets`.

        L = -(1/N) * sum_k log p(y_k | y_<k)

    `num_targets` (N) is the number of target tokens in the whole optimizer step: every micro-batch of gradient
    accumulation and every process. Summing per micro-batch and dividing by the global count makes the gradient
    of an accumulated, distributed step equal to that of one big batch (the token mean of the global batch), as
    transformers does with `num_items_in_batch`; a mean per micro-batch would weight short micro-batches more.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum") / num_targets


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    mask = mask.to(values.dtype)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)
