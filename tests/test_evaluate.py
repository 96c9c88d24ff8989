import numpy as np
import pytest

from fmnist.evaluate import confusion_matrix, score


def test_known_confusion_matrix_and_scores():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    ev = score(y_true, y_pred, ("a", "b", "c"))
    assert ev.accuracy == pytest.approx(6 / 9)
    np.testing.assert_allclose(ev.precision, [2 / 3, 2 / 4, 2 / 2])
    np.testing.assert_allclose(ev.recall, [2 / 3, 2 / 2, 2 / 4])
    np.testing.assert_allclose(ev.f1, [2 / 3, 2 / 3, 2 / 3])
    assert ev.support.tolist() == [3, 2, 4]
    assert ev.per_class()[2] == {"class": "c", "precision": 1.0, "recall": 0.5,
                                 "f1": pytest.approx(2 / 3), "support": 4}


def test_class_never_predicted_has_zero_precision():
    ev = score(np.array([0, 1]), np.array([0, 0]), ("a", "b"))
    assert ev.precision.tolist() == [0.5, 0.0] and ev.f1[1] == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 2)
