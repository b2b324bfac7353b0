import numpy as np
import pytest

from spo.evaluation import label_accuracy
from spo.world.labels import LabelModel, preference_probability, simulate_labels


@pytest.mark.parametrize("delta", [0.0, 0.02, 0.05, 0.1, -0.08])
def test_agreement_rate_matches_bradley_terry(delta):
    model = LabelModel(tau=0.05, tie_rate=0.3, tie_scale=0.02)
    n = 40_000
    u_b = np.full(n, 0.5)
    label_0, label_1 = simulate_labels(u_b + delta, u_b, model, np.random.default_rng(0))
    np.testing.assert_allclose(label_0 + label_1, 1.0)
    decided = label_0 != 0.5
    p = float(preference_probability(delta, 0.0, model.tau))
    observed = label_0[decided].mean()
    assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / decided.sum()) + 1e-9
    tie_expected = model.tie_rate * np.exp(-abs(delta) / model.tie_scale)
    assert abs((~decided).mean() - tie_expected) < 0.01


def test_label_accuracy_ignores_ties():
    s0 = [3.0, 1.0, 2.0, 5.0]
    s1 = [1.0, 2.0, 2.5, 0.0]
    labels = [1.0, 1.0, 0.0, 0.5]
    assert label_accuracy(s0, s1, labels) == pytest.approx(2 / 3)
