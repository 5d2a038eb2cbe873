"""Per-example statistics for example-based debugging, as pure functions over tensors (no Lightning, no loggers).

Everything stays on the tensors' device; callers move the few rows they keep to the host.

Conventions: a *key* is the value a top-k keeps the largest of (the loss for the hardest examples, minus the loss
for the easiest); an example whose loss is NaN (every label ignored) gets the key ``-inf`` and is never ranked.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def labels_look_shifted(input_ids: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> bool:
    """True if ``labels`` are ``input_ids`` already shifted by one (``labels[:, t] == input_ids[:, t + 1]``).

    Hugging Face causal LMs take ``labels == input_ids`` and shift inside the model; some datasets (the reference
    pydoc windows) store the next tokens instead. Labels that equal the inputs are never taken as shifted.
    """
    counted = labels != ignore_index
    if input_ids.shape != labels.shape or not bool(counted.any()):
        return False
    same = bool(((labels == input_ids) | ~counted).all())
    if same:
        return False
    if labels.shape[1] < 2:
        return False
    return bool(((labels[:, :-1] == input_ids[:, 1:]) | ~counted[:, :-1]).all())


def causal_lm_losses(
    logits: Tensor, labels: Tensor, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-example and per-token next-token cross-entropy of a causal LM.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``; positions equal to ``ignore_index`` are left out.
        shift: ``True`` for the Hugging Face convention (``logits[:, t]`` predicts ``labels[:, t + 1]``);
            ``False`` when ``labels`` are already the next tokens (``logits[:, t]`` predicts ``labels[:, t]``).
        ignore_index: the label value that is not scored.

    Returns:
        ``per_example [B]``: mean loss over the example's scored tokens (NaN if none is scored), and
        ``per_token [B, L]``: the loss of each displayed token, aligned with :func:`display_tokens` (NaN where a
        token is not predicted or not scored); ``L = T`` with ``shift``, else ``T + 1``.
    """
    if shift:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = labels
    # Half-precision log-softmax loses about two digits; Hugging Face upcasts its loss the same way.
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    flat = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="none")
    scored = targets != ignore_index
    token = flat.view(targets.shape).masked_fill(~scored, float("nan"))
    count = scored.sum(dim=1)
    per_example = flat.view(targets.shape).sum(dim=1) / count  # 0 / 0 = NaN: nothing scored
    # Aligned with the displayed tokens: the first token is never predicted.
    pad = torch.full((token.shape[0], 1), float("nan"), dtype=token.dtype, device=token.device)
    return per_example, torch.cat([pad, token], dim=1)


def display_tokens(input_ids: Tensor, labels: Tensor | None, shift: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The tokens a causal-LM example is scored on, ``[B, L]``: the inputs, plus with pre-shifted labels the last
    label (the final predicted token, which is not in the inputs); ``-1`` where there is no token."""
    if shift or labels is None:
        return input_ids
    last = labels[:, -1:].masked_fill(labels[:, -1:] == ignore_index, -1)
    return torch.cat([input_ids, last], dim=1)


def classifier_stats(logits: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-example cross-entropy, margin, confidence and correctness of a classifier.

    Args:
        logits: ``[B, C]``.
        target: ``[B]`` class indices (the labels as given, noisy or not).

    Returns:
        ``loss``, ``margin`` (``z_y - max_{c != y} z_c``, the area-under-margin quantity of Pleiss et al. 2020),
        ``confidence`` (softmax probability of the given label, as in dataset cartography, Swayamdipta et al. 2020),
        ``correct`` (1.0 where the arg-max is the given label) and ``predicted``, each ``[B]`` in float32.
    """
    z = logits.detach().float()
    y = target.long().unsqueeze(1)
    z_y = z.gather(1, y).squeeze(1)
    max_other = z.scatter(1, y, float("-inf")).amax(dim=1)
    log_probs = z.log_softmax(dim=1)
    predicted = z.argmax(dim=1)
    return {
        "loss": -log_probs.gather(1, y).squeeze(1),
        "margin": z_y - max_other,
        "confidence": log_probs.gather(1, y).squeeze(1).exp(),
        "correct": (predicted == y.squeeze(1)).float(),
        "predicted": predicted.float(),
    }


def pad_columns(t: Tensor, width: int, value: float) -> Tensor:
    """``t`` (``[n, w, ...]``) padded on the right of dimension 1 to ``width`` with ``value``."""
    if t.dim() < 2 or t.shape[1] >= width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def merge_topk(
    keys: Tensor,
    rows: Mapping[str, Tensor],
    new_keys: Tensor,
    new_rows: Mapping[str, Tensor],
    k: int,
    pad_values: Mapping[str, float],
) -> tuple[Tensor, dict[str, Tensor]]:
    """The ``k`` rows with the largest keys among the kept rows and new ones, all on the device.

    Args:
        keys: ``[n]`` keys of the kept rows (``n <= k``).
        rows: per name, ``[n, ...]`` kept row data (token ids, losses, ids).
        new_keys: ``[m]`` keys of the new rows; NaN counts as ``-inf``.
        new_rows: per name, ``[m, ...]``; the same names as ``rows`` (``rows`` may be empty at first).
        k: how many to keep.
        pad_values: per name, the fill value when two rows' sequence lengths (dimension 1) differ.

    Returns:
        The merged ``keys`` and ``rows``, largest key first. One ``topk`` and one ``cat`` plus one gather per name:
        no host synchronisation.
    """
    new_keys = torch.nan_to_num(new_keys.detach().float(), nan=float("-inf"))
    if keys.numel():
        keys = torch.cat([keys, new_keys])
        merged = {}
        for name, new in new_rows.items():
            old = rows[name]
            width = max(old.shape[1], new.shape[1]) if new.dim() >= 2 else 0
            merged[name] = torch.cat([pad_columns(old, width, pad_values.get(name, 0)), pad_columns(new, width, pad_values.get(name, 0))])
    else:
        keys, merged = new_keys, dict(new_rows)
    top, index = torch.topk(keys, min(k, keys.numel()))
    return top, {name: t.index_select(0, index) for name, t in merged.items()}


def global_topk(gathered_keys: Tensor, k: int) -> list[tuple[int, int]]:
    """``(rank, local index)`` of the ``k`` largest finite keys of ``[world, n]`` gathered keys (``-inf`` = empty),
    largest first; ties go to the lower rank, then the lower index."""
    n = gathered_keys.shape[1]
    flat = gathered_keys.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()
    return [(i // n, i % n) for i in order if torch.isfinite(flat[i])]


def saliency(embedding_output: Tensor, gradient: Tensor) -> Tensor:
    """Gradient × input on the input embeddings, summed over the hidden dimension: ``[B, T, D] -> [B, T]``."""
    return (gradient.float() * embedding_output.detach().float()).sum(dim=-1)


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) for boolean ``positives``; ties count
    one half (the Mann-Whitney statistic)."""
    scores, positives = scores.double().flatten(), positives.bool().flatten()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives.")
    # Average ranks handle ties: rank-sum of the positives minus its minimum, over the number of pairs.
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(scores, return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(uniq)).double()
    rank_sum = mean_rank[inverse][positives].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def precision_at_k(scores: Tensor, positives: Tensor, k: int) -> float:
    """Fraction of positives among the ``k`` highest scores."""
    top = torch.topk(scores.double().flatten(), k).indices
    return positives.bool().flatten()[top].float().mean().item()
