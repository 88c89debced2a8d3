"""The training loop every stage runs: init or restore, step, eval, log, save.

    python -m lmstack.main --config=configs/pretrain.py --workdir=/tmp/run

A stage is a config: its data (`config.data`), loss (`config.loss`, a name in
`losses.LOSSES`), trainable parameters (`config.trainable`, a regex over
parameter paths; the rest is frozen) and schedule (`config.optim`). Re-running
the same command resumes from the newest checkpoint in `workdir/checkpoints`,
data order included.

Everything the run will read (train and eval data, tokenizer, init_from, the
DPO reference, the workdir's writability) is opened and checked before the
first step, so a bad input never costs a checkpoint. SIGTERM (a TPU
maintenance event), from the start of `run` on, saves the current step and
raises `Preempted` (exit status 75 from `lmstack.main`).
"""

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import re
import signal
import time

import jax
import numpy as np
from flax import nnx

from lmstack import checkpoint as ckpt_lib
from lmstack import console, distributed, errors, paths, sharding
from lmstack.data import datasets, pipeline, sources
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import CheckpointError, ConfigError, DataError, Preempted, TrainingError
from lmstack.metrics import MetricWriter, measure_peak_flops
from lmstack.model import peft as peft_lib
from lmstack.train import build as build_lib
from lmstack.train import config_checks, losses, optim, reference
from lmstack.train.state import with_shardings


def validate(config, model_cfg, n_devices):
  """Checks that cannot wait until the first step fails.

  Field types and ranges (config_checks.FIELDS), the schedule, then what the
  fields must satisfy together; the mesh against the devices is checked where
  it is made (sharding.make_mesh), the data where it is read.
  """
  del n_devices  # sharding.make_mesh checks the mesh shape against the devices
  config_checks.check_fields(config)
  t = config.train
  optim.make_schedule(config.optim, t.steps)  # the schedule's name, warmup_steps <= steps
  if t.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"config.train.seq_len={t.seq_len} exceeds config.model.max_seq_len={model_cfg.max_seq_len}")
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"config.train.batch_size={t.batch_size} is not a multiple of "
                      f"config.train.grad_accum_steps={t.grad_accum_steps}")
  if config.loss not in losses.LOSSES:
    raise ConfigError(f"config.loss={config.loss!r}; expected one of {sorted(losses.LOSSES)}")
  if config.data.get("kind", "lm") not in datasets.KINDS:
    raise ConfigError(f"config.data.kind={config.data.kind!r}; expected one of {sorted(datasets.KINDS)}")
  if losses.is_preference(config.loss):
    losses.make_loss(config)  # checks config.dpo
    reference.validate(config, model_cfg)
  elif config.data.get("kind") == "preference":
    raise ConfigError(f"config.data.kind='preference' gives pairs; config.loss={config.loss!r} is not a preference "
                      f"loss ({', '.join(losses.PREFERENCE)})")
  try:
    re.compile(config.trainable)
  except re.error as e:
    raise ConfigError(f"config.trainable={config.trainable!r} is not a regular expression: {e}") from e


class Hooks:
  """The trainer's test seam: the default changes nothing.

  Fault injection (tests/fault_hooks.py: NaN steps inside the compiled step, a
  SIGKILL right after a save starts) goes through it, so the production loop
  holds no fault code.
  """

  def train_loss(self, loss_fn):
    """The loss the train step differentiates (the eval step always uses the plain one)."""
    return loss_fn

  def train_batch(self, step, batch):
    """Step `step`'s (1-based) host batch, before it is put on the devices."""
    del step
    return batch

  def first_step(self, built, state, frozen, batch):
    """Called once, before the run's first step, with its build (lmstack/train/build.py) and the step's
    real inputs (the test that the AOT tool compiles the trainer's program lowers the step with them)."""

  def after_step(self, step):
    """Called after step `step` is done, logged and (maybe) its save started."""


class _Preemption:
  """SIGTERM (how TPU maintenance arrives) asks the loop to save and stop."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners)
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _load_init_from(path, model_cfg, tokenizer, m, state, frozen, fresh, mesh, rules, seed):
  """Puts a checkpoint's parameters into this run's (state, frozen), sharded.

  Base weights go into `frozen` (and into the trainable params when they
  train); a LoRA checkpoint is merged first, and a qlora run quantizes them.
  This run's adapters keep their fresh initialisation unless the checkpoint
  has the same (non-mergeable) method's parameters. Frozen parameters are not
  in this run's checkpoints, so this runs on every start; the trainable ones
  only on a fresh start (`fresh`), as a resume restores them.
  """
  directory, step = ckpt_lib.resolve_step_dir(path)
  where = os.path.join(directory, str(step))
  ckpt_lib.check_compatible(ckpt_lib.Checkpointer(directory).read_meta(step), dataclasses.asdict(model_cfg),
                            tokenizer.to_bytes(), where)
  params, ckpt_cfg, _ = ckpt_lib.restore_params(where, mesh, rules)
  if ckpt_cfg.peft.lora:
    params, ckpt_cfg = peft_lib.merge_lora(params, ckpt_cfg)
  method = model_cfg.peft.method
  if ckpt_cfg.peft.method not in ("none", method):
    raise CheckpointError(f"init_from={path} is a {ckpt_cfg.peft.method} model; a {method} run can start only "
                          "from a plain, LoRA or same-method checkpoint")
  if method == "qlora":
    params = peft_lib.quantize_base(params, model_cfg)
  loaded = ckpt_lib.flatten_tree(params)

  def overwrite(tree, shardings):
    pure, sh = nnx.to_pure_dict(tree), ckpt_lib.flatten_tree(nnx.to_pure_dict(shardings))
    for p in ckpt_lib.flatten_tree(pure):
      if p in loaded:  # in the dtype this run stores it in (state.frozen_storage)
        dtype = ckpt_lib.tree_get(pure, p).dtype
        ckpt_lib.tree_set(pure, p, jax.device_put(loaded[p], sh[p]).astype(dtype))
    nnx.replace_by_pure_dict(tree, pure)

  overwrite(frozen, m.frozen_sh)
  if fresh:
    overwrite(state["params"], m.state_sh["params"])
  adapter = re.compile(peft_lib.trainable_pattern(method)) if method != "none" else None
  model_paths = ckpt_lib.flatten_tree(nnx.to_pure_dict(frozen)) | ckpt_lib.flatten_tree(
      nnx.to_pure_dict(state["params"]))
  lacking = [p for p in model_paths if p not in loaded and not (adapter and adapter.fullmatch("/".join(p)))]
  if lacking:
    raise CheckpointError(f"init_from={where} lacks {'/'.join(lacking[0])} (and {len(lacking) - 1} more)")
  if fresh and method == "prompt" and model_cfg.peft.prompt_init != "random" and ("prompt",) not in loaded:
    embed = jax.device_get(loaded[("embed",)])
    prompt = peft_lib.initial_prompt(embed, model_cfg, tokenizer, seed)
    sh = ckpt_lib.flatten_tree(nnx.to_pure_dict(m.state_sh["params"]))[("prompt",)]
    state["params"]["prompt"].value = jax.device_put(prompt, sh)
  return state, frozen


def prepare_workdir(workdir):
  """The workdir as a path (local or gs://), created and, if local, proven writable; else one ConfigError."""
  path = paths.as_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not paths.is_remote(path):
      probe = path / f".write-test-{os.getpid()}"
      probe.write_text("")
      probe.unlink()
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not a writable directory ({errors.os_error(e)})") from None
  return path


def probe(dataset, what):
  """Reads the first batch of `dataset` with an iterator of its own (closed after), so that a missing,
  empty or malformed file fails now; a split with no batch at all is a one-line DataError naming `what`."""
  it = iter(dataset)
  try:
    next(it)
  except StopIteration:
    raise DataError(f"{what} produced no batch") from None
  finally:
    if hasattr(it, "close"):
      it.close()


def evaluate(eval_step, params, frozen, eval_ds, put, max_batches):
  """(mean held-out loss, {metric: mean}) over up to `max_batches` batches (0: the whole split)."""
  loss_sum, weight, sums = 0.0, 0.0, {}
  # Every process must run the step equally often: pad the shorter shards with empty batches.
  for batch in distributed.same_count(itertools.islice(eval_ds, max_batches or None)):
    ls, w, metrics = jax.device_get(eval_step(params, frozen, put(batch)))
    loss_sum, weight = loss_sum + float(ls), weight + float(w)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  if weight == 0:
    raise DataError("the held-out split (config.data.eval_files) produced no tokens")
  return loss_sum / weight, {k: v / weight for k, v in sums.items()}


def run(config, workdir, hooks=None):
  """Trains `config` in `workdir`; returns the last logged metrics.

  Raises LmstackError (one line) for bad input, and Preempted once a SIGTERM's
  step is saved (or, before the first step, when nothing has changed).
  `hooks` (a Hooks) is the test seam.
  """
  hooks = hooks or Hooks()
  with contextlib.ExitStack() as stack:
    preempt = stack.enter_context(_Preemption())  # from the start: a SIGTERM during init or compile counts
    return _run(config, workdir, hooks, preempt, stack)


def _run(config, workdir, hooks, preempt, stack):
  model_cfg = build_lib.model_config(config)
  validate(config, model_cfg, jax.device_count())
  t = config.train
  mesh, rules = build_lib.mesh_for(config)  # the devices' physical order, the batch split checked

  workdir = prepare_workdir(workdir)  # local or gs://, one API (etils.epath)
  if not paths.is_remote(workdir):  # Orbax's own logs (and its threads' tracebacks) go to a file, not the console
    (workdir / "logs").mkdir(exist_ok=True)
    name = "lmstack.log" if jax.process_count() == 1 else f"lmstack-{jax.process_index()}.log"
    stack.enter_context(console.library_logs_to(os.fspath(workdir / "logs" / name)))
  stack.enter_context(sources.invalid_text_allowed(config.data.get("allow_invalid_text", False)))
  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise DataError(f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} pieces but "
                    f"config.model.vocab_size={model_cfg.vocab_size}; its ids would index past the embedding")
  wandb = None
  if t.get("wandb_project", ""):
    wandb = dict(project=t.wandb_project, mode=t.get("wandb_mode", "online"), config=config.to_dict())
  writer = MetricWriter(workdir, t.steps, tensorboard=t.tensorboard, wandb=wandb)
  stack.callback(writer.close)

  # ---- Data: every split the run will read, opened and probed now ----
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  local_batch = t.batch_size // jax.process_count()
  make = functools.partial(datasets.make_dataset, config.data, tokenizer, seq_len=t.seq_len,
                           batch_size=local_batch, seed=config.seed, **shard)
  train_data = make(split="train")
  probe(train_data, "the train split (config.data.train_files)")
  train_iter = iter(train_data)
  eval_data = None
  if t.eval_every:  # re-iterable: each evaluation reads it from the start
    eval_data = make(split="eval")
    probe(eval_data, "the held-out split (config.data.eval_files)")
  # ---- Model, optimizer, loss and steps: born sharded from abstract shapes (lmstack/train/build.py) ----
  b = build_lib.build(config, mesh, rules, wrap_loss=hooks.train_loss)
  m, data_sh, train_step, eval_step = b.model, b.data_sh, b.train_step, b.eval_step
  abs_params, abs_frozen = m.abstract_state["params"], m.abstract_frozen
  state_sh = m.state_sh
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params))
  n_frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(abs_frozen))
  writer.info(f"model: {n_params:,} trainable + {n_frozen:,} frozen parameters; mesh {dict(mesh.shape)}; "
              f"rules {config.mesh.rules}")

  def put(batch):
    return {k: jax.make_array_from_process_local_data(data_sh, np.asarray(v)) for k, v in batch.items()}

  # ---- Init or resume ----
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints,
                               async_save=t.async_checkpoint)
  meta = ckpt_lib.make_meta(config, dataclasses.asdict(model_cfg), tokenizer.to_bytes())
  latest = ckpt.latest_step()
  state, frozen = m.init()
  if config.init_from:
    # A stage starts from another run's parameters with a fresh optimizer
    # (Adam's initial moments do not depend on the parameters). Frozen
    # parameters are not in this run's checkpoints, so they are loaded from
    # `init_from` on every start, resumes included.
    state, frozen = _load_init_from(config.init_from, model_cfg, tokenizer, m, state, frozen, latest is None,
                                    mesh, rules, config.seed)
  elif model_cfg.peft.method != "none":
    writer.info(f"warning: a {model_cfg.peft.method} run without init_from trains adapters on a random base")
  if latest is not None:
    abstract_state = with_shardings(m.abstract_state, state_sh)
    del state  # free the fresh init before the restore allocates
    # The newest intact checkpoint: a truncated or corrupt one is skipped and renamed aside.
    step_ckpt, state, data_state, skipped, verified = ckpt.restore_newest(abstract_state, lambda meta, where: (
        ckpt_lib.check_compatible(meta, dataclasses.asdict(model_cfg), tokenizer.to_bytes(), where)))
    for path, aside, reason in skipped:
      writer.info(f"warning: skipped checkpoint {path}, moved to {aside}: {reason}")
    where = os.path.join(ckpt.directory, str(step_ckpt))
    if not verified and not paths.is_remote(where):
      writer.info(f"warning: checkpoint {where} predates manifests: its files are checked only by restoring it")
    train_iter.set_state(distributed.restore_data_state(data_state))
    writer.info(f"resumed from {where}")
  start = int(state["step"])

  # ---- Preference losses: the reference model's log-probabilities join every batch ----
  put_train = put_eval = put
  if losses.is_preference(config.loss):
    def starting_model():  # (params, frozen) before step 1, loaded again (on a resume too)
      params0, frozen0 = reference.fresh_params(m)
      if config.init_from:
        start0, frozen0 = _load_init_from(config.init_from, model_cfg, tokenizer, m, {"params": params0}, frozen0,
                                          True, mesh, rules, config.seed)
        params0 = start0["params"]
      return params0, frozen0

    put_train, put_eval = reference.make_puts(
        config, m, state["params"], frozen, put, starting_model=starting_model, fresh=latest is None,
        workdir=workdir, tokenizer=tokenizer, batch_size=local_batch, shard=shard, mesh=mesh, rules=rules,
        data_sh=data_sh)

  guard = b.guard
  peak = t.peak_flops if t.peak_flops >= 0 else measure_peak_flops()
  tokens_per_step = b.tokens_per_step()
  flops_per_step = b.flops_per_token() * tokens_per_step
  # Perplexity is exp of a next-token loss; a preference loss (log 2 at the start) has none.
  has_perplexity = not losses.is_preference(config.loss)
  last = {}

  def check_guard(step_no):
    """Stops the run once `max_consecutive_skips` steps in a row were skipped (the state records when)."""
    tripped = int(jax.device_get(state["guard"]["tripped"])) if guard.max_consecutive_skips > 0 else 0
    if tripped:
      ckpt.wait()
      latest = ckpt.latest_step()
      good = f"step {latest} in {ckpt.directory}" if latest is not None else f"none yet in {ckpt.directory}"
      n = guard.max_consecutive_skips
      raise TrainingError(f"stopped at step {step_no}: {n} steps in a row were skipped, up to step {tripped} "
                          f"(non-finite or spiking loss; config.train.max_consecutive_skips={n}); the last good "
                          f"checkpoint is {good}")

  def save(step_no, force=False):
    check_guard(step_no)  # a tripped state is never saved: resuming it would stop at once
    ckpt.save(step_no, state, distributed.data_state_to_save(train_iter.get_state()), meta, force=force)

  def held_out():
    loss, metrics = evaluate(eval_step, state["params"], frozen, eval_data, put_eval, t.eval_batches)
    return {"loss": loss, **({"perplexity": math.exp(min(loss, 50))} if has_perplexity else {}), **metrics}

  def log_eval(step_no):
    scalars = held_out()
    writer.write(step_no, scalars, prefix="eval/")
    writer.info(f"step {step_no:>6d} | eval " + " | ".join(f"{k} {v:.4f}" if k != "perplexity" else f"{k} {v:.2f}"
                                                          for k, v in scalars.items()))

  # ---- The loop ----
  with sharding.use(mesh, rules):
    if distributed.any_process(preempt.requested):  # SIGTERM during init or restore: nothing has changed
      ckpt.close()
      raise Preempted(f"SIGTERM before step {start + 1}; nothing new to save ({_resume_hint(ckpt)})")
    if start >= t.steps:
      writer.info(f"{workdir} is already at step {start} of {t.steps}; nothing to train")
    if start == 0 and t.eval_every and t.get("eval_at_start", False):
      log_eval(0)  # the starting model, e.g. DPO's held-out preference accuracy before training
    tic, tic_step = time.perf_counter(), start
    skipped_before = int(jax.device_get(state["guard"]["total"]))
    profile = Profile(config_checks.profile_range(t.get("profile_steps", "")), os.path.join(workdir, "tb"),
                      writer)
    stack.callback(profile.stop)
    for step_no in range(start, t.steps):
      batch = put_train(hooks.train_batch(step_no + 1, next(train_iter)))
      if step_no == start:
        hooks.first_step(b, state, frozen, batch)
      profile.before(step_no + 1, state)
      state, metrics = train_step(state, frozen, batch)
      done = step_no + 1
      profile.after(done, metrics)
      log_step = done % t.log_every == 0 or done == t.steps or done == start + 1
      if log_step:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - tic
        # The first interval includes compilation: report its speed but not as throughput.
        steps_per_sec = (done - tic_step) / max(elapsed, 1e-9)
        metrics["tokens_per_sec"] = steps_per_sec * tokens_per_step
        if peak > 0:
          metrics["mfu"] = steps_per_sec * flops_per_step / peak
        if not guard.skip_nonfinite and not math.isfinite(metrics["loss"]):  # the update was applied: stop
          ckpt.wait()
          raise FloatingPointError(f"loss is {metrics['loss']} at step {done}; the last good checkpoint "
                                   f"is step {ckpt.latest_step()} in {ckpt.directory}")
        writer.write(done, metrics, prefix="train/")
        writer.progress(done, metrics, steps_per_sec)
        total = int(metrics["skipped_total"])
        if total > skipped_before:
          writer.info(f"warning: {total - skipped_before} step(s) skipped up to step {done} (non-finite or "
                      f"spiking loss; params and optimizer state kept); {total} in all")
        skipped_before = total
        check_guard(done)
        last = metrics
        tic, tic_step = time.perf_counter(), done
      if t.eval_every and done % t.eval_every == 0 and done != t.steps:
        log_eval(done)
        tic, tic_step = time.perf_counter(), done  # keep eval time out of tokens/s
      if done % t.checkpoint_every == 0 or done == t.steps:
        save(done)
      hooks.after_step(done)
      # Every process stops at the same step: with several, deciding it is a host all-gather, so they
      # decide at log and checkpoint steps only (no per-step host sync); alone, at every step.
      decide = jax.process_count() == 1 or log_step or done % t.checkpoint_every == 0
      if decide and distributed.any_process(preempt.requested):
        writer.info(f"SIGTERM: saving step {done} and stopping")
        if done % t.checkpoint_every and done != t.steps:
          save(done, force=True)
        ckpt.close()
        raise Preempted(f"SIGTERM at step {done} of {t.steps}; saved {os.path.join(ckpt.directory, str(done))} "
                        "(re-run the same command to resume)")
    ckpt.close()

    # ---- Final held-out evaluation ----
    if t.eval_every:
      final = held_out()
      loss, metrics = final["loss"], {k: v for k, v in final.items() if k not in ("loss", "perplexity")}
      if t.report_unigram:
        final["unigram_entropy"] = pipeline.unigram_cross_entropy(
            pipeline.split_tokens(config.data, tokenizer, "train"),
            pipeline.split_tokens(config.data, tokenizer, "eval"), tokenizer.vocab_size)
      writer.write(int(state["step"]), final, prefix="eval/")
      msg = f"final held-out loss {loss:.4f}" + (f" nats/token (perplexity {final['perplexity']:.2f})"
                                                 if has_perplexity else "")
      if "unigram_entropy" in final:
        msg += f"; unigram entropy of the corpus {final['unigram_entropy']:.4f} nats/token"
      writer.info(msg + "".join(f"; {k} {v:.4f}" for k, v in metrics.items()))
      last.update({f"eval/{k}": v for k, v in final.items()})
  logging.info("done: %s", workdir)
  return last


class Profile:
  """A jax.profiler trace of steps [first, stop) (train.profile_steps), written where TensorBoard's
  profile plugin looks (`<tb>/plugins/profile/<run>/`), with a Perfetto `.trace.json.gz` beside it."""

  def __init__(self, steps, directory, writer):
    self.steps, self.directory, self.writer, self.on = steps, directory, writer, False

  def before(self, step, state):
    if self.steps and step == self.steps[0]:
      jax.block_until_ready(state)  # the trace starts with the device idle: earlier steps stay out
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.on = True

  def after(self, done, metrics):
    if self.on and done == self.steps[1] - 1:
      jax.block_until_ready(metrics)
      self.stop()
      self.writer.info(f"profile of steps {self.steps[0]}-{done} written to {self.directory}/plugins/profile")

  def stop(self):
    if self.on:
      self.on = False
      jax.profiler.stop_trace()


def _resume_hint(ckpt):
  latest = ckpt.latest_step()
  return (f"the newest checkpoint is {os.path.join(ckpt.directory, str(latest))}" if latest is not None
          else "no checkpoint yet") + "; re-run the same command to resume"
