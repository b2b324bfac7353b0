"""Simulated human labels: Bradley–Terry choices with abstentions near equality, as in Pick-a-Pic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelModel:
    tau: float = 0.05  # temperature: P(A preferred) = sigmoid((u_A - u_B) / tau)
    tie_rate: float = 0.3  # probability of "no preference" when the two utilities are equal
    tie_scale: float = 0.02  # the tie probability decays as exp(-|u_A - u_B| / tie_scale)


def preference_probability(u_a: np.ndarray, u_b: np.ndarray, tau: float) -> np.ndarray:
    """P(A is preferred to B) under Bradley–Terry on the ground-truth utilities."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(u_a) - np.asarray(u_b)) / tau))


def simulate_labels(u_a, u_b, model: LabelModel, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pick-a-Pic labels (label_0, label_1): (1, 0), (0, 1), or (0.5, 0.5) for a tie."""
    u_a, u_b = np.asarray(u_a, float), np.asarray(u_b, float)
    tie = rng.uniform(size=u_a.shape) < model.tie_rate * np.exp(-np.abs(u_a - u_b) / model.tie_scale)
    a_wins = rng.uniform(size=u_a.shape) < preference_probability(u_a, u_b, model.tau)
    label_0 = np.where(tie, 0.5, a_wins.astype(float))
    return label_0, 1.0 - label_0

