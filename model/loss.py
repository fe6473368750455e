"""The language-modelling loss, in one place (training, validation, scoring, benchmarks).

Labels are already shifted (labels[b, t] is the target after input_ids[b, t]); IGNORE_INDEX marks
positions without a target (a document's last token, padding). `<CALL>` is an ordinary target id.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # PyTorch's cross_entropy default; the data loader writes it into `labels`


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, float32 [N] for logits [..., V] and labels [...] int64
    (flattened); 0 where labels == IGNORE_INDEX. The softmax runs in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the NLL over target tokens, number of target tokens): float32 and int64 scalars on the
    logits' device, no host sync. Distributed training divides the sum by the count over all ranks."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (labels != IGNORE_INDEX).sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target tokens (0 for a batch without targets), float32 scalar."""
    total, count = nll_sum(logits, labels)
    return total / count.clamp(min=1)
