"""DPO's reference model: its log-probabilities of every row join the batch before the step.

  put_train, put_eval = reference.make_puts(config, m, state["params"], frozen, put, ...)
  batch = put_train(next(train_iter))  # on its devices, plus ref_logps: float32 [B, 2]
  state, metrics = train_step(state, frozen, batch)  # the one step; the loss reads ref_logps

The reference is the policy as it was before step 1 (the `init_from`
checkpoint, with this run's fresh adapters); it never trains, has no
gradient and no optimizer state. `config.dpo.reference` picks how its
log-probabilities (summed over each row's response, like the policy's:
lmstack.train.losses.sequence_logps) are made:

  copy          a frozen copy of all the starting parameters (trainable and
                frozen), sharded like the policy, forwarded on every batch.
                Loaded from `init_from` on every start, so a resumed run's
                reference is still the starting point, not the policy it
                resumed. Costs one more model in memory (a second base under
                LoRA).
  adapters_off  the policy's own frozen base with its adapter parameters set
                to zero, forwarded on every batch: no second copy of the
                weights. Exact for methods whose zero adapter is the identity
                (lora, qlora: B = 0; adapter: up = 0; llama_adapter: gate = 0),
                and only when the run starts its adapters fresh.
  precomputed   one pass at the start over the batches the run will read
                (the train stream's first `train.steps` batches, the eval
                batches) with the starting model; the values are stored in
                `workdir/reference/<split>.npz` by row index (the pipeline's
                `index`) and looked up on the host, so training holds one
                model and does one forward less per step. A resume reads the
                file; a run whose settings changed (or that trains further
                than the file covers) recomputes it from the starting model.

Example: python -m lmstack.main --config=configs/dpo.py:init_from=runs/sft,method=lora,reference=adapters_off \\
    --workdir=runs/dpo_lora
"""

import hashlib
import io
import itertools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmstack import checkpoint as ckpt_lib
from lmstack import distributed, sharding
from lmstack import paths as lms_paths
from lmstack.data import datasets, preference
from lmstack.errors import ConfigError, DataError
from lmstack.train import losses

MODES = ("copy", "adapters_off", "precomputed")
ZERO_IS_IDENTITY = ("lora", "qlora", "adapter", "llama_adapter")


def validate(config, model_cfg):
  """One-line errors for a DPO config that cannot work."""
  mode, method = config.dpo.reference, model_cfg.peft.method
  if mode not in MODES:
    raise ConfigError(f"config.dpo.reference={mode!r}; expected one of {', '.join(MODES)}")
  if config.data.get("kind") != "preference":
    raise ConfigError(f"config.loss={config.loss!r} needs preference pairs: config.data.kind='preference', not "
                      f"{config.data.get('kind', 'lm')!r}")
  if mode != "adapters_off":
    return
  if method not in ZERO_IS_IDENTITY:
    raise ConfigError(f"config.dpo.reference=adapters_off needs adapters whose zero is the identity "
                      f"({', '.join(ZERO_IS_IDENTITY)}), not peft.method={method!r}; use copy or precomputed")
  if config.init_from and method in ("adapter", "llama_adapter"):
    directory, step = ckpt_lib.resolve_step_dir(config.init_from)
    saved = ckpt_lib.Checkpointer(directory).read_meta(step).get("model", {}).get("peft", {}).get("method")
    if saved == method:
      raise ConfigError(f"config.dpo.reference=adapters_off: init_from={config.init_from} holds trained {method} "
                        "parameters, so the starting model is not the base; use copy or precomputed")


def fresh_params(m):
  """(params, frozen) as `m.init()` makes them, without the optimizer state."""
  return jax.jit(lambda: (lambda s, f: (s["params"], f))(*m.init()),
                 out_shardings=(m.state_sh["params"], m.frozen_sh))()


def make_ref_logps(m, data_sh):
  """jit(params, frozen, batch) -> the model's summed log-probabilities, float32 [B, 2]."""
  def ref_logps(params, frozen, batch):
    return jax.lax.stop_gradient(losses.sequence_logps(nnx.merge(m.graphdef, params, frozen), batch)[0])
  return jax.jit(ref_logps, in_shardings=(m.state_sh["params"], m.frozen_sh, data_sh), out_shardings=data_sh)


def _local(x, data_sh):
  """The rows of a batch-sharded array that this process fed in, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, data_sh.mesh, data_sh.spec))


def make_puts(config, m, params, frozen, put, *, starting_model, fresh, workdir, tokenizer, batch_size, shard,
              mesh, rules, data_sh):
  """(put_train, put_eval): host batch -> device batch with `ref_logps` [B, 2].

  params, frozen: the policy now (before step 1 on a fresh start);
  starting_model() -> (params, frozen) as they were before step 1, loaded
  again (copy, and precomputed on a resume that must recompute).
  """
  mode = config.dpo.reference
  ref_logps = make_ref_logps(m, data_sh)

  if mode in ("copy", "adapters_off"):
    if mode == "copy":
      ref_params, ref_frozen = starting_model()
    else:  # the policy's base; its frozen tree is never donated or changed
      zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=m.state_sh["params"])
      ref_params, ref_frozen = zeros(params), frozen

    def with_ref(batch):
      batch = put(batch)
      return {**batch, "ref_logps": ref_logps(ref_params, ref_frozen, batch)}
    return with_ref, with_ref

  # precomputed: a table per split, row index -> log-probability.
  t = config.train
  suffix = "" if shard["shard_count"] == 1 else f"-{shard['shard_index']}-of-{shard['shard_count']}"
  paths = {s: lms_paths.as_path(workdir) / "reference" / f"{s}{suffix}.npz" for s in ("train", "eval")}  # or gs://
  settings = dict(data=config.data.to_dict(), seq_len=t.seq_len, batch_size=batch_size, seed=config.seed,
                  init_from=config.init_from, model=config.model.to_dict(), peft=config.peft.to_dict(),
                  trainable=config.trainable, shard=shard)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
  # What each split's pass reads: the train stream's first `steps` batches
  # (a resume continues inside them), the evaluation's batches.
  n_batches = {"train": t.steps, "eval": t.eval_batches if t.eval_every else 0}

  def stored(split):
    if not paths[split].exists():
      return None
    with paths[split].open("rb") as file, np.load(file) as f:
      n = n_batches[split]
      covered = bool(f["complete"]) if n == 0 else int(f["batches"]) >= n or bool(f["complete"])
      return f["logps"] if str(f["key"]) == key and covered else None

  tables = {s: stored(s) for s in ("train", "eval") if s == "train" or t.eval_every}
  missing = [s for s, table in tables.items() if table is None]
  if missing:
    model = (params, frozen) if fresh else starting_model()
    with sharding.use(mesh, rules):
      for split in missing:
        tables[split] = _precompute(config, split, n_batches[split], model, ref_logps, put, data_sh, key,
                                    paths[split], tokenizer, batch_size, shard)
    del model

  def lookup(split):
    def with_ref(batch):
      rows = tables[split][batch["index"]]
      real = batch["loss_mask"].any(-1)
      if np.isnan(rows[real]).any():
        raise DataError(f"reference=precomputed: {paths[split]} lacks rows this batch needs; delete "
                        f"{paths[split].parent} to recompute it")
      return put({**batch, "ref_logps": np.where(real, rows, 0.0).astype(np.float32)})
    return with_ref
  return lookup("train"), lookup("eval") if "eval" in tables else put


def _precompute(config, split, n_batches, model, ref_logps, put, data_sh, key, path, tokenizer, batch_size, shard):
  """One pass: the starting model's log-probabilities of the rows `split`'s batches hold."""
  table = np.full([preference.num_rows(config.data, split)], np.nan, np.float32)
  ds = datasets.make_dataset(config.data, tokenizer, seq_len=config.train.seq_len, batch_size=batch_size,
                             seed=config.seed, split=split, **shard)
  it = iter(ds)
  done = 0
  # Every process runs the forward pass equally often (empty batches pad the shorter shards).
  for batch in distributed.same_count(itertools.islice(it, n_batches or None)):
    out = _local(ref_logps(*model, put(batch)), data_sh)
    real = batch["loss_mask"].any(-1)
    table[batch["index"][real]] = out[real]
    done += bool(real.any())
  complete = split != "train" and (not n_batches or next(it, None) is None)
  if hasattr(it, "close"):
    it.close()
  buf = io.BytesIO()
  np.savez(buf, logps=table, key=np.asarray(key), batches=np.asarray(done), complete=np.asarray(complete))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)  # atomic on a local disk; an object store writes whole objects anyway
  logging.info("reference=precomputed: %d %s batches -> %s", done, split, path)
  return table
