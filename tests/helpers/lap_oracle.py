"""The reference every LAP test compares with: scipy's exact solver, and brute force for tiny S."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def optimal_values(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """``max_P sum_s scores[b, s, P(s)]`` of each ``(S, S)`` matrix, float64 ``(B,)``, by scipy."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().double().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    return np.array([m[linear_sum_assignment(m, maximize=True)].sum() for m in scores])


def brute_force_values(scores: torch.Tensor) -> torch.Tensor:
    """The same by trying all S! permutations (S <= 7), float64 ``(B,)``."""
    size = scores.shape[-1]
    perms = torch.tensor(list(itertools.permutations(range(size))))  # (S!, S)
    picked = scores.double()[:, torch.arange(size), perms]  # (B, S!, S)
    return picked.sum(-1).amax(-1)
