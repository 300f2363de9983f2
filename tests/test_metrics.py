"""Metrics against hand-computed values and scikit-learn, on small label maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from jule3d.metrics import ari, confusion, evaluate, matched_dice, nmi, pairwise_nmi

# A 2x2 case: gt classes 1 and 2 with 4 voxels each; cluster 10 holds 3 voxels of class 1,
# cluster 20 holds 1 voxel of class 1 and all 4 of class 2: table [[3, 1], [0, 4]].
GT_2X2 = np.array([1, 1, 1, 1, 2, 2, 2, 2])
PRED_2X2 = np.array([10, 10, 10, 20, 20, 20, 20, 20])


def _blocks(shape: tuple[int, int, int] = (6, 8, 10)) -> np.ndarray:
    """Three slabs along x labelled 1, 2, 3."""
    labels = np.ones(shape, dtype=np.uint8)
    labels[..., shape[2] // 3 :] = 2
    labels[..., 2 * shape[2] // 3 :] = 3
    return labels


def test_perfect_agreement_scores_one() -> None:
    gt = _blocks()
    result = evaluate(gt, gt.copy())
    assert result["nmi"] == pytest.approx(1.0)
    assert result["nmi_geometric"] == pytest.approx(1.0)
    assert result["ari"] == pytest.approx(1.0)
    assert result["dice_mean"] == pytest.approx(1.0)
    assert result["dice_per_class"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 3: pytest.approx(1.0)}
    assert result["n_voxels"] == gt.size


def test_permuted_labels_still_score_one_and_mapping_inverts_the_permutation() -> None:
    gt = _blocks()
    pred = np.array([0, 7, 3, 5], dtype=np.int16)[gt]  # 1 -> 7, 2 -> 3, 3 -> 5
    assert nmi(gt, pred) == pytest.approx(1.0)
    assert nmi(gt, pred, average_method="geometric") == pytest.approx(1.0)
    assert ari(gt, pred) == pytest.approx(1.0)
    dice = matched_dice(gt, pred)
    assert dice["mean"] == pytest.approx(1.0)
    assert dice["mapping"] == {7: 1, 3: 2, 5: 3}


def test_two_by_two_table_matches_hand_computation() -> None:
    matrix, gt_ids, pred_ids = confusion(GT_2X2, PRED_2X2)
    np.testing.assert_array_equal(matrix, [[3, 1], [0, 4]])
    np.testing.assert_array_equal(gt_ids, [1, 2])
    np.testing.assert_array_equal(pred_ids, [10, 20])

    dice = matched_dice(GT_2X2, PRED_2X2)
    assert dice["mapping"] == {10: 1, 20: 2}
    assert dice["per_class"][1] == pytest.approx(2 * 3 / (4 + 3))
    assert dice["per_class"][2] == pytest.approx(2 * 4 / (4 + 5))
    assert dice["mean"] == pytest.approx((6 / 7 + 8 / 9) / 2)

    # pair counting: sum C(n_ij, 2) = 3 + 0 + 6 = 9; rows 6 + 6 = 12; columns 3 + 10 = 13; C(8, 2) = 28
    expected = 12 * 13 / 28
    assert ari(GT_2X2, PRED_2X2) == pytest.approx((9 - expected) / ((12 + 13) / 2 - expected))

    mi = 3 / 8 * math.log(2) + 1 / 8 * math.log(2 / 5) + 4 / 8 * math.log(8 / 5)
    h_gt = math.log(2)
    h_pred = -(3 / 8 * math.log(3 / 8) + 5 / 8 * math.log(5 / 8))
    assert nmi(GT_2X2, PRED_2X2) == pytest.approx(mi / ((h_gt + h_pred) / 2))
    assert nmi(GT_2X2, PRED_2X2, average_method="geometric") == pytest.approx(mi / math.sqrt(h_gt * h_pred))


def test_geometric_differs_from_arithmetic_and_both_match_sklearn() -> None:
    arithmetic = nmi(GT_2X2, PRED_2X2)
    geometric = nmi(GT_2X2, PRED_2X2, average_method="geometric")
    assert geometric > arithmetic  # the geometric mean of two different entropies is smaller
    assert arithmetic == pytest.approx(normalized_mutual_info_score(GT_2X2, PRED_2X2))
    assert geometric == pytest.approx(
        normalized_mutual_info_score(GT_2X2, PRED_2X2, average_method="geometric")
    )


@pytest.mark.parametrize("seed", range(4))
def test_random_label_maps_match_sklearn_with_and_without_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 4, size=(9, 10, 11))
    pred = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, 5, size=gt.shape), gt + 2)
    mask = rng.random(gt.shape) < 0.6
    for m in (None, mask):
        g, p = (gt.ravel(), pred.ravel()) if m is None else (gt[m], pred[m])
        for method in ("arithmetic", "geometric", "min", "max"):
            assert nmi(gt, pred, m, average_method=method) == pytest.approx(
                normalized_mutual_info_score(g, p, average_method=method), abs=1e-12
            )
        assert ari(gt, pred, m) == pytest.approx(adjusted_rand_score(g, p), abs=1e-12)


@pytest.mark.parametrize("method", ["arithmetic", "geometric", "min", "max"])
def test_pairwise_nmi_is_nmi_of_every_pair(method: str) -> None:
    """Every entry ``(i, j)``, ``i < j``, is exactly :func:`nmi` of that pair (NMI is symmetric only up to
    rounding, so the lower triangle mirrors the upper one), whatever the labellings' ids and counts."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 3, size=(6, 7, 8))
    labelings = [base, base + 5, np.where(rng.random(base.shape) < 0.4, rng.integers(0, 4, base.shape), base),
                 rng.integers(-2, 2, size=base.shape).astype(np.int8), (base == 1), np.zeros(base.shape, int)]
    matrix = pairwise_nmi(labelings, average_method=method)
    assert matrix.shape == (6, 6)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    for i, a in enumerate(labelings):
        for j in range(i + 1, len(labelings)):
            assert matrix[i, j] == nmi(a, labelings[j], average_method=method), (i, j)


def test_pairwise_nmi_rejects_bad_input_naming_it() -> None:
    with pytest.raises(ValueError, match=r"labelings\[1\] shape \(3,\) does not match"):
        pairwise_nmi([np.zeros(4, int), np.zeros(3, int)])
    with pytest.raises(ValueError, match="labelings is empty"):
        pairwise_nmi([])
    with pytest.raises(ValueError, match="labelings are empty"):
        pairwise_nmi([np.array([], int), np.array([], int)])
    with pytest.raises(ValueError, match="average_method"):
        pairwise_nmi([np.zeros(4, int)], average_method="harmonic")


@pytest.mark.parametrize(
    "pred",
    [
        np.array([-5, -5, 70_000, 70_000, 3, 3]),  # negative and wide-ranging ids (lookup table)
        np.array([0, 0, 2**40, 2**40, 7, 7]),  # range too wide for the lookup table (sorting)
        np.array([0.5, 0.5, 2.5, 2.5, 1.5, 1.5]),  # float ids
    ],
)
def test_label_encodings_give_the_same_scores(pred: np.ndarray) -> None:
    gt = np.array([1, 1, 2, 2, 3, 3], dtype=np.uint8)
    assert nmi(gt, pred) == pytest.approx(1.0)
    assert ari(gt, pred) == pytest.approx(1.0)
    _, _, pred_ids = confusion(gt, pred)
    np.testing.assert_array_equal(pred_ids, np.unique(pred))


def test_bool_labels() -> None:
    gt = np.array([True, True, False, False])
    pred = np.array([False, False, True, True])
    assert nmi(gt, pred) == pytest.approx(1.0)
    assert matched_dice(gt, pred)["mapping"] == {False: True, True: False}


def test_fewer_clusters_than_classes_leaves_a_class_at_zero() -> None:
    gt = _blocks()  # slabs of 3, 3 and 4 columns: class 3 is the largest
    pred = np.where(gt == 3, 2, gt)  # classes 2 and 3 merged into cluster 2
    dice = matched_dice(gt, pred)
    n2, n3 = (gt == 2).sum(), (gt == 3).sum()
    assert dice["mapping"] == {1: 1, 2: 3}  # cluster 2 overlaps class 3 most
    assert dice["per_class"][1] == pytest.approx(1.0)
    assert dice["per_class"][2] == 0.0
    assert dice["per_class"][3] == pytest.approx(2 * n3 / (n3 + n2 + n3))
    assert dice["mean"] == pytest.approx((1.0 + dice["per_class"][3]) / 3)


def test_more_clusters_than_classes_leaves_a_cluster_unmatched() -> None:
    gt = _blocks()
    pred = gt.astype(np.int32)
    top = np.zeros(gt.shape, dtype=bool)
    top[:2] = True
    pred[top & (gt == 1)] = 9  # a third of class 1 becomes cluster 9
    dice = matched_dice(gt, pred)
    assert dice["mapping"] == {1: 1, 2: 2, 3: 3}
    assert dice["per_class"][1] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))
    assert dice["per_class"][2] == dice["per_class"][3] == pytest.approx(1.0)


def test_mask_restricts_the_evaluation_voxels() -> None:
    gt = _blocks()
    pred = gt.copy()
    pred[:3] = 4 - pred[:3]  # the upper half is wrong: classes 1 and 3 swapped there
    mask = np.zeros(gt.shape, dtype=bool)
    mask[3:] = True
    full = evaluate(gt, pred)
    lower = evaluate(gt, pred, mask)
    assert full["nmi"] < 0.9 and full["ari"] < 0.9 and full["dice_mean"] < 0.9
    assert lower["nmi"] == pytest.approx(1.0)
    assert lower["ari"] == pytest.approx(1.0)
    assert lower["dice_mean"] == pytest.approx(1.0)
    assert lower["n_voxels"] == mask.sum()


def test_background_is_a_class_unless_masked_out() -> None:
    gt = _blocks()
    gt[0] = 0
    pred = gt.copy()
    pred[0] = 1  # the background voxels get a tissue label
    assert 0 in evaluate(gt, pred)["dice_per_class"]
    assert nmi(gt, pred) < 1.0
    restricted = evaluate(gt, pred, gt > 0)
    assert restricted["nmi"] == pytest.approx(1.0)
    assert set(restricted["dice_per_class"]) == {1, 2, 3}


def test_single_cluster_cases_follow_sklearn() -> None:
    gt = np.array([1, 1, 2, 2])
    constant = np.zeros(4, dtype=int)
    assert nmi(constant, constant) == 1.0 == normalized_mutual_info_score(constant, constant)
    assert nmi(gt, constant) == 0.0 == normalized_mutual_info_score(gt, constant)
    assert ari(constant, constant) == 1.0 == adjusted_rand_score(constant, constant)
    assert ari(gt, constant) == pytest.approx(adjusted_rand_score(gt, constant))


def test_evaluate_agrees_with_the_single_metrics() -> None:
    rng = np.random.default_rng(3)
    gt = rng.integers(1, 4, size=(8, 8, 8))
    pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(1, 4, size=gt.shape))
    mask = rng.random(gt.shape) < 0.7
    result = evaluate(gt, pred, mask)
    assert set(result) == {"nmi", "nmi_geometric", "ari", "dice_mean", "dice_per_class", "n_voxels"}
    assert result["nmi"] == nmi(gt, pred, mask)
    assert result["nmi_geometric"] == nmi(gt, pred, mask, average_method="geometric")
    assert result["ari"] == ari(gt, pred, mask)
    dice = matched_dice(gt, pred, mask)
    assert result["dice_mean"] == dice["mean"]
    assert result["dice_per_class"] == dice["per_class"]
    assert result["n_voxels"] == int(mask.sum())


def test_bad_inputs_raise_naming_the_argument() -> None:
    gt = _blocks()
    with pytest.raises(ValueError, match="pred shape"):
        nmi(gt, gt[:-1])
    with pytest.raises(ValueError, match="mask shape"):
        evaluate(gt, gt, np.ones(gt.shape[:-1], dtype=bool))
    with pytest.raises(ValueError, match="mask is empty"):
        ari(gt, gt, np.zeros(gt.shape, dtype=bool))
    with pytest.raises(ValueError, match="average_method"):
        nmi(gt, gt, average_method="harmonic")
    with pytest.raises(ValueError, match="gt is empty"):
        confusion(np.array([]), np.array([]))
