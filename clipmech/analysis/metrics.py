"""CLIP-native metrics: functions from the unnormalised image embedding [B, D] to a scalar tensor
(reduced over the batch inside the metric), the `metric` argument of every attribution, patching
and faithfulness function. The zero-shot ones use cosine logits against a head [K, D] of
normalised class embeddings (`HookedCLIP.zero_shot_head`), without logit scale, as the paper's
circuits do; `true_class_logit` is the default metric wherever labels and a head are given.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Callable[[Tensor], Tensor]


def cosine_logits(embedding: Tensor, head: Tensor) -> Tensor:
    """[B, K] cosine of each L2-normalised image embedding [B, D] with each row of `head` [K, D]
    (no logit scale), i.e. the zero-shot logits the paper's circuits use."""
    if embedding.shape[-1] != head.shape[-1]:
        raise ValueError(f"embedding dim {embedding.shape[-1]} != zero-shot head dim {head.shape[-1]}; "
                         "build the head with model.zero_shot_head(...) of the same model")
    return F.normalize(embedding, dim=-1) @ F.normalize(head.to(embedding), dim=-1).T


def _labels(labels: Tensor | Sequence[int], embedding: Tensor) -> Tensor:
    labels = torch.as_tensor(labels, device=embedding.device).long()
    if labels.shape != embedding.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the batch of {embedding.shape[0]} images")
    return labels


def true_class_logit(head: Tensor, labels: Tensor | Sequence[int], reduce: str = "mean") -> Metric:
    """Metric: cosine logit of each image's true class (`reduce` = 'mean' or 'sum' over the batch)."""
    def metric(embedding: Tensor) -> Tensor:
        logits = cosine_logits(embedding, head)
        picked = logits.gather(1, _labels(labels, embedding)[:, None])[:, 0]
        return _reduce(picked, reduce)
    return metric


def logit_difference(head: Tensor, labels: Tensor | Sequence[int], other: Tensor | Sequence[int] | int,
                     reduce: str = "mean") -> Metric:
    """Metric: cosine logit of `labels` minus that of `other` (an int or one class per image)."""
    def metric(embedding: Tensor) -> Tensor:
        logits = cosine_logits(embedding, head)
        lab = _labels(labels, embedding)
        oth = torch.as_tensor(other, device=embedding.device).long().expand_as(lab)
        return _reduce(logits.gather(1, lab[:, None])[:, 0] - logits.gather(1, oth[:, None])[:, 0], reduce)
    return metric


def class_contrastive_logit(head: Tensor, labels: Tensor | Sequence[int], reduce: str = "mean") -> Metric:
    """Metric: cosine logit of each image's true class minus the mean of its other classes' logits
    (a circuit for this metric is specific to the class, not to "any image of this kind")."""
    def metric(embedding: Tensor) -> Tensor:
        logits = cosine_logits(embedding, head)
        true = logits.gather(1, _labels(labels, embedding)[:, None])[:, 0]
        others = (logits.sum(1) - true) / max(1, logits.shape[1] - 1)
        return _reduce(true - others, reduce)
    return metric


def correct_class_probability(head: Tensor, labels: Tensor | Sequence[int], logit_scale: float = 100.0,
                              reduce: str = "mean") -> Metric:
    """Metric: softmax(logit_scale * cosine logits) at the true class (pass the model's
    `logit_scale.exp()` for the probabilities it was trained with)."""
    def metric(embedding: Tensor) -> Tensor:
        probs = (logit_scale * cosine_logits(embedding, head)).softmax(-1)
        return _reduce(probs.gather(1, _labels(labels, embedding)[:, None])[:, 0], reduce)
    return metric


def image_text_similarity(text_embeddings: Tensor, reduce: str = "mean") -> Metric:
    """Metric: cosine similarity of image b with its paired text embedding `text_embeddings[b]`."""
    def metric(embedding: Tensor) -> Tensor:
        if text_embeddings.shape != embedding.shape:
            raise ValueError(f"text embeddings {tuple(text_embeddings.shape)} must pair one-to-one with "
                             f"image embeddings {tuple(embedding.shape)}")
        sims = (F.normalize(embedding, dim=-1) * F.normalize(text_embeddings.to(embedding), dim=-1)).sum(-1)
        return _reduce(sims, reduce)
    return metric


def contrastive_loss(text_embeddings: Tensor, logit_scale: float = 100.0) -> Metric:
    """Metric: CLIP's symmetric InfoNCE loss of the batch against paired text embeddings [B, D]."""
    def metric(embedding: Tensor) -> Tensor:
        logits = logit_scale * cosine_logits(embedding, text_embeddings)
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return metric


def _reduce(values: Tensor, reduce: str) -> Tensor:
    if reduce == "mean":
        return values.mean()
    if reduce == "sum":
        return values.sum()
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def evaluate_metric(metric: Metric, embedding: Tensor) -> Tensor:
    """metric(embedding), checked to be a scalar (a per-image metric must be reduced first)."""
    value = metric(embedding)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a scalar tensor, got {shape}; reduce over the batch "
                         "(e.g. .mean() or .sum()) inside the metric")
    return value.reshape(())
