"""The project's benchmark: train-step throughput, MFU and memory, decoding speed.

  python tools/bench.py                                   # default and 100m presets, pre-training
  python tools/bench.py --presets=34m --compare-hf=f32,bf16_compile
  python tools/bench.py --presets=100m --mode=pretrain,lora,qlora   # full vs LoRA vs QLoRA
  python tools/bench.py --presets=34m --mode=sft --data=corpus      # SFT batches from the real pipeline
  python tools/bench.py --mode=dpo --presets=100m --peft=none,lora --dpo_reference=copy,adapters_off
  python tools/bench.py --mode=decode                     # KV-cache decoding vs recomputing the prefix
  python tools/bench.py --presets=34m --mode=checkpoint   # how long saving the state holds up the loop
  python tools/bench.py --config=configs/pretrain.py:size=34m --model=remat=full,loss_block=0

Modes: pretrain (next-token loss on every token), sft (a loss mask over the
last three quarters of each row), lora and qlora (sft with the frozen base,
rank --lora_rank on all linear layers), dpo, decode and checkpoint (the full
state saved synchronously and async: the time `save()` takes from the loop). `--presets` or
`--config` (a stage config; its model and train.batch_size/seq_len unless the
flags say otherwise) pick the model; `--model=key=value,...` overrides fields
of it. Each (model, mode) runs in its own process, so the peak host memory
(ru_maxrss) is that run's alone.

Printed per run: compile time; step time (median, min, max over --steps
measured steps after 2 warm-up steps); the time a step waited for its batch
(`--data=corpus`: the Grain pipeline over the embedded corpus, fetched while
the previous step runs, as in training; synthetic batches wait ~0); tokens/s;
model FLOPs per token; MFU against this machine's matmul peak measured in the
same run, for bf16 inputs with float32 accumulation and for float32; the
Adam state; the peak host memory above the process's baseline, per parameter
and against the ideal (below).

FLOPs per token (`ModelConfig.flops_per_token`): 6 x matmul weights
(including the output projection) + 12 x layers x seq_len x heads x head_dim
(QK^T and PV, forward and backward, over the full T x T matrix: no causal
halving). With a frozen base (lora, qlora): 4 x base matmul weights + 6 x
trainable parameters + attention.

Ideal memory of a step: float32 parameters (4 B each, quantized under qlora)
+ gradients and two Adam moments (12 B per trainable parameter) + the
activations kept for the backward pass at the run's remat policy
(`activation_bytes`).

`--compare-hf` trains transformers' LlamaForCausalLM with torch AdamW on the
same shapes, batch and sequence length in the same run (f32 eager and/or bf16
autocast with torch.compile); lora and dpo modes compare against the same
method written on torch (LoRA on every nn.Linear, DPO with a frozen copy).
"""

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lmstack/, configs/

from absl import app, flags  # noqa: E402

_PRESETS = flags.DEFINE_list("presets", ["default", "100m"], "Model presets to measure.")
_CONFIG = flags.DEFINE_string("config", "", "A stage config (path[:args]) whose model and shapes to measure, "
                              "instead of --presets.")
_MODEL = flags.DEFINE_list("model", [], "Overrides of ModelConfig fields, key=value.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch size (sequences; pairs for dpo). Default 8, "
                              "or the config's.")
_SEQ = flags.DEFINE_integer("seq_len", None, "Sequence length. Default 512, or the config's.")
_STEPS = flags.DEFINE_integer("steps", 8, "Measured steps (after 2 warm-up steps).")
_REMAT = flags.DEFINE_string("remat", None, "Rematerialisation policy (default: the model's).")
_SCAN = flags.DEFINE_enum("scan_layers", "preset", ["preset", "true", "false"], "Scan the layers or unroll them.")
_DTYPE = flags.DEFINE_string("dtype", None, "Matmul input dtype (default: the model's, bfloat16).")
_MODE = flags.DEFINE_list("mode", ["pretrain"], "What to measure: pretrain, sft, lora, qlora, dpo, decode, checkpoint.")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "corpus"],
                          "pretrain/sft batches: random tokens, or the real Grain pipeline over the embedded "
                          "corpus (pretrain) or WordNet SFT examples (sft, lora, qlora).")
_DPO_REF = flags.DEFINE_list("dpo_reference", ["copy", "adapters_off"],
                             "dpo: reference modes (copy, adapters_off, precomputed), each with each --peft "
                             "method it fits, in its own process.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "decode: tokens generated per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "decode: prompt length.")
_PEFT = flags.DEFINE_list("peft", ["none"], "dpo: methods to train (none: all parameters, lora, qlora, ...).")
_RANK = flags.DEFINE_integer("lora_rank", 16, "LoRA rank for lora/qlora (all linear layers).")
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Split each step's batch into this many micro-batches, run one after "
                               "another (config.train.grad_accum_steps): the same update, less activation memory.")
_DONATE = flags.DEFINE_bool("donate", True, "Donate the train state's buffers to the step (false: measure the cost).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line per result (the per-run processes).")
_PEAK = flags.DEFINE_list("peaks", [], "bf16,f32 matmul peaks in FLOP/s (given to the per-run processes).")
_COMPARE_HF = flags.DEFINE_list("compare_hf", [], "Also train the same shapes with transformers+torch: f32 "
                                "(eager) and/or bf16_compile (bf16 autocast, torch.compile).")

def model_config(name):
  """The ModelConfig of a preset (or of --config), with --model/--remat/--dtype/--scan_layers applied."""
  from lmstack.model.transformer import PRESETS, ModelConfig
  if _CONFIG.value:
    from lmstack.train import build
    cfg = build.model_config(_stage_config())
  else:
    cfg = PRESETS[name]
  fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
  over = {}
  for item in _MODEL.value:
    key, _, value = item.partition("=")
    if key not in fields or key == "peft":
      raise SystemExit(f"error: --model={item}: {key!r} is not a ModelConfig field")
    kind = type(getattr(cfg, key))
    over[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
  for key, flag in (("remat", _REMAT), ("dtype", _DTYPE)):
    if flag.value:
      over[key] = flag.value
  if _SCAN.value != "preset":
    over["scan_layers"] = _SCAN.value == "true"
  return dataclasses.replace(cfg, **over)


def _stage_config():
  """get_config(arg) of --config=path[:arg]."""
  import importlib.util
  path, _, arg = _CONFIG.value.partition(":")
  spec = importlib.util.spec_from_file_location("bench_stage_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def shapes():
  """(batch, seq_len): the flags, else the config's, else 8 x 512."""
  batch, seq = 8, 512
  if _CONFIG.value:
    t = _stage_config().train
    batch, seq = t.batch_size, t.seq_len
  return _BATCH.value or batch, _SEQ.value or seq


def activation_bytes(cfg, batch, seq):
  """Bytes of the activations a step keeps for its backward pass (this model, float32 residuals).

  Per token and layer, remat none: the two norm inputs and their outputs
  (4 D), q, k, v after rotation and the attention output (2 N H + 2 K H),
  the attention probabilities over the causal half of the keys (N (T + block)
  / 2; flash attention keeps one log-sum-exp per head instead, N), the gate
  and up projections and their product (3 F); remat full keeps only each
  layer's input (D) and recomputes one layer at a time. The output
  projection's cross-entropy is blocked and keeps nothing.
  """
  import jax

  from lmstack.model import attention
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  blk = cfg.attention_block if cfg.attention_block and seq > cfg.attention_block else seq
  flash = attention.resolve(cfg.attention_impl, jax.default_backend()) == "flash"
  per_layer = 4 * d + 2 * n * h + 2 * k * h + (n if flash else n * (seq + blk) / 2) + 3 * f
  tokens = batch * seq
  if cfg.remat == "full":
    return 4 * tokens * (cfg.n_layers * d + per_layer)
  return 4 * tokens * cfg.n_layers * per_layer


def _rss():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss():
  """Restarts the kernel's peak-RSS count (VmHWM), so compilation's memory is not the step's."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _peak_rss_since_reset():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return _rss()


def bench_hf(cfg, batch_size, seq_len, steps, variant, mode="pretrain", rank=16):
  """The same shapes trained with transformers + torch (test extra): (tokens/s, median step s).

  mode lora: every nn.Linear of the decoder and the output projection gets a
  rank-`rank` adapter (x A B, B zero), the base frozen, AdamW over the
  adapters; dpo: pairs [B, 2, T] scored by the policy and a frozen copy of
  the starting model; dpo_lora: both.
  """
  import copy
  import statistics as stats

  import torch
  import transformers

  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=max(seq_len, cfg.max_seq_len), rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
  model = transformers.LlamaForCausalLM(hf_cfg)
  model.train()
  params = list(model.parameters())
  dpo = mode.startswith("dpo")
  reference = copy.deepcopy(model).eval() if dpo else None  # DPO: the starting model, frozen
  if mode in ("lora", "qlora", "dpo_lora"):
    class LoRALinear(torch.nn.Module):
      def __init__(self, base):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(base.in_features, rank) / base.in_features ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features))

      def forward(self, x):
        return self.base(x) + (x @ self.a) @ self.b * (32.0 / rank)

    for p in model.parameters():
      p.requires_grad_(False)
    for parent in list(model.modules()):
      for name, child in list(parent.named_children()):
        if isinstance(child, torch.nn.Linear):
          setattr(parent, name, LoRALinear(child))
    params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  rows = 2 * batch_size if dpo else batch_size
  tokens = torch.randint(0, cfg.vocab_size, (rows, seq_len + 1))
  inputs, labels = tokens[:, :-1], tokens[:, 1:]
  mask = torch.ones(rows, seq_len)
  if mode != "pretrain":
    mask[:, :seq_len // 4] = 0

  def logps(m, x, y):
    logits = m(input_ids=x).logits.float()
    return (torch.gather(torch.log_softmax(logits, -1), 2, y[..., None])[..., 0] * mask).sum(-1)

  def loss_fn(x, y):
    if dpo:
      with torch.no_grad():
        ref = logps(reference, x, y)
      h = (logps(model, x, y) - ref).view(batch_size, 2)
      return -torch.nn.functional.logsigmoid(0.1 * (h[:, 0] - h[:, 1])).mean()
    logits = model(input_ids=x).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum()

  compiled = torch.compile(loss_fn) if variant == "bf16_compile" else loss_fn

  def step():
    if variant == "bf16_compile":
      with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(inputs, labels)
    else:
      loss = compiled(inputs, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return rows * seq_len / stats.median(times), stats.median(times)


def bench_checkpoint(name):
  """Saving the full training state (parameters + Adam moments) of preset `name`, synchronous and async:
  how long `save()` holds up the training loop, and when the write is on disk."""
  import shutil
  import tempfile

  import jax

  from lmstack import checkpoint

  model = _setup(name, "none", 1e-4, 0.1).model  # the sharded model and optimizer
  state, _ = model.init()
  out = {"state_bytes": sum(x.nbytes for x in jax.tree.leaves(state))}
  for async_save in (False, True):
    directory = tempfile.mkdtemp(prefix="lmstack-bench-ckpt-")
    ckpt = checkpoint.Checkpointer(directory, keep=2, async_save=async_save)
    blocked, written = [], []
    for step in range(1, 4):
      t0 = time.perf_counter()
      ckpt.save(step, state, {}, {"model": {}})
      blocked.append(time.perf_counter() - t0)
      ckpt.wait()
      written.append(time.perf_counter() - t0)
    ckpt.close()
    shutil.rmtree(directory)
    out["async" if async_save else "sync"] = (statistics.median(blocked), statistics.median(written))
  return out


def bench_decode(cfg, batch_size, prompt_len, new_tokens):
  """Greedy decoding tokens/s with the KV cache and by recomputing the prefix."""
  import jax
  import numpy as np
  from flax import nnx

  from lmstack.model.generate import generate, generate_without_cache
  from lmstack.model.transformer import Transformer

  model = Transformer(cfg, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompts = [list(map(int, rng.integers(4, cfg.vocab_size, prompt_len))) for _ in range(batch_size)]
  out = {}
  for label, fn in (("kv_cache", generate), ("recompute", generate_without_cache)):
    fn(model, prompts, max_new_tokens=new_tokens)  # compile
    t0 = time.perf_counter()
    tokens = fn(model, prompts, max_new_tokens=new_tokens)
    jax.effects_barrier()
    out[label] = sum(len(t) for t in tokens) / (time.perf_counter() - t0)
  return out


def _batches(cfg, mode, batch_size, seq_len):
  """An endless iterator of host batches: random tokens, or the real pipeline (--data=corpus)."""
  import numpy as np
  if _DATA.value == "corpus":
    from lmstack.data import datasets
    from lmstack.data.tokenizer import load_tokenizer
    from configs import pretrain, sft
    data = (pretrain if mode == "pretrain" else sft).get_config().data
    tokenizer = load_tokenizer(data.tokenizer)
    return iter(datasets.make_dataset(data, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0))
  rng = np.random.default_rng(0)
  tok = rng.integers(4, cfg.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((batch_size, seq_len), np.int32),
           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}
  if mode != "pretrain":  # a prompt quarter, then the response
    batch["loss_mask"] = np.broadcast_to(np.arange(seq_len) >= seq_len // 4, (batch_size, seq_len)).astype(np.int32)

  def forever():
    while True:
      yield batch
  return forever()


def _setup(name, method, lr, weight_decay, loss="next_token"):
  """The build (lmstack/train/build.py Built: model config, mesh, sharded model, train step) of one run:
  preset `name` with PEFT `method` on all local devices (FSDP rules), AdamW at a constant `lr`, `loss` (a
  config.loss name), by the trainer's own path from a stage config."""
  import ml_collections

  from lmstack.train import build

  from configs import dpo, pretrain
  batch_size, seq_len = shapes()
  cfg = model_config(name)
  cfg = dataclasses.replace(cfg, max_seq_len=max(seq_len, cfg.max_seq_len))
  config = dpo.get_config() if loss == "dpo" else pretrain.get_config()
  model = dataclasses.asdict(cfg)
  del model["peft"]
  with config.unlocked():
    config.model = ml_collections.ConfigDict(model)
    config.peft.update(method=method, rank=_RANK.value)
    config.trainable = ".*"  # an adapter method trains its adapters (build.trainable_pattern)
    config.optim.update(lr=lr, schedule="constant", warmup_steps=1, weight_decay=weight_decay, grad_clip=1.0)
    config.train.update(batch_size=batch_size, seq_len=seq_len, grad_accum_steps=_ACCUM.value, steps=1000)
    config.mesh.update(shape=(1, -1, 1), rules="fsdp")
    config.seed = 0
  mesh, rules = build.mesh_for(config)
  return build.build(config, mesh, rules, donate=_DONATE.value)


def bench_train(name, mode, peaks):
  """One (model, mode) run in this process: the result dict."""
  import jax

  from lmstack import sharding

  baseline = _current_rss()
  batch_size, seq_len = shapes()
  method = mode if mode in ("lora", "qlora") else "none"
  b = _setup(name, method, 1e-4, 0.1)
  cfg, mesh, rules, m, data_sh, step = b.model_cfg, b.mesh, b.rules, b.model, b.data_sh, b.train_step
  state, frozen = m.init()
  batches = _batches(cfg, mode, batch_size, seq_len)
  put = lambda b: {k: jax.device_put(v, data_sh) for k, v in b.items()}
  batch = put(next(batches))
  with sharding.use(mesh, rules):
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
      state, metrics = compiled(state, frozen, put(next(batches)))
    jax.block_until_ready(metrics)
    _reset_peak_rss()
    # As the trainer runs: the next batch is fetched while the step runs.
    waits = []
    t_loop = time.perf_counter()
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      batch = put(next(batches))
      waits.append(time.perf_counter() - t0)
      state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    loop_s = time.perf_counter() - t_loop
    times = []  # each step alone, for median/min/max
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      state, metrics = compiled(state, frozen, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  tokens = batch_size * seq_len
  fpt = b.flops_per_token()  # frozen base weights: forward and input gradients only
  trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  param_bytes, frozen_bytes = nbytes(state["params"]), nbytes(frozen)
  ideal = param_bytes + frozen_bytes + 12 * trainable + activation_bytes(cfg, batch_size // _ACCUM.value, seq_len)
  if _ACCUM.value > 1:  # the gradient accumulator beside the micro-batch's gradients
    ideal += 4 * trainable
  peak = _peak_rss_since_reset()
  return dict(preset=name, mode=mode, params=cfg.num_params(), trainable=trainable, batch=batch_size, seq=seq_len,
              remat=cfg.remat, compile_s=compile_s, step_median_s=med, step_min_s=min(times), step_max_s=max(times),
              loop_step_s=loop_s / _STEPS.value, data_wait_s=statistics.median(waits),
              tokens_per_s=tokens / med, flops_per_token=fpt, mfu=tokens / med * fpt / peaks[0],
              mfu_f32=tokens / med * fpt / peaks[1], loss=float(metrics["loss"]),
              opt_state_bytes=nbytes(state["opt_state"]), frozen_bytes=frozen_bytes, param_bytes=param_bytes,
              peak_rss_bytes=peak, baseline_rss_bytes=baseline, step_memory_bytes=peak - baseline,
              ideal_bytes=ideal)


def _in_subprocess(name, mode, peaks, extra=()):
  """A run in a fresh process (its own peak memory); the result dicts it printed."""
  own = {"--presets", "--json", "--compare_hf", "--mode", "--peaks", "--peft", "--dpo_reference"}
  args = [a for a in sys.argv[1:] if a.split("=", 1)[0] not in own]
  cmd = [sys.executable, __file__, *args, f"--presets={name}", f"--mode={mode}", f"--peaks={peaks[0]},{peaks[1]}",
         "--json", *extra]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  rows = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if out.returncode or not rows:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return rows


def bench_dpo(name, method="none", reference_mode="copy"):
  """One DPO step (the reference forward, then the policy's forward + backward) on
  `batch_size` pairs = 2 x batch_size rows; tokens/s counts both rows."""
  import jax
  import numpy as np

  from lmstack import sharding
  from lmstack.train import reference

  batch_size, seq_len = shapes()
  steps = _STEPS.value
  b = _setup(name, method, 1e-5, 0.0, loss="dpo")
  cfg, mesh, rules, m, data_sh, step = b.model_cfg, b.mesh, b.rules, b.model, b.data_sh, b.train_step
  ref_logps = reference.make_ref_logps(m, data_sh)
  state, frozen = m.init()
  if reference_mode == "copy":  # a second copy of every starting parameter
    ref = reference.fresh_params(m)
  elif reference_mode == "adapters_off":  # the policy's base, adapters zero
    ref = (jax.tree.map(jax.numpy.zeros_like, state["params"]), frozen)
  else:
    ref = None
  rng = np.random.default_rng(0)
  tok = rng.integers(4, cfg.vocab_size, (batch_size, 2, seq_len + 1)).astype(np.int32)
  mask = (np.arange(seq_len) >= seq_len // 4).astype(np.int32)  # a quarter prompt, the rest response
  batch = {"inputs": tok[..., :-1], "targets": tok[..., 1:], "segment_ids": np.ones((batch_size, 2, seq_len), np.int32),
           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, 2, seq_len)).copy(),
           "loss_mask": np.broadcast_to(mask, (batch_size, 2, seq_len)).copy(),
           "ref_logps": np.full((batch_size, 2), -5.0 * seq_len, np.float32)}
  batch = {k: jax.device_put(v, data_sh) for k, v in batch.items()}

  def one_step(state):
    b = batch if ref is None else {**batch, "ref_logps": ref_logps(*ref, batch)}
    return step(state, frozen, b)

  with sharding.use(mesh, rules):
    t0 = time.perf_counter()
    state, metrics = one_step(state)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    state, metrics = one_step(state)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = one_step(state)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  stats = jax.devices()[0].memory_stats() or {}
  return dict(preset=name, method=method, reference=reference_mode, pairs=batch_size, seq=seq_len,
              compile_s=compile_s, step_median_s=med, step_min_s=min(times), step_max_s=max(times),
              tokens_per_s=2 * batch_size * seq_len / med, loss=float(metrics["loss"]),
              trainable=sum(x.size for x in jax.tree.leaves(state["params"])),
              policy_bytes=nbytes(state["params"]) + nbytes(frozen), opt_state_bytes=nbytes(state["opt_state"]),
              reference_bytes=0 if ref is None else nbytes(ref[0]) + (nbytes(ref[1]) if ref[1] is not frozen else 0),
              peak_device_bytes=stats.get("peak_bytes_in_use", 0),
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _print_torch(cfg, r, mode):
  """--compare-hf for one run: each torch variant's tokens/s and the ratio."""
  for variant in _COMPARE_HF.value:
    batch, seq = r.get("batch", r.get("pairs")), r["seq"]
    hf_tps, hf_step = bench_hf(cfg, batch, seq, _STEPS.value, variant, mode, _RANK.value)
    print(f"{'':>8} transformers+torch {variant} ({mode}): step {hf_step:.3f} s, {hf_tps:,.0f} tokens/s; "
          f"lmstack / torch = {r['tokens_per_s'] / hf_tps:.2f}x", flush=True)


def main_dpo(peaks):
  """--mode=dpo: one process per (preset, method, reference), a table."""
  batch, seq = shapes()
  print(f"DPO step = reference forward + policy forward/backward on {batch} pairs ({2 * batch} rows) x {seq} tokens")
  print(f"{'preset':>8} {'method':>6} {'reference':>12} {'compile_s':>9} {'step_s med/min/max':>20} {'tokens/s':>9} "
        f"{'policy MB':>9} {'opt MB':>8} {'ref MB':>8} {'peak dev MB':>11} {'peak RSS MB':>11}")
  for name in _PRESETS.value:
    for method in _PEFT.value:
      for ref in _DPO_REF.value:
        if ref == "adapters_off" and method not in ("lora", "qlora", "adapter", "llama_adapter"):
          continue
        if _JSON.value:
          print("RESULT " + json.dumps(bench_dpo(name, method, ref)), flush=True)
          continue
        r = _in_subprocess(name, "dpo", peaks, [f"--peft={method}", f"--dpo_reference={ref}"])[0]
        times = f"{r['step_median_s']:.3f}/{r['step_min_s']:.3f}/{r['step_max_s']:.3f}"
        mb = 2**20
        print(f"{name:>8} {method:>6} {ref:>12} {r['compile_s']:>9.1f} {times:>20} {r['tokens_per_s']:>9,.0f} "
              f"{r['policy_bytes'] / mb:>9.1f} {r['opt_state_bytes'] / mb:>8.1f} {r['reference_bytes'] / mb:>8.1f} "
              f"{r['peak_device_bytes'] / mb:>11.0f} {r['peak_rss_bytes'] / mb:>11.0f}", flush=True)
        if method in ("none", "lora") and ref in ("copy", "adapters_off"):
          _print_torch(model_config(name), r, "dpo" if method == "none" else "dpo_lora")


def main(argv):
  del argv
  import jax
  modes = _MODE.value
  unknown = set(modes) - {"pretrain", "sft", "lora", "qlora", "dpo", "decode", "checkpoint"}
  if unknown:
    raise SystemExit(f"error: --mode={','.join(modes)}: unknown {sorted(unknown)}")
  if modes == ["checkpoint"]:
    print(f"{'preset':>8} {'state MB':>9} {'sync: blocks s':>15} {'async: blocks s':>16} {'async: on disk s':>17}")
    for name in _PRESETS.value:
      r = bench_checkpoint(name)
      print(f"{name:>8} {r['state_bytes'] / 2**20:>9,.0f} {r['sync'][0]:>15.3f} {r['async'][0]:>16.3f} "
            f"{r['async'][1]:>17.3f}", flush=True)
    return
  if modes == ["decode"]:
    batch = _BATCH.value or 4
    print(f"greedy decoding, batch {batch}, prompt {_PROMPT_LEN.value}, {_NEW_TOKENS.value} new tokens")
    print(f"{'preset':>8} {'kv-cache tok/s':>15} {'recompute tok/s':>16} {'speed-up':>9}")
    for name in _PRESETS.value:
      r = bench_decode(model_config(name), batch, _PROMPT_LEN.value, _NEW_TOKENS.value)
      print(f"{name:>8} {r['kv_cache']:>15,.1f} {r['recompute']:>16,.1f} {r['kv_cache'] / r['recompute']:>8.1f}x",
            flush=True)
    return
  if _PEAK.value:
    peaks = [float(x) for x in _PEAK.value]
  else:
    import jax.numpy as jnp
    from lmstack.metrics import measure_peak_flops
    peaks = [measure_peak_flops(dtype=jnp.bfloat16), measure_peak_flops(dtype=jnp.float32)]
  if _JSON.value:  # a per-run process
    if modes == ["dpo"]:
      main_dpo(peaks)
    else:
      print("RESULT " + json.dumps(bench_train(_PRESETS.value[0], modes[0], peaks)), flush=True)
    return
  if shapes()[0] % _ACCUM.value:
    raise SystemExit(f"error: --grad_accum={_ACCUM.value} does not divide the batch of {shapes()[0]}")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  if _ACCUM.value > 1:
    print(f"each step: {_ACCUM.value} micro-batches of {shapes()[0] // _ACCUM.value} rows, one optimizer update")
  print(f"matmul peak: {peaks[0] / 1e9:,.1f} GFLOP/s bf16-in/f32-acc, {peaks[1] / 1e9:,.1f} GFLOP/s f32")
  if "dpo" in modes:
    main_dpo(peaks)
    modes = [m for m in modes if m != "dpo"]
  if not modes:
    return
  print(f"{'preset':>8} {'mode':>8} {'params':>12} {'trainable':>11} {'batch':>5} {'seq':>5} {'compile_s':>9} "
        f"{'step_s med/min/max':>20} {'wait ms':>7} {'tokens/s':>9} {'GFLOP/tok':>9} {'MFU bf16':>8} {'MFU f32':>7} "
        f"{'opt MB':>8} {'step MB':>8} {'B/param':>7} {'/ ideal':>7}")
  for name in _PRESETS.value if not _CONFIG.value else [_CONFIG.value]:
    full_opt = None
    for mode in modes:
      r = _in_subprocess(name, mode, peaks)[0]
      times = f"{r['step_median_s']:.3f}/{r['step_min_s']:.3f}/{r['step_max_s']:.3f}"
      label = name if len(name) <= 8 else name.rsplit("/", 1)[-1][:8]
      print(f"{label:>8} {mode:>8} {r['params']:>12,} {r['trainable']:>11,} {r['batch']:>5} {r['seq']:>5} "
            f"{r['compile_s']:>9.1f} {times:>20} {r['data_wait_s'] * 1e3:>7.1f} {r['tokens_per_s']:>9,.0f} "
            f"{r['flops_per_token'] / 1e9:>9.3f} {r['mfu']:>8.1%} {r['mfu_f32']:>7.1%} "
            f"{r['opt_state_bytes'] / 2**20:>8.1f} {r['step_memory_bytes'] / 2**20:>8.0f} "
            f"{r['step_memory_bytes'] / r['params']:>7.1f} {r['step_memory_bytes'] / r['ideal_bytes']:>7.2f}",
            flush=True)
      if mode == "pretrain":
        full_opt = r["opt_state_bytes"]
      elif full_opt and mode in ("lora", "qlora"):
        print(f"{'':>8} {mode} optimizer state = {r['opt_state_bytes'] / full_opt:.2%} of full training's")
      if mode in ("pretrain", "sft", "lora"):
        _print_torch(model_config(name), r, mode)


if __name__ == "__main__":
  # --compare-hf, as the flag is usually spelled, is absl's --compare_hf.
  sys.argv = [a.replace("--compare-hf", "--compare_hf", 1) for a in sys.argv]
  app.run(main)
