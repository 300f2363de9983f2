"""The weighted triplet loss of JULE and the sampling of its triplets within a minibatch.

Minibatches (``train.lua``, ``updateCNN``): in a batch every same-cluster pair ``(a, p)``, ``a`` before ``p``,
is an anchor-positive pair and gets ``min(n_negatives, #other-cluster samples in the batch)`` distinct
negatives drawn uniformly from the batch (``organize_samples``; the reference loops per triplet, here it is one
top-k over random keys). The loss (``criterions/TripletEmbedding.lua``) is
``mean over triplets of max(0, gamma·‖f_a − f_p‖² − ‖f_a − f_n‖² + margin)``.
"""

from __future__ import annotations

import torch

__all__ = ["sample_triplets", "weighted_triplet_loss"]


def sample_triplets(
    labels: torch.Tensor, n_negatives: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triplets of one minibatch, as batch positions.

    Every same-cluster pair ``(a, p)`` with ``a < p`` is an anchor-positive pair; it gets
    ``min(n_negatives, number of batch samples in other clusters)`` distinct negatives drawn uniformly
    (the top-``k`` of random keys over the allowed positions).

    Parameters
    ----------
    labels : torch.Tensor
        ``(B,)`` integer cluster labels of the batch (CPU).
    n_negatives : int
        Most negatives per anchor-positive pair.
    generator : torch.Generator, optional
        CPU generator of the random keys.

    Returns
    -------
    anchors, positives, negatives : torch.Tensor
        ``(T,)`` int64 indices into the batch; empty when the batch has no same-cluster pair or no
        other-cluster sample.

    Examples
    --------
    Two pairs, ``(0, 1)`` and ``(2, 3)``, each with both samples of the other cluster as negatives:

    >>> import torch
    >>> from jule3d.loss import sample_triplets
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> anchors, positives, negatives = sample_triplets(labels, 2, torch.Generator().manual_seed(0))
    >>> anchors.tolist(), positives.tolist(), sorted(negatives.tolist())
    ([0, 0, 2, 2], [1, 1, 3, 3], [0, 1, 2, 3])
    >>> sample_triplets(torch.tensor([0, 1, 2]), 2)[0].numel()
    0
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    same = labels[:, None] == labels[None, :]
    anchors, positives = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    n_keep = min(int(n_negatives), labels.numel())
    if anchors.numel() == 0 or n_keep == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty, empty
    keys = torch.rand(anchors.numel(), labels.numel(), generator=generator)
    keys = torch.where(same[anchors], torch.full_like(keys, -1.0), keys)
    top, negatives = keys.topk(n_keep, dim=1)
    valid = top >= 0
    anchors = anchors[:, None].expand(-1, n_keep)[valid]
    positives = positives[:, None].expand(-1, n_keep)[valid]
    return anchors, positives, negatives[valid]


def weighted_triplet_loss(
    features: torch.Tensor,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    gamma: float = 2.0,
    margin: float = 0.2,
) -> torch.Tensor:
    """``mean max(0, gamma·‖f_a − f_p‖² − ‖f_a − f_n‖² + margin)`` over the given triplets.

    Squared distances come from one ``(B, B)`` pairwise matrix, indexed by the triplets.

    Parameters
    ----------
    features : torch.Tensor
        ``(B, D)`` features of the batch.
    anchors, positives, negatives : torch.Tensor
        ``(T,)`` batch indices (from :func:`sample_triplets`), ``T >= 1``.
    gamma, margin : float
        Weight of the positive distance and margin.

    Returns
    -------
    torch.Tensor
        Scalar loss.

    Examples
    --------
    Well separated clusters give no loss at the default margin, and ``margin - 2`` at a margin above 2:

    >>> import torch
    >>> from jule3d.loss import weighted_triplet_loss
    >>> features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> anchors, positives, negatives = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 0])
    >>> round(float(weighted_triplet_loss(features, anchors, positives, negatives)), 3)
    0.0
    >>> round(float(weighted_triplet_loss(features, anchors, positives, negatives, margin=3.0)), 3)
    1.0
    """
    if anchors.numel() == 0:
        raise ValueError("anchors is empty: a triplet loss needs at least one triplet")
    d2 = (features[:, None, :] - features[None, :, :]).pow(2).sum(-1)
    return (gamma * d2[anchors, positives] - d2[anchors, negatives] + margin).clamp_min(0).mean()
