"""Train-step throughput and MFU for model presets, on whatever devices JAX sees.

  python tools/bench.py                       # default and 100m presets
  python tools/bench.py --presets=default --batch_size=8 --seq_len=512 --steps=10
  python tools/bench.py --mode=decode         # KV-cache decoding vs recomputing the prefix
  python tools/bench.py --presets=100m --peft=none,lora,qlora   # full fine-tuning vs LoRA vs QLoRA
  python tools/bench.py --mode=dpo --presets=100m --peft=none,lora --dpo_reference=copy,adapters_off

The MFU denominator is this machine's matmul peak measured in the same run
(bf16 inputs, float32 accumulation, a 2048^3 matmul per device), so ratios are
comparable across machines. Model FLOPs per token follow
`ModelConfig.flops_per_token`: 6 x matmul weights + 12 x L x T x N x H for
attention (forward + backward, no causal halving). With a frozen base
(`--peft`), its weights get no gradient: 4 x base matmul weights + 6 x
trainable parameters + attention.

With several `--peft` methods each is measured in its own process, so that
the peak host memory (ru_maxrss) belongs to that method alone; the optimizer
state is the bytes of the Adam moments, the frozen state the bytes of the
parameters that do not train (quantized under qlora).
"""

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

_PRESETS = flags.DEFINE_list("presets", ["default", "100m"], "Model presets to measure.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size (sequences).")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 8, "Measured steps (after 2 warm-up steps).")
_REMAT = flags.DEFINE_string("remat", "none", "Rematerialisation policy.")
_SCAN = flags.DEFINE_enum("scan_layers", "preset", ["preset", "true", "false"], "Scan the layers or unroll them.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Matmul input dtype.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "decode", "dpo"], "What to measure.")
_DPO_REF = flags.DEFINE_list("dpo_reference", ["copy", "adapters_off"],
                             "dpo: reference modes (copy, adapters_off, precomputed), each with each --peft "
                             "method it fits, in its own process.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "decode: tokens generated per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "decode: prompt length.")
_PEFT = flags.DEFINE_list("peft", ["none"], "Methods to train: none (all parameters), lora, qlora, ...")
_RANK = flags.DEFINE_integer("lora_rank", 16, "LoRA rank for --peft=lora/qlora (all linear layers).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line per result (used for the per-method processes).")
_COMPARE_HF = flags.DEFINE_multi_enum("compare_hf", [], ["f32", "bf16_compile"],
                                      "Also train transformers' LlamaForCausalLM (torch AdamW) on the same shapes: "
                                      "f32 eager, and/or bf16 autocast with torch.compile.")


def bench_hf(name, batch_size, seq_len, steps, variant):
  """The same shapes trained with transformers + torch (test extra), tokens/s."""
  import statistics as stats

  import torch
  import transformers

  from lmstack.model.transformer import PRESETS
  cfg = PRESETS[name]
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=max(seq_len, cfg.max_seq_len), rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
  model = transformers.LlamaForCausalLM(hf_cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

  if variant == "bf16_compile":
    compiled = torch.compile(loss_fn)

    def step():
      with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(inputs, labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
  else:
    def step():
      loss = loss_fn(inputs, labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)

  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return batch_size * seq_len / stats.median(times), stats.median(times)


def bench_decode(name, batch_size, prompt_len, new_tokens, dtype):
  """Greedy decoding tokens/s with the KV cache and by recomputing the prefix."""
  import jax
  import numpy as np
  from flax import nnx

  from lmstack.model.generate import generate, generate_without_cache
  from lmstack.model.transformer import PRESETS, Transformer

  cfg = dataclasses.replace(PRESETS[name], dtype=dtype)
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


def bench_preset(name, batch_size, seq_len, steps, remat, dtype, peak, scan="preset", method="none", rank=16):
  import jax
  import ml_collections
  import numpy as np

  from lmstack import sharding
  from lmstack.model import peft
  from lmstack.model.transformer import PRESETS
  from lmstack.train import losses, optim
  from lmstack.train.state import init_sharded, jit_train_step

  cfg = dataclasses.replace(PRESETS[name], remat=remat, dtype=dtype, max_seq_len=max(seq_len, PRESETS[name].max_seq_len))
  if scan != "preset":
    cfg = dataclasses.replace(cfg, scan_layers=scan == "true")
  cfg = dataclasses.replace(cfg, peft=peft.PeftConfig(method=method, rank=rank))
  mesh = sharding.make_mesh((1, -1, 1))
  rules = sharding.resolve_rules("fsdp")
  ocfg = ml_collections.ConfigDict(dict(lr=1e-4, schedule="constant", warmup_steps=1, min_lr_ratio=0.0,
                                        decay_fraction=0.2, decay_shape="linear", b1=0.9, b2=0.95, eps=1e-8,
                                        weight_decay=0.1, grad_clip=1.0))
  tx, schedule = optim.make_optimizer(ocfg, 1000)
  m = init_sharded(cfg, peft.trainable_pattern(method), tx, mesh, rules, seed=0)
  data_sh = sharding.batch_sharding(mesh, rules)
  step = jit_train_step(m, losses.next_token_loss, tx, schedule, 1, data_sh)
  state, frozen = m.init()
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((batch_size, seq_len), np.int32),
           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}
  batch = {k: jax.device_put(v, data_sh) for k, v in batch.items()}
  with sharding.use(mesh, rules):
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
      state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, frozen, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  tokens = batch_size * seq_len
  fpt = cfg.flops_per_token(seq_len)
  trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
  if method != "none":  # frozen base weights: forward and input gradients only
    fpt += -2 * (cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model) + 6 * trainable
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  return dict(preset=name, method=method, params=cfg.num_params(), trainable=trainable, batch=batch_size,
              seq=seq_len, compile_s=compile_s, step_median_s=med, step_min_s=min(times), step_max_s=max(times),
              tokens_per_s=tokens / med, flops_per_token=fpt, mfu=tokens / med * fpt / peak,
              loss=float(metrics["loss"]), opt_state_bytes=nbytes(state["opt_state"]),
              frozen_bytes=nbytes(frozen), param_bytes=nbytes(state["params"]),
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _in_subprocess(name, method):
  """bench_preset in a fresh process (its own peak memory); the result dict."""
  args = [a for a in sys.argv[1:] if not a.startswith(("--peft", "--presets", "--json", "--compare_hf"))]
  cmd = [sys.executable, __file__, *args, f"--presets={name}", f"--peft={method}", "--json"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  rows = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if out.returncode or not rows:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return rows[0]


def bench_dpo(name, batch_size, seq_len, steps, remat, dtype, scan="preset", method="none", rank=16,
              reference_mode="copy"):
  """One DPO step (the reference forward, then the policy's forward + backward) on
  `batch_size` pairs = 2 x batch_size rows; tokens/s counts both rows."""
  import functools

  import jax
  import ml_collections
  import numpy as np

  from lmstack import sharding
  from lmstack.model import peft
  from lmstack.model.transformer import PRESETS
  from lmstack.train import losses, optim, reference
  from lmstack.train.state import init_sharded, jit_train_step

  cfg = dataclasses.replace(PRESETS[name], remat=remat, dtype=dtype, max_seq_len=max(seq_len, PRESETS[name].max_seq_len))
  if scan != "preset":
    cfg = dataclasses.replace(cfg, scan_layers=scan == "true")
  cfg = dataclasses.replace(cfg, peft=peft.PeftConfig(method=method, rank=rank))
  mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.resolve_rules("fsdp")
  ocfg = ml_collections.ConfigDict(dict(lr=1e-5, schedule="constant", warmup_steps=1, min_lr_ratio=0.0,
                                        decay_fraction=0.2, decay_shape="linear", b1=0.9, b2=0.95, eps=1e-8,
                                        weight_decay=0.0, grad_clip=1.0))
  tx, schedule = optim.make_optimizer(ocfg, 1000)
  m = init_sharded(cfg, peft.trainable_pattern(method), tx, mesh, rules, seed=0)
  data_sh = sharding.batch_sharding(mesh, rules)
  step = jit_train_step(m, functools.partial(losses.dpo_loss, beta=0.1), tx, schedule, 1, data_sh)
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


def main_dpo():
  """--mode=dpo: one process per (preset, method, reference), a table."""
  import jax
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; DPO step = reference forward + policy "
        f"forward/backward on {_BATCH.value} pairs ({2 * _BATCH.value} rows) x {_SEQ.value} tokens")
  print(f"{'preset':>8} {'method':>6} {'reference':>12} {'compile_s':>9} {'step_s med/min/max':>20} {'tokens/s':>9} "
        f"{'policy MB':>9} {'opt MB':>8} {'ref MB':>8} {'peak dev MB':>11} {'peak RSS MB':>11}")
  for name in _PRESETS.value:
    for method in _PEFT.value:
      for mode in _DPO_REF.value:
        if mode == "adapters_off" and method not in ("lora", "qlora", "adapter", "llama_adapter"):
          continue
        if _JSON.value:
          r = bench_dpo(name, _BATCH.value, _SEQ.value, _STEPS.value, _REMAT.value, _DTYPE.value, _SCAN.value,
                        method, _RANK.value, mode)
          print("RESULT " + json.dumps(r), flush=True)
          continue
        args = [a for a in sys.argv[1:] if not a.startswith(("--peft", "--presets", "--json", "--dpo_reference"))]
        cmd = [sys.executable, __file__, *args, f"--presets={name}", f"--peft={method}", f"--dpo_reference={mode}",
               "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        rows = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not rows:
          raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        r, mb = rows[0], 2**20
        times = f"{r['step_median_s']:.3f}/{r['step_min_s']:.3f}/{r['step_max_s']:.3f}"
        print(f"{name:>8} {method:>6} {mode:>12} {r['compile_s']:>9.1f} {times:>20} {r['tokens_per_s']:>9,.0f} "
              f"{r['policy_bytes'] / mb:>9.1f} {r['opt_state_bytes'] / mb:>8.1f} {r['reference_bytes'] / mb:>8.1f} "
              f"{r['peak_device_bytes'] / mb:>11.0f} {r['peak_rss_bytes'] / mb:>11.0f}", flush=True)


def main(argv):
  del argv
  import jax
  if _MODE.value == "dpo":
    main_dpo()
    return
  if _MODE.value == "decode":
    print(f"greedy decoding, batch {_BATCH.value}, prompt {_PROMPT_LEN.value}, {_NEW_TOKENS.value} new tokens, "
          f"dtype {_DTYPE.value}")
    print(f"{'preset':>8} {'kv-cache tok/s':>15} {'recompute tok/s':>16} {'speed-up':>9}")
    for name in _PRESETS.value:
      r = bench_decode(name, _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value, _DTYPE.value)
      print(f"{name:>8} {r['kv_cache']:>15,.1f} {r['recompute']:>16,.1f} {r['kv_cache'] / r['recompute']:>8.1f}x",
            flush=True)
    return
  import jax.numpy as jnp
  from lmstack.metrics import measure_peak_flops
  peak = measure_peak_flops(dtype=jnp.bfloat16)
  peak32 = measure_peak_flops(dtype=jnp.float32)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"matmul peak: {peak / 1e9:,.1f} GFLOP/s bf16-in/f32-acc, {peak32 / 1e9:,.1f} GFLOP/s f32")
  header = (f"{'preset':>8} {'method':>6} {'params':>12} {'trainable':>11} {'batch':>5} {'seq':>5} {'compile_s':>9} "
            f"{'step_s med/min/max':>20} {'tokens/s':>10} {'GFLOP/tok':>9} {'MFU':>6} {'opt MB':>8} {'frozen MB':>9} "
            f"{'peak RSS MB':>11}")
  if not _JSON.value:
    print(header)
  for name in _PRESETS.value:
    full_opt = None
    for method in _PEFT.value:
      if len(_PEFT.value) > 1:
        r = _in_subprocess(name, method)
      else:
        r = bench_preset(name, _BATCH.value, _SEQ.value, _STEPS.value, _REMAT.value, _DTYPE.value, peak,
                         _SCAN.value, method, _RANK.value)
      if _JSON.value:
        print("RESULT " + json.dumps(r), flush=True)
        continue
      times = f"{r['step_median_s']:.3f}/{r['step_min_s']:.3f}/{r['step_max_s']:.3f}"
      print(f"{r['preset']:>8} {r['method']:>6} {r['params']:>12,} {r['trainable']:>11,} {r['batch']:>5} {r['seq']:>5} "
            f"{r['compile_s']:>9.1f} {times:>20} {r['tokens_per_s']:>10,.0f} {r['flops_per_token'] / 1e9:>9.3f} "
            f"{r['mfu']:>6.1%} {r['opt_state_bytes'] / 2**20:>8.1f} {r['frozen_bytes'] / 2**20:>9.1f} "
            f"{r['peak_rss_bytes'] / 2**20:>11.0f}", flush=True)
      if method == "none":
        full_opt = r["opt_state_bytes"]
      elif full_opt:
        print(f"{'':>8} {method} optimizer state = {r['opt_state_bytes'] / full_opt:.2%} of full fine-tuning's")
    for variant in _COMPARE_HF.value:
      hf_tps, hf_step = bench_hf(name, _BATCH.value, _SEQ.value, _STEPS.value, variant)
      print(f"{'':>8} transformers+torch {variant}: step {hf_step:.3f} s, {hf_tps:,.0f} tokens/s; "
            f"lmstack / torch = {r['tokens_per_s'] / hf_tps:.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
