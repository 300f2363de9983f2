"""Agreement between a ground-truth label map and a predicted (unsupervised) one.

Every metric is computed on the *evaluation voxels* only: the voxels where ``mask`` is true, or every
voxel when ``mask`` is ``None``. Background is **not** dropped implicitly: a ground-truth value ``0``
inside the evaluation voxels is a class like any other, so pass ``mask=gt > 0`` (or the specimen
mask) to leave the background out.

All metrics are derived from one contingency table, built with a single ``np.bincount`` over the
combined (gt, pred) codes, so they stay fast on 10^7 voxels:

* NMI, with scikit-learn's definition (``normalized_mutual_info_score``; the mutual information is
  computed by ``sklearn.metrics.mutual_info_score`` on the table, the entropies from its margins);
  ``average_method="geometric"`` is the normalisation JULE's reference code uses.
* ARI, with scikit-learn's (pair-counting) definition of ``adjusted_rand_score``.
* Matched Dice: clusters are matched one-to-one to ground-truth classes by the Hungarian algorithm
  on the overlap counts (``scipy.optimize.linear_sum_assignment``); the Dice of each class with its
  cluster is averaged over the ground-truth classes, an unmatched class scoring 0.

The contingency table is dense, ``(n_gt_ids, n_pred_ids)``, which suits label maps (``uint8`` /
``uint16``), not per-voxel ids.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import mutual_info_score

from jule3d.validation import check_mask

__all__ = ["nmi", "pairwise_nmi", "ari", "confusion", "matched_dice", "match_labels", "evaluate"]

_AVERAGE_METHODS = ("arithmetic", "geometric", "min", "max")
# integer labels spanning at most this many values are encoded with a lookup table, not a sort
_MAX_LUT_RANGE = 1 << 22


def _evaluation_values(
    gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth and predicted labels of the evaluation voxels, as flat arrays."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} does not match gt shape {gt.shape}")
    if gt.size == 0:
        raise ValueError("gt is empty: no voxel to evaluate")
    if mask is None:
        return gt.ravel(), pred.ravel()
    mask = check_mask(mask, gt.shape, "mask", what="gt")
    return gt[mask], pred[mask]


def _dense_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to ``0..n-1`` in ascending order of label value.

    Returns
    -------
    codes : numpy.ndarray of int64
        Code of each value.
    ids : numpy.ndarray
        The distinct label values, ``ids[codes] == values``.
    """
    if values.dtype == bool:
        values = values.view(np.uint8)
    if np.issubdtype(values.dtype, np.integer):
        lo, hi = int(values.min()), int(values.max())
        if hi - lo < _MAX_LUT_RANGE:
            shifted = values.astype(np.int64, copy=False)
            if lo:
                shifted = shifted - lo
            present = np.flatnonzero(np.bincount(shifted, minlength=hi - lo + 1))
            lut = np.zeros(hi - lo + 1, dtype=np.int64)
            lut[present] = np.arange(present.size)
            return lut[shifted], (present + lo).astype(values.dtype)
    ids, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64, copy=False), ids


def _table(
    gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency table of the evaluation voxels with the gt and pred ids of its rows/columns."""
    g, p = _evaluation_values(gt, pred, mask)
    g_codes, gt_ids = _dense_codes(g)
    p_codes, pred_ids = _dense_codes(p)
    return _table_from_codes(g_codes, gt_ids.size, p_codes, pred_ids.size), gt_ids, pred_ids


def _table_from_codes(g_codes: np.ndarray, n_gt: int, p_codes: np.ndarray, n_pred: int) -> np.ndarray:
    """``(n_gt, n_pred)`` int64 contingency table of two :func:`_dense_codes` encodings of the same voxels."""
    counts = np.bincount(g_codes * n_pred + p_codes, minlength=n_gt * n_pred)
    return counts.reshape(n_gt, n_pred).astype(np.int64, copy=False)


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a labelling given its class sizes."""
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    return float(-np.sum((counts / total) * (np.log(counts) - np.log(total))))


def _check_average_method(average_method: str) -> None:
    if average_method not in _AVERAGE_METHODS:
        raise ValueError(
            f"average_method must be one of {_AVERAGE_METHODS}, got {average_method!r}"
        )


def _nmi_from_table(table: np.ndarray, average_method: str) -> float:
    """NMI as ``sklearn.metrics.normalized_mutual_info_score`` defines it, from the table."""
    n_gt, n_pred = table.shape
    if n_gt == n_pred == 1:
        return 1.0
    mi = mutual_info_score(None, None, contingency=table)
    if mi == 0:
        return 0.0
    h_gt, h_pred = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    normalizer = {
        "arithmetic": (h_gt + h_pred) / 2.0,
        "geometric": np.sqrt(h_gt * h_pred),
        "min": min(h_gt, h_pred),
        "max": max(h_gt, h_pred),
    }[average_method]
    return float(mi / normalizer)


def _ari_from_table(table: np.ndarray) -> float:
    """ARI as ``sklearn.metrics.adjusted_rand_score`` defines it, from the table (exact integers)."""
    n = int(table.sum())
    sum_squares = int(np.sum(table.astype(object) ** 2))
    row_squares = int(np.sum(table.sum(axis=1).astype(object) ** 2))
    col_squares = int(np.sum(table.sum(axis=0).astype(object) ** 2))
    # pair confusion matrix (ordered pairs), as sklearn.metrics.cluster.pair_confusion_matrix
    tp = sum_squares - n
    fp = col_squares - sum_squares
    fn = row_squares - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def _dice_from_table(
    table: np.ndarray, gt_ids: np.ndarray, pred_ids: np.ndarray
) -> dict[str, Any]:
    """Hungarian one-to-one matching on the overlap and the Dice of every ground-truth class."""
    rows, cols = linear_sum_assignment(table, maximize=True)
    gt_sizes = table.sum(axis=1)
    pred_sizes = table.sum(axis=0)
    dice = np.zeros(table.shape[0], dtype=np.float64)
    dice[rows] = 2.0 * table[rows, cols] / (gt_sizes[rows] + pred_sizes[cols])
    return {
        "mean": float(dice.mean()),
        "per_class": {gt_ids[i].item(): float(d) for i, d in enumerate(dice)},
        "mapping": {pred_ids[c].item(): gt_ids[r].item() for r, c in zip(rows, cols)},
    }


def confusion(
    gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency (confusion) table of two label maps over the evaluation voxels.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        Ground-truth and predicted labels, same shape (any integer or bool dtype).
    mask : numpy.ndarray of bool, optional
        Evaluation voxels, same shape as ``gt``; all voxels when ``None``.

    Returns
    -------
    matrix : numpy.ndarray of int64, shape (n_gt_ids, n_pred_ids)
        ``matrix[i, j]`` = number of evaluation voxels with ``gt == gt_ids[i]`` and
        ``pred == pred_ids[j]``.
    gt_ids, pred_ids : numpy.ndarray
        The label values present in the evaluation voxels, ascending.

    Raises
    ------
    ValueError
        If ``pred`` or ``mask`` does not have the shape of ``gt``, or ``mask`` selects no voxel.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.metrics import confusion
    >>> gt = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    >>> pred = np.array([7, 7, 5, 5, 5, 5, 9, 9])
    >>> matrix, gt_ids, pred_ids = confusion(gt, pred)
    >>> matrix.tolist(), gt_ids.tolist(), pred_ids.tolist()
    ([[1, 2, 0], [3, 0, 0], [0, 0, 2]], [1, 2, 3], [5, 7, 9])
    """
    return _table(gt, pred, mask)


def nmi(
    gt: np.ndarray,
    pred: np.ndarray,
    mask: np.ndarray | None = None,
    average_method: str = "arithmetic",
) -> float:
    """Normalized mutual information over the evaluation voxels.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        Ground-truth and predicted labels, same shape.
    mask : numpy.ndarray of bool, optional
        Evaluation voxels; all voxels when ``None``.
    average_method : {"arithmetic", "geometric", "min", "max"}
        Normaliser of the mutual information, as in scikit-learn; ``"geometric"``
        (``MI / sqrt(H_gt H_pred)``) is the one JULE's code reports.

    Returns
    -------
    float
        NMI in ``[0, 1]``; equal to ``sklearn.metrics.normalized_mutual_info_score`` on the
        evaluation voxels.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.metrics import nmi
    >>> gt = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    >>> pred = np.array([7, 7, 5, 5, 5, 5, 9, 9])
    >>> round(nmi(gt, pred), 3)
    0.755
    >>> nmi(gt, gt + 10)  # only the partition counts, not the ids
    1.0
    >>> nmi(gt, pred, mask=gt > 1)
    1.0
    """
    _check_average_method(average_method)
    table, _, _ = _table(gt, pred, mask)
    return _nmi_from_table(table, average_method)


def pairwise_nmi(labelings: Sequence[np.ndarray], average_method: str = "arithmetic") -> np.ndarray:
    """NMI between every two labellings of the same voxels: :func:`nmi` of each pair, each labelling encoded once.

    Parameters
    ----------
    labelings : sequence of numpy.ndarray
        ``R`` label maps of one shape.
    average_method : {"arithmetic", "geometric", "min", "max"}
        Normaliser of the mutual information, as in :func:`nmi`.

    Returns
    -------
    numpy.ndarray
        ``(R, R)`` float64, symmetric, diagonal 1: entry ``(i, j)``, ``i < j``, is ``nmi(labelings[i],
        labelings[j])``; the lower triangle mirrors it (NMI is symmetric only up to rounding).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.metrics import nmi, pairwise_nmi
    >>> a, b = np.array([1, 1, 1, 2, 2, 2, 3, 3]), np.array([7, 7, 5, 5, 5, 5, 9, 9])
    >>> pairwise_nmi([a, b, a + 10]).round(3)
    array([[1.   , 0.755, 1.   ],
           [0.755, 1.   , 0.755],
           [1.   , 0.755, 1.   ]])
    >>> bool(pairwise_nmi([a, b])[0, 1] == nmi(a, b))
    True
    """
    _check_average_method(average_method)
    if len(labelings) == 0:
        raise ValueError("labelings is empty: no labelling to compare")
    arrays = [np.asarray(labels) for labels in labelings]
    for i, labels in enumerate(arrays):
        if labels.shape != arrays[0].shape:
            raise ValueError(f"labelings[{i}] shape {labels.shape} does not match labelings[0] shape "
                             f"{arrays[0].shape}")
    if arrays[0].size == 0:
        raise ValueError("labelings are empty: no voxel to compare")
    encoded = [_dense_codes(labels.ravel()) for labels in arrays]
    result = np.eye(len(encoded))
    for i, (codes_i, ids_i) in enumerate(encoded):
        for j in range(i + 1, len(encoded)):
            codes_j, ids_j = encoded[j]
            table = _table_from_codes(codes_i, ids_i.size, codes_j, ids_j.size)
            result[i, j] = result[j, i] = _nmi_from_table(table, average_method)
    return result


def ari(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Adjusted Rand index over the evaluation voxels.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        Ground-truth and predicted labels, same shape.
    mask : numpy.ndarray of bool, optional
        Evaluation voxels; all voxels when ``None``.

    Returns
    -------
    float
        ARI (1 for identical partitions, about 0 for chance); equal to
        ``sklearn.metrics.adjusted_rand_score`` on the evaluation voxels.

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.metrics import ari
    >>> gt = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    >>> pred = np.array([7, 7, 5, 5, 5, 5, 9, 9])
    >>> round(ari(gt, pred), 3), ari(gt, gt + 10)
    (0.545, 1.0)
    """
    table, _, _ = _table(gt, pred, mask)
    return _ari_from_table(table)


def matched_dice(
    gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, Any]:
    """Dice per ground-truth class after one-to-one Hungarian matching of clusters to classes.

    The matching maximises the total overlap (voxel count) between matched pairs. When there are
    fewer clusters than classes, the unmatched classes score 0; surplus clusters stay unmatched.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        Ground-truth and predicted labels, same shape.
    mask : numpy.ndarray of bool, optional
        Evaluation voxels; all voxels when ``None``.

    Returns
    -------
    dict
        ``mean`` (float, mean Dice over the ground-truth classes), ``per_class``
        (``{gt_id: dice}``) and ``mapping`` (``{pred_id: gt_id}`` for the matched clusters).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.metrics import matched_dice
    >>> gt = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    >>> pred = np.array([7, 7, 5, 5, 5, 5, 9, 9])
    >>> dice = matched_dice(gt, pred)
    >>> round(dice["mean"], 3), dice["mapping"]
    (0.886, {7: 1, 5: 2, 9: 3})
    >>> {k: round(v, 3) for k, v in dice["per_class"].items()}
    {1: 0.8, 2: 0.857, 3: 1.0}
    """
    return _dice_from_table(*_table(gt, pred, mask))


def match_labels(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``pred`` with its cluster ids renamed to the ground-truth classes they match (Hungarian).

    So that a prediction and the ground truth drawn with the same colour per id correspond. Each cluster
    matched by :func:`matched_dice` takes its class's id; surplus clusters take the ids after the largest
    ground-truth id; 0 (background) and voxels outside ``mask`` keep their values.

    Parameters
    ----------
    pred, gt : numpy.ndarray
        Predicted and ground-truth integer labels, same shape.
    mask : numpy.ndarray of bool, optional
        Voxels the matching is computed on; all voxels when ``None``.

    Returns
    -------
    numpy.ndarray
        The renamed labels, of ``pred``'s dtype widened if the new ids need it.

    Examples
    --------
    >>> match_labels(np.array([0, 2, 2, 1]), np.array([0, 1, 1, 2])).tolist()
    [0, 1, 1, 2]
    """
    pred = np.asarray(pred)
    matched = matched_dice(gt, pred, mask)["mapping"].items()
    mapping = {int(p): int(g) for p, g in matched if p != 0 and g != 0}
    ids = [int(i) for i in np.unique(pred) if i != 0]
    next_id = max([int(np.max(gt))] + list(mapping.values())) + 1
    for i in ids:
        if i not in mapping:
            mapping[i], next_id = next_id, next_id + 1
    lookup = np.arange(max(ids + [0]) + 1, dtype=np.min_scalar_type(max(next_id, 1)))
    for p, g in mapping.items():
        lookup[p] = g
    return lookup[pred].astype(np.promote_types(pred.dtype, lookup.dtype))


def evaluate(
    gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, Any]:
    """All metrics of the benchmark protocol from one contingency table.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        Ground-truth and predicted labels, same shape.
    mask : numpy.ndarray of bool, optional
        Evaluation voxels; all voxels when ``None``.

    Returns
    -------
    dict
        ``nmi`` (arithmetic), ``nmi_geometric``, ``ari``, ``dice_mean``, ``dice_per_class``
        (``{gt_id: dice}``) and ``n_voxels`` (number of evaluation voxels).

    Examples
    --------
    >>> import numpy as np
    >>> from jule3d.metrics import evaluate
    >>> gt = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    >>> pred = np.array([7, 7, 5, 5, 5, 5, 9, 9])
    >>> scores = evaluate(gt, pred)
    >>> round(scores["nmi"], 3), round(scores["ari"], 3), round(scores["dice_mean"], 3), scores["n_voxels"]
    (0.755, 0.545, 0.886, 8)
    >>> evaluate(gt, pred, mask=gt > 1)["dice_per_class"]
    {2: 1.0, 3: 1.0}
    """
    table, gt_ids, pred_ids = _table(gt, pred, mask)
    dice = _dice_from_table(table, gt_ids, pred_ids)
    return {
        "nmi": _nmi_from_table(table, "arithmetic"),
        "nmi_geometric": _nmi_from_table(table, "geometric"),
        "ari": _ari_from_table(table),
        "dice_mean": dice["mean"],
        "dice_per_class": dice["per_class"],
        "n_voxels": int(table.sum()),
    }
