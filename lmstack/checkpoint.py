"""Orbax checkpoints: train state, data-iterator state, config and tokenizer.

A checkpoint step directory holds three items:
  state  params, optimizer state and step (OCDBT arrays, restored sharded)
  data   the Grain iterator state (JSON), so a resumed run sees the same batches
  meta   the resolved config, the model shape and the tokenizer (JSON)

Saves are asynchronous and atomic: Orbax writes into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the newest complete one. Just before the rename, a manifest
(`manifest.sha256.json`: size and SHA-256 of every file of the three items) is
written into the temporary directory, so it commits with the checkpoint; a
restore checks it first, as a flipped byte in an uncompressed array chunk would
otherwise load silently. The meta of a local checkpoint records that it has a
manifest (`"manifest": true`), so one that lacks it is damaged; a checkpoint
from before manifests (no such field) is checked only by restoring it, and
named as such. A checkpoint that fails its manifest or its restore is
skipped for the one before it and renamed `<step>.corrupt-<unix time>` (kept
for inspection; Orbax neither resumes from it nor counts it towards `keep`).
A save that fails (a full disk) raises a one-line CheckpointError naming the
step and the cause; the previous checkpoints are untouched.
"""

import base64
import dataclasses
import errno as errno_lib
import hashlib
import json
import logging
import os
import re
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lmstack import paths, sharding
from lmstack.errors import CheckpointError
from lmstack.model import peft as peft_lib
from lmstack.model.transformer import ModelConfig, Transformer


MANIFEST = "manifest.sha256.json"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary name for a step being saved: `<step><suffix>`


def _item_files(step_dir):
  """Relative paths of the files inside a step's item directories (not Orbax's
  own step metadata at the top, which it rewrites while committing)."""
  out = []
  for item in sorted(os.listdir(step_dir)):
    top = os.path.join(step_dir, item)
    if not os.path.isdir(top):
      continue
    for root, dirs, files in os.walk(top):
      dirs.sort()
      out.extend(os.path.relpath(os.path.join(root, f), step_dir) for f in sorted(files))
  return out


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 23):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(step_dir):
  """Writes `step_dir/MANIFEST` (size and SHA-256 of every item file), atomically.

  Local (and network) disks only: Cloud Storage checks each object's CRC32C itself.
  """
  if paths.is_remote(step_dir):
    return
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256(os.path.join(step_dir, rel))}
           for rel in _item_files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"version": 1, "files": files}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir):
  """True if `step_dir` matches its manifest, False if it has none (a checkpoint
  from before manifests, or a synchronous save killed before writing it);
  raises CheckpointError naming the first file that is missing or differs."""
  path = os.path.join(step_dir, MANIFEST)
  if paths.is_remote(step_dir) or not os.path.exists(path):
    return False
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint {step_dir} has an unreadable {MANIFEST} ({first_line(e)})") from None
  for rel, want in sorted(files.items()):
    p = os.path.join(step_dir, rel)
    if not os.path.isfile(p):
      raise CheckpointError(f"checkpoint {step_dir} lacks {rel}")
    size = os.path.getsize(p)
    if size != want["size"]:
      raise CheckpointError(f"checkpoint {step_dir}: {rel} has {size} bytes, its manifest {want['size']}")
    if _sha256(p) != want["sha256"]:
      raise CheckpointError(f"checkpoint {step_dir}: {rel} differs from its manifest (SHA-256)")
  return True


def check_manifest(step_dir, meta):
  """Verifies a step against its manifest, given its meta; returns False for a checkpoint that predates
  manifests (or lives on gs://), True when verified. Raises CheckpointError when the step differs from
  its manifest, or lacks the manifest that its meta says was written."""
  if verify_manifest(step_dir):
    return True
  if meta.get("manifest") and not paths.is_remote(step_dir):
    raise CheckpointError(f"checkpoint {step_dir} lacks its {MANIFEST} (its meta says one was written): "
                          "its files cannot be verified")
  return False


def _cause(e):
  """The root cause of a failed save as a few words, e.g. "[Errno 28] No space left on device"."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return f"[Errno {seen.errno}] {os.strerror(seen.errno)}"
    seen = seen.__cause__ or seen.__context__
  # tensorstore reports an OS error in its message ("... [os_error_code='28']"), not as an OSError.
  text = str(e)
  match = re.search(r"os_error_code='(\d+)'", text)
  codes = [int(match.group(1))] if match else []
  codes += [c for c in (errno_lib.ENOSPC, errno_lib.EFBIG, errno_lib.EDQUOT, errno_lib.EIO) if os.strerror(c) in text]
  if codes:
    return f"[Errno {codes[0]}] {os.strerror(codes[0])}"
  return f"{type(e).__name__}: {first_line(e)}"


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one workdir."""

  def __init__(self, directory, keep=3, async_save=True):
    self.directory = paths.as_path(directory)  # local or gs:// (etils.epath), as Orbax takes it
    self.async_save = async_save
    self._saving = None  # the step of the save in flight, if any
    # Orbax always saves in the background, so that the manifest is written before the commit (Orbax
    # calls _seal before renaming); a synchronous save just waits for it (`save`).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def _seal(self):
    """Writes the manifest of the step being saved, after its files, before its commit (rename)."""
    if jax.process_index() != 0 or self._saving is None or paths.is_remote(self.directory):
      return
    step_dir = os.path.join(self.directory, str(self._saving))
    if os.path.isdir(step_dir + _ORBAX_TMP_SUFFIX):  # a local disk: the rename commits the manifest with it
      step_dir += _ORBAX_TMP_SUFFIX
    if os.path.isdir(step_dir):
      write_manifest(step_dir)
    else:
      logging.warning("no directory for checkpoint step %s; it gets no manifest", self._saving)

  def _failed(self, e):
    previous = self.manager.latest_step()
    kept = f"the previous checkpoint, step {previous}, is kept" if previous is not None else "no checkpoint is kept"
    return CheckpointError(f"saving checkpoint {os.path.join(self.directory, str(self._saving))} failed "
                           f"({_cause(e)}); {kept}")

  def save(self, step, state, data_state, meta, force=False):
    """Starts an (async) save; returns at once when async. Raises CheckpointError
    if this save, or the one before it, fails."""
    self.wait()
    meta = {**meta, "manifest": not paths.is_remote(self.directory)}  # a local step without one is damaged
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    self._saving = step
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001 - a failed write (full disk, EFBIG, EIO) in any layer
      raise self._failed(e) from e
    if not saved:
      self._saving = None
    elif not self.async_save:
      self.wait()
    return saved

  def read_meta(self, step):
    """The `meta` item of a step, with a one-line error if unreadable."""
    path = os.path.join(self.directory, str(step), "meta")
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged checkpoint
      raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                            "it is truncated or corrupt — remove it to resume from an older one") from e

  def restore(self, step, abstract_state):
    """Restores (state, data_state); `abstract_state` carries the shardings.

    A training state saved before the step guard existed (no "guard") gets a
    fresh one: its statistics start again, nothing else changes.
    """
    path = os.path.join(self.directory, str(step))

    def load(target):
      return self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))

    try:
      out = load(abstract_state)
    except Exception as e:  # noqa: BLE001
      error = e
      out = None
      if isinstance(abstract_state, dict) and "guard" in abstract_state:
        try:
          out = load({k: v for k, v in abstract_state.items() if k != "guard"})
          out["state"]["guard"] = jax.tree.map(
              lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), abstract_state["guard"])
          logging.warning("checkpoint %s has no step guard state; starting a fresh one", path)
        except Exception:  # noqa: BLE001 - report the first failure, the real one
          out = None
      if out is None:
        raise CheckpointError(f"checkpoint {path} could not be restored ({type(error).__name__}: "
                              f"{first_line(error)}); it is truncated, corrupt or from another model") from error
    return out["state"], out["data"]

  def restore_newest(self, abstract_state, check_meta=None):
    """Restores the newest intact checkpoint, skipping damaged ones.

    Steps are tried newest first: manifest, meta, then the restore itself. A
    damaged step is skipped; once one restores, the skipped ones are renamed
    `<step>.corrupt-<unix time>` (not deleted: for inspection). If none
    restores, raises a one-line CheckpointError and changes nothing.
    `check_meta(meta, where)` may raise for a checkpoint of another model: that
    is not damage, so it stops the search at once.

    Returns:
      (step, state, data_state, skipped, verified) or None when there is no
      checkpoint; skipped lists (step directory, where it was moved, why) per
      damaged step; verified is False for a checkpoint from before manifests.
    """
    bad = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      where = os.path.join(self.directory, str(step))
      try:
        meta = self.read_meta(step)
        verified = check_manifest(where, meta)
      except CheckpointError as e:
        bad.append((where, str(e)))
        continue
      if check_meta is not None:
        check_meta(meta, where)
      try:
        state, data_state = self.restore(step, abstract_state)
      except CheckpointError as e:
        bad.append((where, str(e)))
        continue
      skipped = []
      for path, reason in bad:
        aside = f"{path}.corrupt-{int(time.time())}"
        if jax.process_index() == 0:
          paths.as_path(path).rename(aside)
        skipped.append((path, aside, reason))
      if skipped:
        self.manager.reload()  # forget the renamed steps: saves resume after `step`
      return step, state, data_state, skipped, verified
    if bad:
      raise CheckpointError(f"none of the {len(bad)} checkpoints in {self.directory} is intact (newest: "
                            f"{bad[0][1]}); nothing was changed")
    return None

  def wait(self):
    """Waits for the save in flight; raises CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failed(e) from e
    self._saving = None

  def close(self):
    self.wait()
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
# ({"step", "params", "opt_state", "guard"}, parameters as nnx.State, whose leaves are
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
  path = paths.as_path(path)  # local or gs://
  if not path.is_dir():
    raise CheckpointError(f"checkpoint not found: {path} is not a directory")
  if (path / "checkpoints").is_dir():  # a training workdir
    path = path / "checkpoints"
  elif path.name.isdigit() and (path / "meta").is_dir():  # one step
    path, step = path.parent, int(path.name) if step is None else step
  path = str(path)
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
  item = "params" if (paths.as_path(where) / "params").is_dir() else "state"
  handlers = {"params": ocp.PyTreeCheckpointHandler(), "state": ocp.PyTreeCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      tree = manager.item_metadata(step)[item]
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged checkpoint
      raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {first_line(e)})") from None
    if not check_manifest(where, meta):  # a flipped byte would otherwise load silently
      logging.warning("checkpoint %s predates manifests: its files are checked only by restoring them", where)
    model_cfg = _model_config_from_meta(meta.get("model", {}), where)
    tree = getattr(tree, "tree", tree)
    if item == "state":  # training: {"step", "params", "opt_state", "guard"}; params are nnx.State
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
  if not paths.as_path(base_from).is_dir():
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
