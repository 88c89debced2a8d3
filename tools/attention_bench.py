"""One attention layer's forward and backward, per kernel: time, throughput and compiled memory.

  python tools/attention_bench.py                                  # 34m shapes: 8 x 512, 8 heads of 64
  python tools/attention_bench.py --batch=4 --seq=4096 --heads=32 --kv_heads=8 --head_dim=128 \\
      --impls=flash,cudnn,materialize                              # on a GPU

Each kernel of lmstack/model/attention.py (`flash`, `materialize`, `xla`, `cudnn`; `splash` runs in Pallas
interpret mode off TPU) takes the same pre-scaled queries, keys and values (causal, one document a row) and
the gradient of sum(out^2) with respect to all three. Printed per kernel: the median of --steps timed calls
after one warm-up, the throughput of the causal half of the attention FLOPs (2 matmuls forward, 4 backward:
6 x 2 x B x T^2/2 x N x H), the largest difference from `materialize` in the output, and the compiled
program's temporaries (XLA's buffer assignment). A kernel that fails (cuDNN off NVIDIA GPUs) says why.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lmstack/

_BATCH = flags.DEFINE_integer("batch", 8, "Rows.")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens a row.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", 128, "Query (and flash: key) block.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Matmul input dtype.")
_IMPLS = flags.DEFINE_list("impls", ["flash", "materialize"], "Kernels: flash, materialize, xla, cudnn, splash.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from lmstack.model import attention

  b, t, n, kh, h = _BATCH.value, _SEQ.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  dt = jnp.dtype(_DTYPE.value)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, t, kh, n // kh, h)) / np.sqrt(h), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32) for _ in range(2))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  mask = attention.Mask(pos, pos, seg, seg)
  mm = lambda eq, x, y: jnp.einsum(eq, x.astype(dt), y.astype(dt), preferred_element_type=jnp.float32)

  def kernel(impl):
    if impl == "flash":
      return lambda q, k, v: attention.flash(q, k, v, mask, dt, _BLOCK.value)
    if impl == "materialize":
      return lambda q, k, v: attention.materialize_blocked(q, k, v, mask.dense(), mm, _BLOCK.value)
    if impl == "splash":
      from lmstack.model import splash
      return lambda q, k, v: splash.splash(q, k, v, mask, dt)
    return lambda q, k, v: attention.fused(impl, q, k, v, mask, dt)

  flops = 6 * 2 * b * t * t / 2 * n * h
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}); B={b} T={t} heads={n} kv_heads={kh} "
        f"head_dim={h} {dt.name}, block {_BLOCK.value}")
  print(f"{'kernel':12s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'max |out - materialize|':>24s} {'temp MiB':>9s}")
  reference = jax.jit(kernel("materialize"))(q, k, v)
  for impl in _IMPLS.value:
    fn = kernel(impl)
    step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
    try:
      compiled = step.lower(q, k, v).compile()
      jax.block_until_ready(compiled(q, k, v))
    except Exception as e:  # noqa: BLE001 -- a kernel this backend lacks is reported, not fatal
      print(f"{impl:12s} failed: {' '.join(str(e).split())[:160]}")
      continue
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v))
      times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    diff = float(jnp.abs(jax.jit(fn)(q, k, v) - reference).max())
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"{impl:12s} {med * 1e3:11.2f} {flops / med / 1e12:8.2f} {diff:24.2e} {temp:9.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
