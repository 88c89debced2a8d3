"""The local learning coefficient (LLC) of trained weights, estimated by SGLD.

The learning coefficient lambda measures a model's effective complexity at
weights w*: the volume of weights whose loss is within eps of L(w*) shrinks as
eps**lambda. A regular model with d parameters has lambda = d/2; a singular
one (a neural network, where many weight directions do not change the
function) has less. The estimator (Lau et al. 2023) samples the posterior
localised at w* and tempered to inverse temperature n*beta,

  p(w) ∝ exp(-n beta L_n(w) - gamma/2 ||w - w*||^2),

with SGLD, and reports

  lambda_hat = n beta (E_w[L_n(w)] - L_n(w*)),   beta = 1/log n by default,

where L_n is the mean loss over the n samples (tokens) of a fixed data set.
One SGLD step on a random minibatch of that data set is

  w <- w - eps/2 (n beta grad L_batch(w) + gamma (w - w*)) + N(0, eps),

and E_w[L_n(w)] is the mean of the minibatch losses at the draws after the
burn-in (each minibatch loss is an unbiased estimate of L_n at that w).

Generic use, for any loss of parameters and a batch:

  def loss_fn(params, batch):            # -> (loss summed over the batch, its weight)
    r = batch["x"] @ params["w"] - batch["y"]
    return 0.5 * jnp.sum(r ** 2), r.shape[0]
  batches = {"x": x_mbd, "y": y_mb}       # a fixed data set as M stacked minibatches
  result = estimate_llc(loss_fn, params, batches, SGLDConfig(step_size=1e-4, gamma=10))
  result.llc_mean, result.llc_std, result.loss_trace   # trace: [chains, burn-in + draws]

For lmstack checkpoints, `estimate_checkpoint_llc(path, ...)` restores the
parameters sharded on a mesh, builds a fixed set of batches from the
checkpoint's own data config (or another), and runs the same estimator with
the step jit-compiled with the training shardings; `tools/llc.py` does this
for every checkpoint of one or more runs and plots the trace.

Choosing the hyperparameters: the chain must neither stay put (step size too
small: lambda_hat near 0 and growing with the draws) nor blow up (too large:
NaN or a loss trace that climbs steadily). The loss trace should rise during
the burn-in and then level off; gamma keeps the chain near w* (larger gamma
biases lambda_hat down, roughly by a factor n beta h / (n beta h + gamma) in a
direction of curvature h). Compare checkpoints only at the same settings and
data.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lmstack.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class SGLDConfig:
  """Sampler settings; `nbeta` 0 means n / log n (beta = 1/log n)."""
  step_size: float = 1e-5  # eps
  gamma: float = 1000.0  # localisation strength
  nbeta: float = 0.0  # inverse temperature n*beta; 0: n / log n
  num_chains: int = 4
  num_draws: int = 200  # draws per chain after the burn-in
  num_burnin: int = 50
  seed: int = 0

  def check(self):
    if self.step_size <= 0 or self.gamma < 0 or self.nbeta < 0:
      raise ConfigError(f"SGLD needs step_size > 0, gamma >= 0 and nbeta >= 0; got step_size={self.step_size}, "
                        f"gamma={self.gamma}, nbeta={self.nbeta}")
    if self.num_chains < 1 or self.num_draws < 1 or self.num_burnin < 0:
      raise ConfigError(f"SGLD needs num_chains >= 1, num_draws >= 1, num_burnin >= 0; got {self.num_chains}, "
                        f"{self.num_draws}, {self.num_burnin}")


@dataclasses.dataclass
class LLCResult:
  """lambda_hat (mean and spread over chains) and the sampled loss traces."""
  llc_mean: float
  llc_std: float  # standard deviation over chains
  llc_per_chain: list
  init_loss: float  # L_n(w*)
  n: float  # samples (tokens) in the data set
  nbeta: float
  loss_trace: np.ndarray  # [chains, burn-in + draws]: the minibatch loss at each step
  config: SGLDConfig
  # n beta (mean loss of the second half of the draws - of the first half): near 0
  # once the chains have levelled off; large and negative when w* is not a
  # local minimum (the chains keep descending: early in training).
  drift: float = 0.0

  def as_dict(self, trace=True):
    out = {"llc_mean": self.llc_mean, "llc_std": self.llc_std, "llc_per_chain": self.llc_per_chain,
           "drift": self.drift, "init_loss": self.init_loss, "n": self.n, "nbeta": self.nbeta,
           "sgld": dataclasses.asdict(self.config)}
    if trace:
      out["loss_trace"] = np.asarray(self.loss_trace).tolist()
    return out


def _mean_loss(loss_fn, params, batch):
  loss_sum, weight = loss_fn(params, batch)
  return loss_sum / jnp.maximum(weight, 1e-9)


def _full_loss(loss_fn, params, batches):
  """(sum of losses, sum of weights) over the M stacked minibatches."""
  def body(carry, batch):
    loss_sum, weight = loss_fn(params, batch)
    return (carry[0] + loss_sum, carry[1] + jnp.asarray(weight, jnp.float32)), None
  (loss_sum, weight), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), batches)
  return loss_sum, weight


def _chain(loss_fn, num_steps, params0, batches, key, nbeta, step_size, gamma):
  """One SGLD chain of `num_steps` steps from w* = params0; returns the
  minibatch loss at each step (before the step's move)."""
  num_batches = jax.tree.leaves(batches)[0].shape[0]
  grad_fn = jax.value_and_grad(functools.partial(_mean_loss, loss_fn))
  leaves0, treedef = jax.tree.flatten(params0)

  def step(w, key):
    k_batch, k_noise = jax.random.split(key)
    i = jax.random.randint(k_batch, (), 0, num_batches)
    batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), batches)
    loss, grads = grad_fn(w, batch)
    noise_keys = jax.tree.unflatten(treedef, list(jax.random.split(k_noise, len(leaves0))))

    def move(w_, g, w0, k):
      drift = nbeta * g + gamma * (w_ - w0)
      noise = jax.random.normal(k, w_.shape, w_.dtype)
      return (w_ - 0.5 * step_size * drift + jnp.sqrt(step_size) * noise).astype(w_.dtype)

    return jax.tree.map(move, w, grads, params0, noise_keys), loss

  _, losses = jax.lax.scan(step, params0, jax.random.split(key, num_steps))
  return losses


def make_sampler(loss_fn, num_steps, *, param_shardings=None, batch_shardings=None, replicated=None):
  """(full_loss, chain): the two jit-compiled programs of the estimator.

  full_loss(params, batches) -> (loss sum, weight) over the whole data set;
  chain(params0, batches, key, nbeta, step_size, gamma) -> losses [num_steps].
  Given shardings (as training's), both compile with them: parameters and
  data stay where they are and the result is replicated.
  """
  full = functools.partial(_full_loss, loss_fn)
  chain = functools.partial(_chain, loss_fn, num_steps)
  if param_shardings is None:
    return jax.jit(full), jax.jit(chain)
  return (jax.jit(full, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated),
          jax.jit(chain, in_shardings=(param_shardings, batch_shardings, replicated, replicated, replicated,
                                       replicated), out_shardings=replicated))


def default_nbeta(n):
  """n * beta with beta = 1/log n (the WBIC temperature)."""
  if n <= 1:
    raise DataError(f"the LLC data set has n={n} samples; it needs more than one")
  return n / math.log(n)


def estimate_llc(loss_fn, params, batches, config=SGLDConfig(), *, sampler=None, n=None, on_chain=None):
  """Estimates the LLC at `params` (w*) on the data set `batches`.

  Args:
    loss_fn: (params, batch) -> (loss summed over the batch, weight), where
      weight counts the samples (tokens) the sum is over; jax-traceable.
    params: w*, a pytree of float arrays.
    batches: the data set: a pytree whose leaves stack M minibatches on axis 0.
    config: an SGLDConfig.
    sampler: `make_sampler(loss_fn, burn-in + draws, ...)`, to reuse the
      compiled programs across checkpoints (default: made here).
    n: the number of samples; default the total weight of `batches`.
    on_chain: optional callback(chain_index, lambda_hat of that chain).

  Returns:
    An LLCResult.
  """
  config.check()
  num_steps = config.num_burnin + config.num_draws
  full_loss, chain = sampler or make_sampler(loss_fn, num_steps)
  loss_sum, weight = (float(x) for x in full_loss(params, batches))
  if weight <= 0:
    raise DataError("the LLC data set has no samples (its batches carry zero weight)")
  init_loss = loss_sum / weight
  n = weight if n is None else float(n)
  nbeta = config.nbeta or default_nbeta(n)
  keys = jax.random.split(jax.random.key(config.seed), config.num_chains)
  traces, llcs = [], []
  for c in range(config.num_chains):
    trace = np.asarray(chain(params, batches, keys[c], jnp.float32(nbeta), jnp.float32(config.step_size),
                             jnp.float32(config.gamma)))
    if trace.shape[0] != num_steps:
      raise ConfigError(f"the sampler was compiled for {trace.shape[0]} steps, the config asks for {num_steps}")
    traces.append(trace)
    llcs.append(float(nbeta * (trace[config.num_burnin:].mean() - init_loss)))
    if on_chain is not None:
      on_chain(c, llcs[-1])
  draws = np.stack(traces)[:, config.num_burnin:]
  half = max(1, config.num_draws // 2)
  drift = nbeta * (draws[:, half:].mean() - draws[:, :half].mean()) if config.num_draws > 1 else 0.0
  return LLCResult(llc_mean=float(np.mean(llcs)), llc_std=float(np.std(llcs)), llc_per_chain=llcs,
                   init_loss=init_loss, n=n, nbeta=nbeta, loss_trace=np.stack(traces), config=config,
                   drift=float(drift))


# ---------------------------------------------------------------------------
# Known answers.


def rrr_learning_coefficient(m, n, h, r):
  """(lambda, multiplicity) of reduced-rank regression y = B A x (A: h x m,
  B: n x h) at a true map of rank r <= h (Aoyagi & Watanabe 2005)."""
  if not 0 <= r <= h:
    raise ConfigError(f"reduced-rank regression needs 0 <= r <= h; got r={r}, h={h}")
  if n + r <= m + h and m + r <= n + h and h + r <= m + n:
    s = 2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2
    return ((s / 8, 1) if (m + h + n + r) % 2 == 0 else ((s + 1) / 8, 2))
  if m + h < n + r:
    return (h * m - h * r + n * r) / 2, 1
  if n + h < m + r:
    return (h * n - h * r + m * r) / 2, 1
  return m * n / 2, 1  # m + n < h + r


# ---------------------------------------------------------------------------
# lmstack checkpoints.


@dataclasses.dataclass
class LMData:
  """A fixed LLC data set: M stacked batches ([M, B, T] each) and its n."""
  batches: dict
  n: float
  description: str


def lm_batches(data_cfg, tokenizer, *, seq_len, batch_size, num_batches, split="train", seed=0):
  """The first `num_batches` batches of a split, stacked as numpy [M, B, T]."""
  from lmstack.data import datasets  # the data stack is heavy: import on use
  ds = datasets.make_dataset(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, split=split)
  rows = []
  for i, batch in enumerate(ds):
    if i >= num_batches:
      break
    rows.append({k: np.asarray(v) for k, v in batch.items()})
  if not rows:
    raise DataError(f"the {split} split of the LLC data produced no batch")
  stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  n = float(np.sum(stacked["segment_ids"] > 0 if "loss_mask" not in stacked
                   else (stacked["segment_ids"] > 0) * (stacked["loss_mask"] > 0)))
  return LMData(stacked, n, f"{len(rows)} x {batch_size} x {seq_len} tokens of the {split} split")


def checkpoint_data(path, *, seq_len, batch_size, num_batches, split="train", seed=0, data_overrides=None):
  """An LMData from the data config and tokenizer stored in a checkpoint's meta."""
  import base64

  import ml_collections

  from lmstack import checkpoint as ckpt_lib
  from lmstack.data.tokenizer import tokenizer_from_bytes
  from lmstack.errors import CheckpointError
  directory, step = ckpt_lib.resolve_step_dir(path)
  meta = ckpt_lib.Checkpointer(directory, async_save=False).read_meta(step)
  data = (meta.get("config") or {}).get("data")
  if not data:
    raise CheckpointError(f"checkpoint {directory}/{step} stores no data config; give the data explicitly")
  data_cfg = ml_collections.ConfigDict(data)
  for key, value in (data_overrides or {}).items():
    if key not in data_cfg:
      raise ConfigError(f"unknown data field {key!r}; expected one of {sorted(data_cfg.keys())}")
    data_cfg[key] = value
  if not meta.get("tokenizer_model"):
    raise CheckpointError(f"checkpoint {directory}/{step} carries no tokenizer")
  tokenizer = tokenizer_from_bytes(base64.b64decode(meta["tokenizer_model"]))
  return lm_batches(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                    split=split, seed=seed)


class CheckpointLLC:
  """Estimates the LLC of lmstack checkpoints on one fixed data set.

    est = CheckpointLLC(data, SGLDConfig(...), mesh_shape=(1, -1, 1), rules="fsdp")
    result = est(path)            # a workdir, its checkpoints/ dir or a step dir

  Parameters are restored sharded on the mesh, the data set is placed with
  the batch sharding, and the SGLD chain is one jit-compiled program with
  those shardings, compiled once per model shape and reused across
  checkpoints. Matmuls run in `dtype` (float32 by default: lambda_hat is a
  small difference of two losses).
  """

  def __init__(self, data, config=SGLDConfig(), *, mesh_shape=(1, -1, 1), rules="fsdp", dtype="float32",
               loss="next_token", devices=None):
    from lmstack import sharding
    from lmstack.train import losses
    if loss not in losses.LOSSES:
      raise ConfigError(f"loss={loss!r}; expected one of {sorted(losses.LOSSES)}")
    config.check()
    self.data, self.config, self.dtype = data, config, dtype
    self.loss = losses.LOSSES[loss]
    self.mesh = sharding.make_mesh(tuple(mesh_shape), devices)
    self.rules = sharding.resolve_rules(rules)
    batch_axes = math.prod(self.mesh.shape[a] for a in self.rules.get("batch", ()))
    batch_size = next(iter(data.batches.values())).shape[1]
    if batch_size % batch_axes:
      raise ConfigError(f"LLC batch_size={batch_size} is not divisible by the {batch_axes} devices on the "
                        "mesh's batch axes")
    row_sh = sharding.batch_sharding(self.mesh, self.rules, ndim=3)  # [B, T] rows sharded like training
    spec = jax.sharding.PartitionSpec(None, *row_sh.spec[:2])
    self.batch_sh = {k: jax.sharding.NamedSharding(self.mesh, spec) for k in data.batches}
    self.batches = {k: jax.device_put(v, self.batch_sh[k]) for k, v in data.batches.items()}
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._samplers = {}

  def __call__(self, path, step=None, on_chain=None):
    from flax import nnx

    from lmstack import checkpoint as ckpt_lib
    from lmstack import sharding
    params, model_cfg, _ = ckpt_lib.restore_params(path, self.mesh, self.rules, step)
    model_cfg = dataclasses.replace(model_cfg, dtype=self.dtype)
    graphdef, state, rest = nnx.split(ckpt_lib.model_from_params(params, model_cfg), nnx.Param, ...)
    key = (graphdef, model_cfg)
    if key not in self._samplers:
      def loss_fn(p, batch):
        loss_sum, weight, _ = self.loss(nnx.merge(graphdef, p, rest), batch)
        return loss_sum, weight
      param_sh = jax.tree.map(lambda x: x.sharding, state)
      num_steps = self.config.num_burnin + self.config.num_draws
      self._samplers[key] = make_sampler(loss_fn, num_steps, param_shardings=param_sh,
                                         batch_shardings=self.batch_sh, replicated=self.replicated)
    with sharding.use(self.mesh, self.rules):
      return estimate_llc(None, state, self.batches, self.config, sampler=self._samplers[key], n=self.data.n,
                          on_chain=on_chain)
