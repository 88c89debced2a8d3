"""One build path: the program the trainer runs is the one tools/aot_compile.py proves and tools/bench.py times.

    mesh, rules = build.mesh_for(config)           # all devices, laid out by their topology
    b = build.build(config, mesh, rules)           # model, optimizer, loss, compiled steps, shardings
    state, frozen = b.model.init()                 # every array born on its devices
    state, metrics = b.train_step(state, frozen, batch)

`tools/aot_compile.py` calls the same two functions over compile-only TPU
devices and lowers `b.train_step` with `b.abstract_args()`; a test checks that
the trainer's program (lowered from its real first batch) is the AOT tool's,
character for character.
"""

import dataclasses
import math

import jax
import numpy as np

from lmstack import sharding
from lmstack.data import datasets
from lmstack.errors import ConfigError
from lmstack.model import peft as peft_lib
from lmstack.model.transformer import ModelConfig
from lmstack.train import losses, optim
from lmstack.train import step as step_lib
from lmstack.train.state import ShardedModel, init_sharded, jit_train_step, with_shardings


def model_config(cfg) -> ModelConfig:
  """The `config.model` section (and `config.peft`) as a ModelConfig, with one-line errors."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  values = {k: v for k, v in cfg.model.items() if k != "preset"}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f"config.model has unknown fields {unknown}; expected some of {sorted(fields)}")
  if "peft" in cfg:
    peft_fields = {f.name for f in dataclasses.fields(peft_lib.PeftConfig)}
    unknown = sorted(set(cfg.peft) - peft_fields)
    if unknown:
      raise ConfigError(f"config.peft has unknown fields {unknown}; expected some of {sorted(peft_fields)}")
    values["peft"] = dict(cfg.peft)
  try:
    return ModelConfig(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from e


def mesh_for(config, devices=None):
  """(mesh, rules) of `config.mesh` over `devices` (default: all), in the devices' physical order
  (sharding.device_grid), with the global batch checked against the mesh's batch axes."""
  mesh = sharding.make_mesh(tuple(config.mesh.shape), devices,
                            dcn_shape=tuple(config.mesh.get("dcn_shape", (1, 1, 1))))
  rules = sharding.resolve_rules(config.mesh.rules)
  check_batch(config, dict(mesh.shape), rules)
  return mesh, rules


def mesh_shape_for(config, n_devices, n_slices=1):
  """What `mesh_for` checks, without devices: {axis: size} of `config.mesh` over `n_devices` in `n_slices`
  equal slices, the batch split checked (tools/aot_compile.py --check_only)."""
  ici, dcn = sharding.grid_shape(tuple(config.mesh.shape), n_devices,
                                 tuple(config.mesh.get("dcn_shape", (1, 1, 1))), n_slices)
  shape = dict(zip(sharding.MESH_AXES, (i * d for i, d in zip(ici, dcn))))
  check_batch(config, shape, sharding.resolve_rules(config.mesh.rules))
  return shape


def check_batch(config, mesh_shape, rules):
  """The global batch (per micro-batch) splits evenly over the mesh's batch axes ({axis: size})."""
  t = config.train
  batch_axes = math.prod(mesh_shape[a] for a in rules.get("batch", ()))
  if t.batch_size % t.grad_accum_steps == 0 and (t.batch_size // t.grad_accum_steps) % batch_axes:
    raise ConfigError(f"config.train.batch_size={t.batch_size} / grad_accum_steps={t.grad_accum_steps} "
                      f"is not divisible by the {batch_axes} devices on the mesh's batch axes "
                      f"({', '.join(rules.get('batch', ()))} of mesh {mesh_shape})")


def trainable_pattern(config, model_cfg):
  """`config.trainable`, except that an adapter method with the default `.*` trains its adapters."""
  if model_cfg.peft.method != "none" and config.trainable == ".*":
    return peft_lib.trainable_pattern(model_cfg.peft.method)
  return config.trainable


@dataclasses.dataclass
class Built:
  """Everything a run of `config` compiles, on one mesh."""
  config: object
  model_cfg: ModelConfig
  mesh: object
  rules: dict
  model: ShardedModel  # graph, abstract state, shardings, init
  tx: object
  schedule: object
  loss_fn: object  # the plain loss (the eval step's)
  guard: step_lib.Guard
  data_sh: object
  train_step: object  # jit(state, frozen, batch) -> (state, metrics), the state donated
  eval_step: object  # jit(params, frozen, batch) -> (loss_sum, weight, metric sums)

  def batch_spec(self):
    """ShapeDtypeStructs of the global batch the trainer feeds the train step (the data pipeline's
    fields; a preference batch also carries the reference's log-probabilities, lmstack/train/reference.py)."""
    t = self.config.train
    batch_size = t.batch_size
    kind = self.config.data.get("kind", "lm")
    names = ["inputs", "targets", "segment_ids", "positions"] + (["loss_mask"] if kind in ("sft", "preference")
                                                                 else [])
    rows = (batch_size, 2, t.seq_len) if kind == "preference" else (batch_size, t.seq_len)
    spec = {k: jax.ShapeDtypeStruct(rows, np.int32, sharding=self.data_sh) for k in names}
    if kind == "preference":
      spec["index"] = jax.ShapeDtypeStruct((batch_size, 2), np.int32, sharding=self.data_sh)
      spec["ref_logps"] = jax.ShapeDtypeStruct((batch_size, 2), np.float32, sharding=self.data_sh)
    return spec

  def abstract_args(self):
    """(state, frozen, batch) of the train step as sharded ShapeDtypeStructs."""
    m = self.model
    return (with_shardings(m.abstract_state, m.state_sh), with_shardings(m.abstract_frozen, m.frozen_sh),
            self.batch_spec())

  def lower(self):
    """The train step lowered from abstract inputs (no array is allocated)."""
    with sharding.use(self.mesh, self.rules):
      return self.train_step.lower(*self.abstract_args())

  def flops_per_token(self):
    """Model FLOPs of one trained token (6N + attention); a frozen base (an adapter method) costs its
    forward and input gradients only, 4 per weight, and the trainable parameters 6."""
    cfg = self.model_cfg
    fpt = cfg.flops_per_token(self.config.train.seq_len)
    if cfg.peft.method != "none":
      trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(self.model.abstract_state["params"]))
      fpt += -2 * (cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model) + 6 * trainable
    return fpt

  def tokens_per_step(self):
    t = self.config.train
    return t.batch_size * t.seq_len * datasets.rows_per_example(self.config.data)


def build(config, mesh, rules, *, wrap_loss=None, donate=True):
  """Builds `config`'s run on `mesh`: nothing is allocated until `model.init()` or a step runs.

  `wrap_loss` (loss_fn -> loss_fn) changes the loss the train step differentiates (the trainer's test
  seam, Hooks.train_loss); `donate=False` keeps the state's buffers (tools/bench.py --donate=false).
  """
  model_cfg = model_config(config)
  t = config.train
  tx, schedule = optim.make_optimizer(config.optim, t.steps)
  m = init_sharded(model_cfg, trainable_pattern(config, model_cfg), tx, mesh, rules, config.seed,
                   frozen_dtype=config.get("frozen_dtype", "auto"))
  loss_fn = losses.make_loss(config)
  guard = step_lib.Guard.from_config(t)
  data_sh = sharding.batch_sharding(mesh, rules)
  train_loss = wrap_loss(loss_fn) if wrap_loss else loss_fn
  train_step = jit_train_step(m, train_loss, tx, schedule, t.grad_accum_steps, data_sh, config.seed, guard,
                              donate=donate)
  eval_step = jax.jit(step_lib.make_eval_step(m.graphdef, loss_fn), in_shardings=(m.state_sh["params"], m.frozen_sh,
                                                                                  data_sh), out_shardings=m.replicated)
  return Built(config, model_cfg, mesh, rules, m, tx, schedule, loss_fn, guard, data_sh, train_step, eval_step)

