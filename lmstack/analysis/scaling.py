"""Chinchilla scaling laws: evaluate, allocate compute, fit to measured losses.

The law (Hoffmann et al. 2022, eq. 2) predicts the loss of a model with N
parameters trained on D tokens:

  L(N, D) = E + A / N**alpha + B / D**beta
            |   |              '- finite-data term
            |   '- finite-model term
            '- irreducible term (the entropy of text)

  law = CONSTANTS["hoffmann2022"]
  law.loss(70e9, 1.4e12)                    # 1.937
  law.terms(70e9, 1.4e12)                   # (model term, data term, E)
  n_opt, d_opt = law.compute_optimal(5.76e23)   # under C = 6 N D
  fit = fit_law(n, d, loss, bootstrap=200)  # approach 3, with 95% intervals

Compute-optimal allocation: minimising L under C = 6 N D gives
  N_opt(C) = G (C/6)**(beta/(alpha+beta)),  D_opt(C) = (C/6)**(alpha/(alpha+beta)) / G,
  G = (alpha A / (beta B))**(1/(alpha+beta)).

Fitting follows the paper's approach 3 (and Besiroglu et al. 2024, who
re-fitted it): with A = exp(a), B = exp(b), E = exp(e),
  min over (a, b, e, alpha, beta) of  sum_i Huber_delta(LSE(a - alpha log N_i,
      b - beta log D_i, e) - log L_i),   delta = 1e-3,
by L-BFGS from every point of the paper's grid of initialisations (4,500),
keeping the best: 50 iterations from every start, then the 64 best distinct
points run to convergence. All starts run at once: the L-BFGS loop (optax,
zoom line search) is `jax.vmap`ed and jit-compiled, in float64. Bootstrap
intervals refit resampled points (drawn with replacement; each resample is a
vector of multiplicities, so all resamples run as one vmapped program) from
the 8 best distinct optima of the full fit. A 30-point fit with 200 resamples
takes about 30 s on 2 CPU cores.
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from lmstack.errors import ConfigError, DataError

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D: forward 2 N D plus backward 4 N D
NAMES = ("E", "A", "B", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
  """L(N, D) = E + A / N**alpha + B / D**beta (loss in nats per token)."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def terms(self, n, d):
    """(finite-model term A/N^alpha, finite-data term B/D^beta, irreducible E)."""
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return self.A / n ** self.alpha, self.B / d ** self.beta, self.E

  def loss(self, n, d):
    model_term, data_term, e = self.terms(n, d)
    return e + model_term + data_term

  def compute_optimal(self, flops):
    """(N_opt, D_opt) minimising the loss at compute `flops` = 6 N D."""
    c = np.asarray(flops, np.float64) / FLOPS_PER_PARAM_TOKEN
    s = self.alpha + self.beta
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
    return g * c ** (self.beta / s), c ** (self.alpha / s) / g

  def optimal_split(self, n, d):
    """The compute-optimal (N, D) for the compute 6 N D of a given (N, D)."""
    return self.compute_optimal(FLOPS_PER_PARAM_TOKEN * np.asarray(n, np.float64) * np.asarray(d, np.float64))

  def as_dict(self):
    return dataclasses.asdict(self)


CONSTANTS = {
    # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 3.
    "hoffmann2022": ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    # Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (refit of
    # the points read off the paper's figure 4).
    "besiroglu2024": ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}


def get_law(name):
  if name not in CONSTANTS:
    raise ConfigError(f"unknown scaling-law constants {name!r}; expected one of {sorted(CONSTANTS)}")
  return CONSTANTS[name]


# ---------------------------------------------------------------------------
# Fitting (approach 3).

# The paper's grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}: 5 * 5 * 5 * 6 * 6 = 4,500 starts.
PAPER_GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
                  alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))


@dataclasses.dataclass
class Fit:
  """A fitted law, its objective, and bootstrap intervals (when asked)."""
  law: ScalingLaw
  objective: float  # the summed Huber loss at the optimum
  num_points: int
  num_starts: int
  intervals: dict = dataclasses.field(default_factory=dict)  # name -> (lo, hi)
  bootstrap_laws: list = dataclasses.field(default_factory=list)

  def as_dict(self):
    return {"constants": self.law.as_dict(), "objective": self.objective, "num_points": self.num_points,
            "num_starts": self.num_starts, "intervals": {k: list(v) for k, v in self.intervals.items()},
            "num_bootstrap": len(self.bootstrap_laws)}


def _grid_starts(grid):
  keys = ("a", "b", "e", "alpha", "beta")
  return np.asarray(list(itertools.product(*(np.asarray(grid[k], np.float64) for k in keys))))


def _theta_to_law(theta):
  a, b, e, alpha, beta = (float(x) for x in theta)
  return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _objective(theta, log_n, log_d, log_loss, weights, delta):
  """Weighted sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L)."""
  a, b, e, alpha, beta = theta
  pred = jax.nn.logsumexp(jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)]), axis=0)
  return jnp.sum(weights * optax.huber_loss(pred, log_loss, delta=delta))


def _lbfgs(fun, theta0, max_iter, tol):
  """Minimises `fun` from `theta0` with optax L-BFGS (zoom line search)."""
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    theta, state = carry
    value, grad = value_and_grad(theta, state=state)
    updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(theta, updates), state

  def running(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    return (count == 0) | ((count < max_iter) & (otu.tree_norm(otu.tree_get(state, "grad")) >= tol))

  theta, _ = jax.lax.while_loop(running, step, (theta0, opt.init(theta0)))
  return theta, fun(theta)


@functools.partial(jax.jit, static_argnames=("delta", "max_iter", "tol"))
def _minimize_many(starts, weights, log_n, log_d, log_loss, delta, max_iter, tol):
  """L-BFGS from every start (rows of `starts`) for every weight vector (rows
  of `weights`): returns thetas [W, S, 5] and objectives [W, S]."""

  def one(theta0, w):
    fun = lambda th: _objective(th, log_n, log_d, log_loss, w, delta)  # noqa: E731
    return _lbfgs(fun, theta0, max_iter, tol)

  thetas, values = jax.vmap(jax.vmap(one, in_axes=(0, None)), in_axes=(None, 0))(starts, weights)
  return thetas, jnp.where(jnp.isfinite(values), values, jnp.inf)


def _check_points(n, d, loss):
  n, d, loss = (np.asarray(x, np.float64).ravel() for x in (n, d, loss))
  if not len(n) == len(d) == len(loss):
    raise DataError(f"fit_law: N, D and loss have different lengths ({len(n)}, {len(d)}, {len(loss)})")
  if len(n) < 5:
    raise DataError(f"fit_law: {len(n)} points cannot determine 5 constants; give at least 5")
  if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
    raise DataError("fit_law: N, D and loss must be positive and finite")
  return n, d, loss


def _distinct_best(thetas, values, k):
  """Up to k starts with the lowest objectives whose optima differ (rounded)."""
  seen, chosen = set(), []
  for i in np.argsort(values):
    key = tuple(np.round(thetas[i], 3))
    if np.isfinite(values[i]) and key not in seen:
      seen.add(key)
      chosen.append(thetas[i])
    if len(chosen) == k:
      break
  return np.asarray(chosen)


def fit_law(n, d, loss, *, bootstrap=0, confidence=0.95, delta=1e-3, grid=None, grid_iters=50,
            refine_starts=64, bootstrap_starts=8, max_iter=1000, tol=1e-10, seed=0):
  """Fits L(N, D) to measured (N, D, loss) points (approach 3).

  L-BFGS runs from every grid start for `grid_iters` iterations, then the
  `refine_starts` best distinct points continue to convergence (`tol` on the
  gradient norm, at most `max_iter` iterations): vmapped starts all run as
  long as the slowest, and most of the 4,500 grid starts sit in flat,
  degenerate regions (alpha = 0, a = 0, ...) that never improve on the best.

  Args:
    n, d, loss: parameters, training tokens and (held-out) loss of each run.
    bootstrap: number of bootstrap resamples for the intervals (0: none).
    confidence: the central mass of each interval (percentile bootstrap).
    delta: the Huber loss threshold on log-loss residuals.
    grid: dict of start values for a, b, e, alpha, beta (default PAPER_GRID).
    grid_iters, refine_starts, max_iter, tol: the two L-BFGS phases (above).
    bootstrap_starts: each resample is fitted from this many of the full
      fit's best distinct optima (its optimum lies in a basin the full fit
      has already found).
    seed: bootstrap seed.

  Returns:
    A `Fit`.
  """
  n, d, loss = _check_points(n, d, loss)
  starts = _grid_starts(PAPER_GRID if grid is None else grid)
  with jax.enable_x64(True):
    data = (jnp.log(n), jnp.log(d), jnp.log(loss))
    ones = np.ones((1, len(n)))
    thetas, values = _minimize_many(starts, ones, *data, delta=delta, max_iter=grid_iters, tol=tol)
    refine = _distinct_best(np.asarray(thetas[0]), np.asarray(values[0]), refine_starts)
    if not len(refine):
      raise DataError("fit_law: every L-BFGS start diverged; check the points")
    thetas, values = _minimize_many(refine, ones, *data, delta=delta, max_iter=max_iter, tol=tol)
    thetas, values = np.asarray(thetas[0]), np.asarray(values[0])
    best = int(np.argmin(values))
    fit = Fit(_theta_to_law(thetas[best]), float(values[best]), len(n), len(starts))
    if bootstrap:
      rng = np.random.default_rng(seed)
      counts = rng.multinomial(len(n), np.full(len(n), 1.0 / len(n)), size=bootstrap).astype(np.float64)
      b_thetas, b_values = _minimize_many(_distinct_best(thetas, values, bootstrap_starts), counts, *data,
                                          delta=delta, max_iter=max_iter, tol=tol)
      b_thetas, b_values = np.asarray(b_thetas), np.asarray(b_values)
      best_b = np.argmin(b_values, axis=1)
      fit.bootstrap_laws = [_theta_to_law(b_thetas[i, j]) for i, j in enumerate(best_b)
                            if np.isfinite(b_values[i, j])]
      lo_q, hi_q = 50 * (1 - confidence), 50 * (1 + confidence)
      for name in NAMES:
        values_b = np.asarray([getattr(law, name) for law in fit.bootstrap_laws])
        fit.intervals[name] = (float(np.percentile(values_b, lo_q)), float(np.percentile(values_b, hi_q)))
  return fit


def interval_of(fit, fn, confidence=0.95):
  """Percentile interval of any function of the law over the bootstrap fits,
  e.g. `interval_of(fit, lambda law: law.compute_optimal(1e21)[0])`."""
  values = np.asarray([fn(law) for law in fit.bootstrap_laws], np.float64)
  if not len(values):
    raise DataError("interval_of: the fit has no bootstrap resamples (fit_law(..., bootstrap=200))")
  return float(np.percentile(values, 50 * (1 - confidence))), float(np.percentile(values, 50 * (1 + confidence)))
