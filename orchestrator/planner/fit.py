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
GRID_POINTS = 25
ROUNDS = 4  # coarse coordinate rounds
SHRINK = 0.4
SEARCH_STEPS = 100  # pattern-search iterations at most
FINEST_STEP = 1e-3  # in log units (0.1 %) or overlap share
POLISH_STEP = 0.05  # a subsample's fit is this near the full data's
POLISH_FINEST = 0.01  # and polishing it finer than 1 % moves no prediction that matters

Predictor = Callable[[np.ndarray], np.ndarray]  # parameters (G, P) -> predictions (G, n)


@dataclass(frozen=True, slots=True)
class Space:
    """One parameter's search interval, its first grid span, and its prior's standard deviation."""

    low: float
    high: float
    span: float
    sigma: float


def huber(r: np.ndarray) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))


def data_loss(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Mean Huber loss of log(predicted / observed) along the last axis."""
    return huber(np.log(predicted / observed)).mean(axis=-1)


def _objective(predict: Predictor, observed: np.ndarray, start: np.ndarray,
               spaces: list[Space]) -> Callable[[np.ndarray], np.ndarray]:
    sigma = np.array([s.sigma for s in spaces])

    def loss(grid: np.ndarray) -> np.ndarray:
        # The negative log posterior per observation: the Huber loss is a log likelihood with noise
        # HUBER_DELTA, the start a normal prior of width sigma (maximum a posteriori). With many
        # observations the data decide; with few, a parameter moves only as far as they demand.
        prior = (((grid - start) / sigma) ** 2).sum(axis=-1) / (2 * len(observed))
        return data_loss(predict(grid), observed) / HUBER_DELTA**2 + prior
    return loss


def minimize(predict: Predictor, observed: np.ndarray, start: np.ndarray, spaces: list[Space],
             free: list[int]) -> np.ndarray:
    """The parameters (free ones moved, the rest held at `start`) of least loss."""
    low = np.array([s.low for s in spaces])
    high = np.array([s.high for s in spaces])
    loss = _objective(predict, observed, start, spaces)
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


def polish(predict: Predictor, observed: np.ndarray, start: np.ndarray, spaces: list[Space], free: list[int],
           theta: np.ndarray, *, step: float = POLISH_STEP) -> np.ndarray:
    """`theta` (found on a subsample) refined on all observations: a short pattern search."""
    low = np.array([s.low for s in spaces])
    high = np.array([s.high for s in spaces])
    return _pattern_search(_objective(predict, observed, start, spaces), theta, _directions(len(start), free),
                           low, high, step=step, finest=POLISH_FINEST)


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
                    low: np.ndarray, high: np.ndarray, *, step: float, finest: float = FINEST_STEP) -> np.ndarray:
    best = float(loss(theta[None, :])[0])
    largest = step
    for _ in range(SEARCH_STEPS):
        if step < finest or not len(moves):
            break
        trial = np.clip(theta + step * moves, low, high)
        values = loss(trial)
        i = int(np.argmin(values))
        if values[i] < best:  # a move that pays may pay again, further: stride out along a valley
            theta, best, step = trial[i], float(values[i]), min(step * 2, largest)
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
