"""A small robust fitter: a few parameters, many observations, no scipy.

The loss is the mean Huber loss of r = log(predicted / observed): quadratic for the noise of a
few per cent, linear beyond, so a straggler or an outlier pulls the fit by a bounded amount, and
an error of x2 counts as much as one of /2. It is minimized without gradients (the model's `max`
and `min` have kinks where gradients stall): coordinate descent over shrinking grids finds the
basin, then a pattern search along every axis and every pair's diagonals follows valleys where
two parameters trade off (bandwidth against overlap); each batch of candidate parameters is
evaluated for every observation at once (numpy broadcasting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Where the loss turns from quadratic to linear: ~5 %, the spread of step-time medians we see.
HUBER_DELTA = 0.05
# A weak pull toward the starting point (the priors), so that a direction the data leave flat
# stays where the priors put it instead of drifting; far below the loss of 1 % noise (5e-5).
PRIOR_PULL = 1e-7
GRID_POINTS = 25
ROUNDS = 4  # coarse coordinate rounds
SHRINK = 0.4
SEARCH_STEPS = 200  # pattern-search iterations at most
FINEST_STEP = 1e-3  # in log units (0.1 %) or overlap share

Predictor = Callable[[np.ndarray], np.ndarray]  # parameters (G, P) -> predictions (G, n)


@dataclass(frozen=True, slots=True)
class Space:
    """One parameter's search interval and its first grid span."""

    low: float
    high: float
    span: float


def huber(r: np.ndarray) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))


def data_loss(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Mean Huber loss of log(predicted / observed) along the last axis."""
    return huber(np.log(predicted / observed)).mean(axis=-1)


def minimize(predict: Predictor, observed: np.ndarray, start: np.ndarray, spaces: list[Space],
             free: list[int]) -> np.ndarray:
    """The parameters (free ones moved, the rest held at `start`) of least loss."""
    low = np.array([s.low for s in spaces])
    high = np.array([s.high for s in spaces])

    def loss(grid: np.ndarray) -> np.ndarray:
        pull = PRIOR_PULL * ((grid - start) ** 2).sum(axis=-1)
        return data_loss(predict(grid), observed) + pull

    theta = start.astype(float).copy()
    spans = {i: spaces[i].span for i in free}
    for _ in range(ROUNDS):
        for i in free:
            grid = np.repeat(theta[None, :], GRID_POINTS, axis=0)
            grid[:, i] = np.clip(np.linspace(theta[i] - spans[i], theta[i] + spans[i], GRID_POINTS), low[i], high[i])
            theta = grid[int(np.argmin(loss(grid)))]
            spans[i] *= SHRINK
    return _pattern_search(loss, theta, _directions(len(start), free), low, high,
                           step=max(spans.values(), default=0.0))


def _directions(size: int, free: list[int]) -> np.ndarray:
    """Unit moves along each free axis and both diagonals of each pair of free axes."""
    moves = []
    for a in free:
        for sign in (1.0, -1.0):
            moves.append(np.eye(size)[a] * sign)
    for i, a in enumerate(free):
        for b in free[i + 1:]:
            for sa, sb in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                moves.append(np.eye(size)[a] * sa + np.eye(size)[b] * sb)
    return np.array(moves).reshape(-1, size)


def _pattern_search(loss: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, moves: np.ndarray,
                    low: np.ndarray, high: np.ndarray, *, step: float) -> np.ndarray:
    best = float(loss(theta[None, :])[0])
    for _ in range(SEARCH_STEPS):
        if step < FINEST_STEP or not len(moves):
            break
        trial = np.clip(theta + step * moves, low, high)
        values = loss(trial)
        i = int(np.argmin(values))
        if values[i] < best:
            theta, best = trial[i], float(values[i])
        else:
            step /= 2
    return theta


def sensitive(predict: Predictor, start: np.ndarray, index: int, moves: tuple[float, float], *,
              threshold: float) -> np.ndarray:
    """Per observation: does moving parameter `index` to either of `moves` change the prediction
    by at least `threshold` (relative)? A parameter no observation is sensitive to cannot be fitted."""
    grid = np.repeat(start[None, :], 3, axis=0)
    grid[1, index], grid[2, index] = moves
    p = predict(grid)
    return np.maximum(np.abs(np.log(p[1] / p[0])), np.abs(np.log(p[2] / p[0]))) >= threshold


LOG_RANGE = math.log(1e3)  # a fitted figure stays within x/1000 of its prior
