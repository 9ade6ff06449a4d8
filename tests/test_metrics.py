import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from ajepa.downstream.metrics import (
    accuracy,
    d_prime,
    mean_auc,
    mean_average_precision,
    multilabel_metrics,
    singlelabel_metrics,
)
from ajepa.errors import AjepaError

# 6 clips, 4 classes; class 2 has no positive (AP and AUC undefined), class 3 is positive everywhere
# (AP defined, AUC undefined).
TARGETS = np.array([[int(c) for c in row] for row in ("1001", "0101", "1101", "0001", "1001", "0101")])
SCORES = np.array([[0.9, 0.2, 0.1, 0.3],
                   [0.4, 0.8, 0.3, 0.6],
                   [0.35, 0.1, 0.2, 0.9],
                   [0.5, 0.3, 0.4, 0.1],
                   [0.6, 0.7, 0.5, 0.2],
                   [0.1, 0.6, 0.6, 0.8]])


def test_multilabel_metrics_match_sklearn_and_count_skipped_classes():
    m = multilabel_metrics(TARGETS, SCORES)
    aps = [average_precision_score(TARGETS[:, k], SCORES[:, k]) for k in (0, 1, 3)]
    aucs = [roc_auc_score(TARGETS[:, k], SCORES[:, k]) for k in (0, 1)]
    assert m["mAP"] == pytest.approx(100 * np.mean(aps))
    assert m["mAUC"] == pytest.approx(np.mean(aucs))
    assert m["d_prime"] == pytest.approx(math.sqrt(2) * norm.ppf(np.mean(aucs)))
    assert (m["classes_scored"], m["classes_skipped"], m["auc_classes_skipped"]) == (3, 1, 2)
    assert mean_average_precision(TARGETS, SCORES) == pytest.approx(m["mAP"])
    assert mean_auc(TARGETS, SCORES) == pytest.approx(m["mAUC"])
    assert aps[2] == 1.0 and 0 < m["mAP"] < 100  # the all-positive class counts with AP 1


def test_perfect_multilabel_predictions():
    targets = TARGETS[:, :2]
    m = multilabel_metrics(targets, targets * 0.8 + 0.1)
    assert m["mAP"] == 100.0 and m["mAUC"] == 1.0 and m["d_prime"] == math.inf
    assert (m["classes_scored"], m["classes_skipped"]) == (2, 0)


def test_d_prime_known_values():
    assert d_prime(0.5) == 0.0
    assert d_prime(norm.cdf(1.0)) == pytest.approx(math.sqrt(2))
    assert d_prime(0.25) == pytest.approx(-d_prime(0.75))
    with pytest.raises(AjepaError, match="AUC"):
        d_prime(1.5)


def test_accuracy_ties_go_to_the_lowest_class():
    scores = np.array([[0.5, 0.5, 0.0],   # tie 0/1 -> 0 (right)
                       [0.2, 0.4, 0.4],   # tie 1/2 -> 1 (wrong: true 2)
                       [0.0, 0.0, 1.0],
                       [1.0, 0.0, 0.0]])  # wrong: true 1
    y = np.array([0, 2, 2, 1])
    assert accuracy(y, scores) == 50.0
    m = singlelabel_metrics(y, scores, num_classes=3)
    assert m["accuracy"] == 50.0
    assert m["confusion"] == confusion_matrix(y, [0, 1, 2, 0], labels=range(3)).tolist()
    assert m["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]


def test_confusion_has_a_row_for_every_class_even_unseen():
    m = singlelabel_metrics(np.array([0, 0]), np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]), num_classes=4)
    assert m["accuracy"] == 50.0
    assert np.array(m["confusion"]).shape == (4, 4) and np.array(m["confusion"]).sum() == 2
    assert all(type(v) is int for row in m["confusion"] for v in row)  # JSON-ready


@pytest.mark.parametrize("call, message", [
    (lambda: accuracy(np.array([0, 1]), np.ones((3, 2))), "does not match"),
    (lambda: accuracy(np.array([0, 2]), np.ones((2, 2))), r"\[0, 2\)"),
    (lambda: accuracy(np.array([0.0, 1.0]), np.ones((2, 2))), "integer"),
    (lambda: accuracy(np.array([0, 1]), np.array([[0.1, np.nan], [0.2, 0.3]])), "1 NaN"),
    (lambda: accuracy(np.array([0]), np.ones(2)), "2-D"),
    (lambda: mean_average_precision(TARGETS, SCORES[:, :3]), "does not match"),
    (lambda: mean_average_precision(TARGETS * 2, SCORES), "0 or 1"),
    (lambda: mean_average_precision(np.zeros((2, 2)), np.ones((2, 2))), "undefined for every class"),
    (lambda: mean_auc(np.ones((2, 2)), np.ones((2, 2))), "undefined for every class"),
    (lambda: multilabel_metrics(TARGETS, np.full(SCORES.shape, np.nan)), "NaN"),
    (lambda: singlelabel_metrics(np.array([0]), np.ones((1, 3)), num_classes=4), "expected 4"),
])
def test_bad_inputs_raise_one_line_errors(call, message):
    with pytest.raises(AjepaError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
