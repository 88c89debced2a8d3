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
import dataclasses
import json
import logging
import os
import re

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lmstack import sharding
from lmstack.errors import CheckpointError
from lmstack.model import peft as peft_lib
from lmstack.model.transformer import ModelConfig, Transformer


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
      raise CheckpointError(f"checkpoint {path} could not be restored ({type(e).__name__}: {first_line(e)}); "
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


def first_line(e):
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------
# Parameters only: stage hand-off (init_from), generation, export.
#
# Two layouts hold parameters: a training checkpoint's `state` item
# ({"step", "params", "opt_state"}, parameters as nnx.State, whose leaves are
# saved as {"value": array}) and a params checkpoint's `params` item (a pure
# dict, written by the Hugging Face import). `restore_params` reads either.


def tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def tree_set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def flatten_tree(tree, prefix=()):
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, sub in tree.items():
    out.update(flatten_tree(sub, prefix + (key,)))
  return out


def default_mesh():
  """One device: what import and export use unless given a mesh."""
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def abstract_params(model_cfg, mesh=None, rules=None):
  """A pure dict of ShapeDtypeStructs, each with its NamedSharding on `mesh`.

  `rules` is a rule-set name or list (default "fsdp"); `mesh` defaults to one
  device. This is also the target of a sharded restore.
  """
  mesh = mesh or default_mesh()
  if not isinstance(rules, dict):  # resolve_rules' output passes through
    rules = sharding.resolve_rules("fsdp" if rules is None else rules)
  state = nnx.state(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nnx.to_pure_dict(state), shardings)


def model_from_params(params, model_cfg):
  """An nnx Transformer holding `params` (a pure dict, as `restore_params`
  and `lmstack.convert.hf.load_hf_params` return)."""
  graphdef, param_state, rest = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))),
                                          nnx.Param, ...)
  nnx.replace_by_pure_dict(param_state, params)
  return nnx.merge(graphdef, param_state, rest)


def resolve_step_dir(path, step=None):
  """(checkpoint directory, step) for a params checkpoint, a training
  workdir, its checkpoints/ directory, or one step directory of either."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint not found: {path} is not a directory")
  if os.path.isdir(os.path.join(path, "checkpoints")):  # a training workdir
    path = os.path.join(path, "checkpoints")
  elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "meta")):  # one step
    path, step = os.path.dirname(path), int(os.path.basename(path)) if step is None else step
  steps = ocp.CheckpointManager(path).all_steps()
  if not steps:
    raise CheckpointError(f"{path} holds no complete checkpoint")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"{path} has no step {step}; it has {sorted(steps)}")
  return path, step


def _model_config_from_meta(model, where):
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(model) - fields)
  if unknown:
    raise CheckpointError(f"{where}: its model config has fields this lmstack does not know: {unknown}")
  try:
    return ModelConfig(**model)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: invalid model config ({first_line(e)})") from None


def restore_params(path, mesh=None, rules=None, step=None):
  """Restores only the parameters of an lmstack checkpoint, sharded.

  `path` is a params checkpoint (`lmstack.convert.hf.save_params_checkpoint`) or a training
  workdir (or its checkpoints/ directory, or a step directory); a training
  checkpoint's optimizer state is not read. The newest step unless `step`.

  Returns:
    (params, model_cfg, meta): params a pure dict of jax.Arrays placed on
    `mesh` (default one device) under `rules` (default "fsdp").
  """
  directory, step = resolve_step_dir(path, step)
  where = os.path.join(directory, str(step))
  item = "params" if os.path.isdir(os.path.join(where, "params")) else "state"
  handlers = {"params": ocp.PyTreeCheckpointHandler(), "state": ocp.PyTreeCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      tree = manager.item_metadata(step)[item]
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged checkpoint
      raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {first_line(e)})") from None
    model_cfg = _model_config_from_meta(meta.get("model", {}), where)
    tree = getattr(tree, "tree", tree)
    if item == "state":  # training: {"step", "params", "opt_state"}; params are nnx.State
      if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"checkpoint {where} has no params in its state item")
      tree = tree["params"]
    # nnx.State leaves are saved as {"value": array}; a pure dict's are arrays.
    saved = {(p[:-1] if p[-1] == "value" else p): p for p in flatten_tree(tree)}
    targets = abstract_params(model_cfg, mesh, rules)
    flat_targets = flatten_tree(targets)
    missing = sorted("/".join(p) for p in flat_targets if p not in saved)
    base_from = None
    if missing and model_cfg.peft.method != "none":
      # An adapter run saves only its adapters; the frozen base is the
      # checkpoint it started from (its config's init_from).
      adapter = re.compile(peft_lib.trainable_pattern(model_cfg.peft.method))
      if not any(adapter.fullmatch(p) for p in missing):
        base_from = meta.get("config", {}).get("init_from") or ""
        if not base_from:
          raise CheckpointError(f"checkpoint {where} holds only {model_cfg.peft.method} adapters and names no "
                                "base checkpoint (config.init_from)")
        flat_targets = {p: t for p, t in flat_targets.items() if adapter.fullmatch("/".join(p))}
        missing = []
    if missing:
      raise CheckpointError(f"checkpoint {where} lacks {len(missing)} parameter(s), e.g. {missing[0]} (a run "
                            "that trained only some parameters saves only those)")
    restore = {}
    for p, target in flat_targets.items():
      shape = tuple(getattr(tree_get(tree, saved[p]), "shape", target.shape))
      if shape != target.shape:
        raise CheckpointError(f"checkpoint {where}: {'/'.join(p)} has shape {list(shape)}, its model config "
                              f"implies {list(target.shape)}")
      tree_set(restore, saved[p], target)
    if item == "state":
      restore = {"params": restore}
    args = ocp.args.PyTreeRestore(item=restore, restore_args=ocp.checkpoint_utils.construct_restore_args(restore),
                                  partial_restore=True)
    try:
      out = manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} could not be restored ({type(e).__name__}: "
                            f"{first_line(e)}); it is truncated or corrupt") from None
  if item == "state":
    out = out["params"]
  params = {}
  for p in flat_targets:
    tree_set(params, p, tree_get(out, saved[p]))
  if base_from is not None:
    params, model_cfg = _with_base(params, model_cfg, base_from, where, mesh, rules)
  return params, model_cfg, meta


def _with_base(adapters, model_cfg, base_from, where, mesh, rules):
  """An adapter checkpoint's parameters completed by its base checkpoint's.

  A LoRA or prompt-tuning base is itself resolved first (LoRA merged). Under
  qlora the base is returned as the quantized-then-dequantized weights the
  adapters were trained against, with the config's method set to lora.
  """
  if not os.path.isdir(base_from):
    raise CheckpointError(f"checkpoint {where} holds only adapters; its base checkpoint {base_from} "
                          "(config.init_from) is missing")
  base, base_cfg, _ = restore_params(base_from, mesh, rules)
  if base_cfg.peft.lora:
    base, base_cfg = peft_lib.merge_lora(base, base_cfg)
  if base_cfg.peft.method != "none":
    raise CheckpointError(f"checkpoint {where}: its base {base_from} is a {base_cfg.peft.method} model; "
                          "only plain or LoRA bases can carry adapters")
  if model_cfg.peft.method == "qlora":
    base = peft_lib.dequantized_base(base, model_cfg)
    model_cfg = dataclasses.replace(model_cfg, peft=dataclasses.replace(model_cfg.peft, method="lora"))
  params = base
  for p, value in flatten_tree(adapters).items():
    tree_set(params, p, value)
  return params, model_cfg
