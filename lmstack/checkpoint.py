"""Orbax checkpoints: train state, data-iterator state, config and tokenizer.

A checkpoint step directory holds three items:
  state  params, optimizer state and step (OCDBT arrays, restored sharded)
  data   the Grain iterator state (JSON), so a resumed run sees the same batches
  meta   the resolved config, the model shape and the tokenizer (JSON)

Saves are asynchronous and atomic: Orbax writes into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the newest complete one.
"""

import base64
import json
import logging
import os

import jax
import orbax.checkpoint as ocp

from lmstack.errors import CheckpointError


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one workdir."""

  def __init__(self, directory, keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, meta, force=False):
    """Starts an (async) save; returns at once when async."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def read_meta(self, step):
    """The `meta` item of a step, with a one-line error if unreadable."""
    path = os.path.join(self.directory, str(step), "meta")
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged checkpoint
      raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                            "it is truncated or corrupt — remove it to resume from an older one") from e

  def restore(self, step, abstract_state):
    """Restores (state, data_state); `abstract_state` carries the shardings."""
    path = os.path.join(self.directory, str(step))
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      raise CheckpointError(f"checkpoint {path} could not be restored ({type(e).__name__}: {first}); "
                            "it is truncated, corrupt or from another model") from e
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def make_meta(config, model_cfg_dict, tokenizer_bytes):
  return {
      "config": json.loads(config.to_json_best_effort()),
      "model": model_cfg_dict,
      "tokenizer_model": base64.b64encode(tokenizer_bytes).decode("ascii"),
  }


def check_compatible(meta, model_cfg_dict, tokenizer_bytes, where):
  """Raises CheckpointError when a checkpoint's model shape or tokenizer differs."""
  shape_keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "mlp_dim", "tie_embeddings")
  saved = meta.get("model", {})
  diffs = [f"{k}: checkpoint {saved.get(k)} vs config {model_cfg_dict.get(k)}"
           for k in shape_keys if saved.get(k) != model_cfg_dict.get(k)]
  if diffs:
    raise CheckpointError(f"checkpoint {where} holds a different model shape ({'; '.join(diffs)}); "
                          "use a new --workdir or the matching --config.model.*")
  saved_tok = meta.get("tokenizer_model")
  if saved_tok is not None and base64.b64decode(saved_tok) != tokenizer_bytes:
    raise CheckpointError(f"checkpoint {where} was trained with a different tokenizer than "
                          "config.data.tokenizer; use the same tokenizer or a new --workdir")
  logging.info("checkpoint %s matches the model and tokenizer", where)


def resolve_step_dir(path):
  """(manager directory, step) for a workdir, its checkpoints/ dir or a step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint {path} does not exist")
  steps = [int(d) for d in os.listdir(path) if d.isdigit()]
  if not steps:
    raise CheckpointError(f"no checkpoint in {path} (expected numbered step directories)")
  return path, max(steps)


def restore_params(path, abstract_params):
  """Restores only the parameters of a training checkpoint, and its meta.

  `abstract_params` is the model's parameter State of ShapeDtypeStructs with
  shardings; the optimizer state is never read, so a stage hand-off or a
  generation run costs one copy of the weights.
  """
  directory, step = resolve_step_dir(path)
  where = os.path.join(directory, str(step))
  manager = ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {where} has no readable meta ({type(e).__name__}); "
                          "it is truncated, corrupt or not an lmstack checkpoint") from e
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": abstract_params}, partial_restore=True)))
  except Exception as e:  # noqa: BLE001
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise CheckpointError(f"checkpoint {where}: parameters could not be restored ({type(e).__name__}: {first})") from e
  return out["state"]["params"], meta
