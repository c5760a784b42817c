"""Contrastive losses over (b, b) logits with several positives per row.

    logits    (b, b) float   scaled cosine similarities, rows = one side, columns = the other
    positives (b, b) bool    which columns count as correct for a row (the diagonal is True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where row i's positives are ``positives[i]`` (b, b) bool (diagonal True).

    Per row: -log(sum of exp over positives / sum of exp over all); averaged over both directions.
    """
    import torch

    neg_inf = torch.finfo(logits.dtype).min
    i2t = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positives, neg_inf), 1)
    t2i = torch.logsumexp(logits.T, 1) - torch.logsumexp(logits.T.masked_fill(~positives.T, neg_inf), 1)
    return 0.5 * (i2t.mean() + t2i.mean())


def within_modality_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE inside one modality (b, b): self-similarity is left out; rows with no other positive are skipped."""
    import torch

    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    neg_inf = torch.finfo(logits.dtype).min
    pos = positives & ~eye
    keep = pos.any(1)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    lg = logits.masked_fill(eye, neg_inf)
    per_row = torch.logsumexp(lg, 1) - torch.logsumexp(lg.masked_fill(~pos, neg_inf), 1)
    return per_row[keep].mean()
