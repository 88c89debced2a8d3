"""The train state and how it is born sharded.

The state is a dict {"step", "params", "opt_state", "guard"}: `params` are the
trainable parameters (a `config.trainable` regex over parameter paths picks
them), and everything else in the model is `frozen` and kept apart, so it gets
no gradients, no optimizer state and is never donated. Pre-training trains all
parameters; adapters and DPO's reference model use the split. `guard` holds the
step's skip counters and running loss statistics (`step.init_guard`).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lmstack import sharding
from lmstack.model import peft as peft_lib
from lmstack.model.transformer import Transformer
from lmstack.train import step as step_lib


def trainable_filter(pattern):
  """nnx filter: parameters whose path ("blocks/attn/q") matches `pattern`."""
  regex = re.compile(pattern)

  def is_trainable(path, value):
    return isinstance(value, nnx.Param) and regex.fullmatch("/".join(map(str, path))) is not None

  return is_trainable


@dataclasses.dataclass
class ShardedModel:
  """A model's graph, its state's abstract shapes and shardings, and its init."""
  graphdef: object
  abstract_state: dict  # {"step", "params", "opt_state", "guard"} of ShapeDtypeStructs
  abstract_frozen: object
  state_sh: dict
  frozen_sh: object
  replicated: NamedSharding
  init: object  # () -> (state, frozen), each array born with its sharding
  trainable: str  # the regex that split params from frozen


FROZEN_DTYPES = ("auto", "float32")


def frozen_storage(model_cfg, frozen_dtype="auto"):
  """(path, value) -> value: how a frozen parameter is stored.

  "auto": a frozen weight that only ever enters a matmul (the block linears, the output projection
  unless LoRA folds into it) is stored in the matmul dtype (`model.dtype`, bfloat16 by default), the
  dtype `_matmul` casts it to anyway, so the step computes exactly what it would from float32 weights
  in half the memory. The embedding table (gathered, not multiplied), norm scales and quantized codes
  stay as they are. "float32": every frozen parameter as initialised.
  """
  if frozen_dtype not in FROZEN_DTYPES:
    raise ValueError(f"frozen_dtype={frozen_dtype!r}; expected one of {FROZEN_DTYPES}")
  dtype = jnp.dtype(model_cfg.dtype)
  low = {("blocks", *name.split("/")) for name in peft_lib.linear_specs(model_cfg)}
  if not model_cfg.tie_embeddings and not peft_lib.lora_unembed(model_cfg):
    low.add(("unembed",))

  def store(path, variable):
    value = variable.get_value()
    if frozen_dtype == "float32" or tuple(map(str, path)) not in low or value.dtype != jnp.float32:
      return variable
    return variable.replace(value.astype(dtype))  # keeps the logical axes (its sharding)
  return store


def init_sharded(model_cfg, trainable, tx, mesh, rules, seed, frozen_dtype="auto"):
  """Splits the model into trainable params and frozen rest, sharded on `mesh`; the frozen rest is
  stored as `frozen_storage(model_cfg, frozen_dtype)` says.

  Nothing is materialised until `init()` runs, jit-compiled with
  `out_shardings`, so every parameter is created directly on its devices.
  """
  is_trainable = trainable_filter(trainable)
  store = frozen_storage(model_cfg, frozen_dtype)

  def init():
    model = Transformer(model_cfg, nnx.Rngs(seed))
    _, params, frozen = nnx.split(model, is_trainable, ...)
    frozen = nnx.map_state(store, frozen)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "guard": step_lib.init_guard()}, frozen

  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(seed))), is_trainable, ...)[0]
  abstract_state, abstract_frozen = jax.eval_shape(init)
  replicated = NamedSharding(mesh, P())
  state_sh = {"step": replicated,
              "params": sharding.state_shardings(abstract_state["params"], mesh, rules),
              "opt_state": sharding.state_shardings(abstract_state["opt_state"], mesh, rules),
              "guard": jax.tree.map(lambda _: replicated, abstract_state["guard"])}
  frozen_sh = sharding.state_shardings(abstract_frozen, mesh, rules)
  return ShardedModel(graphdef, abstract_state, abstract_frozen, state_sh, frozen_sh, replicated,
                      jax.jit(init, out_shardings=(state_sh, frozen_sh)), trainable)


def jit_train_step(m, loss_fn, tx, schedule, accum_steps, data_sh, seed=0, guard=step_lib.Guard(), donate=True):
  """The train step compiled with explicit shardings and the state donated
  (`donate=False` only to measure what donation saves: tools/bench.py --donate=false).

  `guard` (`step.Guard.from_config(config.train)`) says which steps skip their update.
  """
  return jax.jit(step_lib.make_train_step(m.graphdef, loss_fn, tx, schedule, accum_steps, seed, guard),
                 in_shardings=(m.state_sh, m.frozen_sh, data_sh), out_shardings=(m.state_sh, m.replicated),
                 donate_argnums=0 if donate else ())


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs that carry shardings: the target of a sharded restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
