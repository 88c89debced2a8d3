"""The decoder's shapes and numerics: `ModelConfig`, its one-line checks, and the presets.

lmstack/model/transformer.py builds the model from it; checkpoints, configs and the Hugging Face converter
read and write it as a dict of its fields.
"""

from collections.abc import Mapping
import dataclasses
import math
import numbers

import jax.numpy as jnp

from lmstack.errors import show
from lmstack.model.peft import PeftConfig

# Rematerialisation policies by name (lmstack/model/transformer.py REMAT_POLICIES maps them to JAX's).
REMAT_NAMES = ("none", "full", "dots", "dots_no_batch")

# Matmul input dtypes (`ModelConfig.dtype`); accumulation is float32.
DTYPES = ("bfloat16", "float32", "float16")
ATTENTION_IMPLS = ("auto", "flash", "splash", "materialize", "xla", "cudnn")

_TYPES = {
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
            "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
}


def check_types(cls, values, section):
  """ValueError for the first of `values` (a dict) whose type is not its `cls` field's."""
  for f in dataclasses.fields(cls):
    if f.name in values and f.type in _TYPES:
      ok, expected = _TYPES[f.type]
      if not ok(values[f.name]):
        raise ValueError(f"{section}.{f.name}={show(values[f.name])}; expected {expected}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of the decoder. Presets are in `PRESETS`."""
  vocab_size: int = 8192
  d_model: int = 512
  n_layers: int = 8
  n_heads: int = 8
  n_kv_heads: int = 8
  head_dim: int = 0  # 0: d_model // n_heads
  mlp_dim: int = 1408
  max_seq_len: int = 512
  rope_theta: float = 10000.0
  # RoPE frequency scaling for context extension: "linear" (position
  # interpolation: positions / factor) or "llama3" (Llama 3.1's per-band rule).
  rope_scaling: str = "none"  # none | linear | llama3
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_len: int = 8192  # llama3 only
  sliding_window: int = 0  # 0: full causal attention (Mistral: 4096)
  qkv_bias: bool = False  # Qwen2
  # Training attention (no KV cache): "auto" (flash on CPU and GPU,
  # materialize on TPU), "flash" (online softmax over blocks, recomputed in
  # the backward pass: O(T) memory, lmstack/model/attention.py), "splash"
  # (the Pallas TPU kernel, lmstack/model/splash.py; interpreted off TPU),
  # "materialize" (float32 scores of each query block over its keys, kept for
  # the backward pass: the reference), or jax.nn.dot_product_attention's
  # "xla" or "cudnn".
  attention_impl: str = "auto"
  # Query (and flash: key) block: causal blocks skip the masked upper
  # triangle and keep each block's scores small. 0: one block.
  attention_block: int = 128
  # The output projection and cross-entropy of training run over blocks of
  # this many positions (lmstack/train/losses.py), so the float32 logits of
  # the whole batch never exist at once. 0: one block.
  loss_block: int = 128
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = "bfloat16"  # matmul input dtype; accumulation is float32
  # The residual stream and the layers' matmul outputs (what the backward pass
  # keeps); norms, RoPE, softmax and the loss compute in float32 inside.
  activation_dtype: str = "float32"
  remat: str = "none"  # none | full | dots | dots_no_batch
  scan_layers: bool = True
  init_std: float = 0.02
  # A parameter-efficient fine-tuning method and its parameters
  # (lmstack/model/peft.py); "none" is the plain model.
  peft: PeftConfig = PeftConfig()

  def __post_init__(self):
    # One-line ValueErrors naming the field (a config, a checkpoint's meta or
    # an imported config.json can hold anything), before any shape is built.
    check_types(ModelConfig, self.__dict__, "model")
    if not isinstance(self.peft, PeftConfig):  # a dict from JSON or a config section
      if not isinstance(self.peft, Mapping):
        raise ValueError(f"model.peft={show(self.peft)}; expected a PeftConfig or a dict of its fields")
      check_types(PeftConfig, self.peft, "peft")
      object.__setattr__(self, "peft", PeftConfig(**dict(self.peft)))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_seq_len",
                 "rope_original_max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)}; expected an integer >= 1")
    for name in ("head_dim", "sliding_window", "attention_block", "loss_block"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)}; expected an integer >= 0")
    for name in ("rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "norm_eps", "init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"model.{name}={getattr(self, name)}; expected a number > 0")
    if self.head_dim == 0:
      if self.d_model % self.n_heads:
        raise ValueError(f"model.d_model={self.d_model} is not a multiple of model.n_heads={self.n_heads}; "
                         "set model.head_dim")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")
    for name in ("dtype", "activation_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; expected one of {', '.join(DTYPES)}")
    if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                       f"model.rope_low_freq_factor={self.rope_low_freq_factor}")
    if self.rope_scaling not in ("none", "linear", "llama3"):
      raise ValueError(f"model.rope_scaling={self.rope_scaling!r}; expected none, linear or llama3")
    if self.attention_impl == "lmstack":  # the default's name in checkpoints before flash attention
      object.__setattr__(self, "attention_impl", "auto")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; expected one of {', '.join(ATTENTION_IMPLS)}")
    if self.attention_impl in ("xla", "cudnn", "splash") and self.peft.method in ("prefix", "prompt"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r} has no keys shared by every query; "
                       f"peft.method={self.peft.method!r} needs flash or materialize (or auto)")
    if self.remat not in REMAT_NAMES:
      raise ValueError(f"model.remat={self.remat!r}; expected one of "
                       f"{sorted(REMAT_NAMES)}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def act_dtype(self):
    return jnp.dtype(self.activation_dtype)

  def num_params(self, embeddings=True):
    d, f, h = self.d_model, self.mlp_dim, self.head_dim
    attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.n_heads + 2 * self.n_kv_heads)
    block = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * block + d + (emb if embeddings else 0)

  def flops_per_token(self, seq_len):
    """Training FLOPs per token, forward plus backward (3x the forward).

    6 per matmul weight (the output projection counts even when tied; the
    input embedding is a gather and does not) plus the two attention matmuls
    QK^T and PV, 6 * 2 * L * T * N * H, counted over the full T x T score
    matrix without halving for the causal mask (as nanoGPT and MaxText do).
    """
    matmul_params = self.num_params(embeddings=False) + self.vocab_size * self.d_model
    attn = 12 * self.n_layers * seq_len * self.n_heads * self.head_dim
    return 6 * matmul_params + attn


PRESETS = {
    # Unit tests: compiles in seconds.
    "tiny": ModelConfig(vocab_size=8192, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, mlp_dim=192, max_seq_len=128),
    # The CPU default (17M params): trains on the embedded corpus in minutes.
    # The CPU presets unroll their few layers: on this 2-core CPU the scanned
    # backward pass costs ~1.4x the unrolled one (tools/bench.py), and the
    # compile time of 6-8 layers is small either way.
    "default": ModelConfig(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6,
                           mlp_dim=1024, max_seq_len=512, scan_layers=False),
    # The 34M reference shapes of the CPU benchmark.
    "34m": ModelConfig(scan_layers=False),
    "100m": ModelConfig(vocab_size=8192, d_model=768, n_layers=12, n_heads=12,
                        n_kv_heads=12, mlp_dim=2048, max_seq_len=1024),
    # TinyLlama-1.1B shapes.
    "1b": ModelConfig(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32,
                      n_kv_heads=4, mlp_dim=5632, max_seq_len=2048),
    # Llama-2 7B and 70B shapes.
    "7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                      n_kv_heads=32, mlp_dim=11008, max_seq_len=4096),
    "70b": ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64,
                       n_kv_heads=8, mlp_dim=28672, max_seq_len=4096),
}
