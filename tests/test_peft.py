"""Parameter-efficient methods: their function at init, counts, training, merging."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack import checkpoint as ckpt_lib
from lmstack import sharding
from lmstack.model import peft
from lmstack.model import attention as attention_lib
from lmstack.model.transformer import PRESETS, Transformer
from lmstack.train import losses, optim
from lmstack.train import state as state_lib

BASE = dataclasses.replace(PRESETS["tiny"], dtype="float32")
METHODS = ["lora", "qlora", "prompt", "prefix", "adapter", "llama_adapter"]


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with_base(cfg, base_params, seed=1):
  """A `cfg` model whose base weights are `base_params` (quantized under qlora)."""
  model = Transformer(cfg, nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  src = peft.quantize_base(base_params, cfg) if cfg.peft.method == "qlora" else base_params
  for path, value in ckpt_lib.flatten_tree(src).items():
    ckpt_lib.tree_set(pure, path, value)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def base():
  model = Transformer(BASE, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, BASE.vocab_size, (2, 24)), jnp.int32)
  return model, _params(model), tokens


@pytest.mark.parametrize("method", ["lora", "adapter", "llama_adapter"])
def test_methods_that_start_at_the_base_model(base, method):
  model, params, tokens = base
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method=method, adapter_layers=1))
  np.testing.assert_array_equal(_with_base(cfg, params)(tokens), model(tokens))


def test_lora_on_the_embedding_starts_at_the_base_model(base):
  model, params, tokens = base
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method="lora", embed=True))
  adapted = _with_base(cfg, params)
  assert float(jnp.abs(adapted.embed_lora_b[...]).max()) > 0  # B random, A zero
  np.testing.assert_array_equal(adapted(tokens), model(tokens))


# An independent reference for the quantized base (QLoRA, Dettmers et al. 2023). The NF4 levels as the
# paper publishes them (appendix E; the same constants as bitsandbytes):
NF4_PUBLISHED = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


def test_nf4_levels_are_the_published_normal_quantiles():
  """The table above is the paper's construction: 8 positive and 7 negative quantiles of N(0, 1) between
  p = 0.9677083 and 1/2, an exact zero, divided by the largest."""
  from statistics import NormalDist
  ppf, p = NormalDist().inv_cdf, 0.9677083
  levels = np.sort([ppf(p + (0.5 - p) * i / 8) for i in range(8)] + [0.0]
                   + [-ppf(p + (0.5 - p) * i / 7) for i in range(7)])
  np.testing.assert_allclose(levels / levels.max(), NF4_PUBLISHED, rtol=0, atol=2 ** -22)  # float32-computed
  np.testing.assert_array_equal(peft.NF4_LEVELS, NF4_PUBLISHED)


def _reference_round_trip(w_io, kind, block):
  """NumPy: w [in, out] quantized with one absmax per `block` input rows and output column, and back.

  Returns (back, back with the other of the two nearest codes, ambiguous), back rounded to float32 once
  from the exact value; ambiguous marks the elements whose rounding lmstack may decide the other way: lmstack divides by the
  absmax in float32 (w / absmax off by at most 2**-24 |w / absmax|), and compares with float32 midpoints
  (off by at most 2**-25 for levels in [-1, 1]), so its nearest NF4 level can differ from the exact one
  only where w / absmax lies within 2**-23 of a midpoint. int8 rounds 127 w / absmax after two float32
  roundings (at most 2 * 2**-24 * 127 < 2**-15 off), so only within 2**-15 of a half.
  """
  fan_in, fan_out = w_io.shape
  assert fan_in % block == 0
  x = w_io.astype(np.float64).reshape(fan_in // block, block, fan_out)
  absmax = np.abs(x).max(axis=1, keepdims=True)  # exact: a float32 value
  normed = x / np.where(absmax == 0, 1.0, absmax)
  if kind == "nf4":
    dist = np.abs(normed[..., None] - NF4_PUBLISHED.astype(np.float64))
    order = np.argsort(dist, axis=-1, kind="stable")
    codes, other = order[..., 0], order[..., 1]
    two = np.take_along_axis(dist, order[..., :2], -1)
    ambiguous = two[..., 1] - two[..., 0] < 2 * 2 ** -23  # the gap is twice the distance to the midpoint
    decode = lambda c: (NF4_PUBLISHED[c].astype(np.float64) * absmax).astype(np.float32)  # one rounding
  else:
    q = 127 * normed
    codes = np.rint(q)
    other = np.where(codes > q, codes - 1, codes + 1)
    ambiguous = np.abs(np.abs(q - np.floor(q)) - 0.5) < 2 ** -15
    decode = lambda c: (c / 127 * absmax).astype(np.float32)  # exact, then one float32 rounding
  return tuple(a.reshape(fan_in, fan_out) for a in (decode(codes), decode(other), ambiguous))


def _reference_base(params, cfg):
  """The qlora model's base linears dequantized by `_reference_round_trip`: {linear name: its three
  arrays, each [layers, *shape]}, and the params with the reference's weights."""
  out, ref = jax.tree.map(np.asarray, params), {}
  for name, (shape, _, in_ndim) in peft.linear_specs(cfg).items():
    module, attr = name.split("/")
    w = out["blocks"][module][attr]  # [layers, *shape]
    fan_in = int(np.prod(shape[:in_ndim]))
    layers = [_reference_round_trip(layer.reshape(fan_in, -1), cfg.peft.quant, cfg.peft.quant_block)
              for layer in w]
    ref[name] = [np.stack(a).reshape(w.shape) for a in zip(*layers)]
    out["blocks"][module][attr] = ref[name][0]
  return ref, out


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_equals_a_numpy_reference(base, kind):
  """lmstack's quantize + dequantize of every base linear equals the NumPy reference: the absmax is stored
  in float32, so storing it rounds nothing, and NF4 decodes with one rounding (level * absmax), as the
  reference does, so they are equal bit for bit. int8 decodes as code / 127 * absmax in float32: up to
  three roundings (XLA may multiply by a rounded 1/127) beside the reference's one, 4 * 2**-24 relative."""
  rtol = 0.0 if kind == "nf4" else 4 * 2.0 ** -24
  _, params, _ = base
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method="qlora", quant=kind))
  ref, _ = _reference_base(params, cfg)
  got = peft.dequantized_base(params, cfg)
  n_ambiguous = 0
  for name, (want, other, ambiguous) in ref.items():
    module, attr = name.split("/")
    out = np.asarray(got["blocks"][module][attr])
    np.testing.assert_allclose(out[~ambiguous], want[~ambiguous], rtol=rtol, atol=0)
    near = lambda ref: np.abs(out - ref) <= rtol * np.abs(ref)
    assert np.all(near(want) | near(other)), name  # within rounding of a tie: either neighbour
    assert not np.array_equal(want, np.asarray(params["blocks"][module][attr]))  # it did quantize
    n_ambiguous += int(ambiguous.sum())
  assert n_ambiguous <= 20  # of 115k weights: near-ties are rare, the comparison is not vacuous


def test_qlora_starts_at_the_dequantized_base(base):
  """The qlora model (codes and scales, B = 0) computes the plain model on the reference's weights."""
  _, params, tokens = base
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method="qlora"))
  ref, want = _reference_base(params, cfg)
  assert not any(a.any() for _, _, a in ref.values())  # NF4 has no near-ties for this seed
  plain = Transformer(BASE, nnx.Rngs(0))
  nnx.update(plain, nnx.State(jax.tree.map(jnp.asarray, want)))
  np.testing.assert_array_equal(_with_base(cfg, params)(tokens), plain(tokens))


@pytest.mark.parametrize("kind,bound", [("int8", 0.5 / 127), ("nf4", 0.17)])
def test_quantization_error_is_bounded_by_the_level_spacing(kind, bound):
  w = jax.random.normal(jax.random.key(0), (256, 96))
  codes, absmax = peft.quantize(w, kind, 64)
  back = peft.dequantize(codes, absmax, kind, w.shape)
  rel = np.abs(np.asarray(back - w)) / np.repeat(np.asarray(absmax), 64, axis=0)
  assert rel.max() <= bound + 1e-6
  # NF4's widest gap between levels is 0.3039 (-1 .. -0.696); half of it bounds the error.
  assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
  assert codes.size == w.size // (1 if kind == "int8" else 2)


@pytest.mark.parametrize("method,extra", [(m, {}) for m in METHODS] + [("prefix", {"prefix_hidden": 32}),
                                                                       ("lora", {"targets": "attn/.*"}),
                                                                       ("lora", {"embed": True}),
                                                                       ("llama_adapter", {"adapter_layers": 1})])
def test_trainable_count_is_the_closed_form(method, extra):
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method=method, **extra))
  d, L, f, r, p = BASE.d_model, BASE.n_layers, BASE.mlp_dim, 16, 16
  kvd = BASE.n_kv_heads * BASE.head_dim  # 32
  expected = {
      ("lora", ()): L * r * ((d + d) + 2 * (d + kvd) + (d + d) + 2 * (d + f) + (f + d)) + r * (d + BASE.vocab_size),
      ("qlora", ()): L * r * ((d + d) + 2 * (d + kvd) + (d + d) + 2 * (d + f) + (f + d)) + r * (d + BASE.vocab_size),
      ("lora", ("targets",)): L * r * ((d + d) + 2 * (d + kvd) + (d + d)),
      ("lora", ("embed",)): L * r * ((d + d) + 2 * (d + kvd) + (d + d) + 2 * (d + f) + (f + d))
                            + 2 * r * (d + BASE.vocab_size),
      ("prompt", ()): p * d,
      ("prefix", ()): L * 2 * p * kvd,
      ("prefix", ("prefix_hidden",)): p * d + d * 32 + 32 + 32 * L * 2 * kvd + L * 2 * kvd,
      ("adapter", ()): L * 2 * (d * 64 + 64 + 64 * d + d),
      ("llama_adapter", ()): L * (p * d + BASE.n_heads),
      ("llama_adapter", ("adapter_layers",)): 1 * (p * d + BASE.n_heads),
  }[(method, tuple(extra))]
  regex = re.compile(peft.trainable_pattern(method))
  params = ckpt_lib.flatten_tree(_params(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))))
  counted = sum(int(np.prod(v.shape)) for k, v in params.items() if regex.fullmatch("/".join(k)))
  assert counted == expected == peft.num_trainable(cfg)


def test_prompt_tuning_equals_virtual_tokens_in_the_input(base):
  """Prompt tuning == the base model on [virtual embeddings; tokens]: built
  here as extra rows of the embedding table fed as extra token ids."""
  model, params, tokens = base
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method="prompt", num_virtual_tokens=5))
  tuned = _with_base(cfg, params)
  prompt = np.asarray(tuned.prompt[...])
  wide = dataclasses.replace(BASE, vocab_size=BASE.vocab_size + 5)
  ref = Transformer(wide, nnx.Rngs(0))
  ref_params = jax.tree.map(np.asarray, params)
  ref_params["embed"] = np.concatenate([params["embed"], prompt])
  ref_params["unembed"] = np.concatenate([params["unembed"], np.zeros((BASE.d_model, 5), np.float32)], axis=1)
  nnx.update(ref, nnx.State(ref_params))
  virtual = jnp.broadcast_to(jnp.arange(BASE.vocab_size, BASE.vocab_size + 5), (tokens.shape[0], 5))
  expected = ref(jnp.concatenate([virtual, tokens], axis=1))[:, 5:, :BASE.vocab_size]
  np.testing.assert_allclose(tuned(tokens), expected, atol=2e-5)


@pytest.mark.parametrize("impl", ["materialize", "flash"])
def test_prefix_keys_are_seen_by_every_query(impl):
  """Attention with a prefix == attention over [prefix; keys] with the prefix
  visible to all queries, computed here in numpy."""
  rng = np.random.default_rng(0)
  b, t, k, g, h, p = 2, 6, 2, 2, 4, 3
  q = rng.normal(size=(b, t, k, g, h)).astype(np.float32)
  keys, vals = (rng.normal(size=(b, t, k, h)).astype(np.float32) for _ in range(2))
  pk, pv = (rng.normal(size=(p, k, h)).astype(np.float32) for _ in range(2))
  causal = np.tril(np.ones((t, t), bool))
  pos = np.broadcast_to(np.arange(t), (b, t))
  mask = attention_lib.Mask(pos, pos, np.ones((b, t), np.int32), np.ones((b, t), np.int32))
  mm = lambda eq, x, y: jnp.einsum(eq, x, y, precision="highest")
  if impl == "flash":  # blocks of 2: three query blocks, the prefix merged by log-sum-exp
    out = attention_lib.flash(q, keys, vals, mask, jnp.float32, 2, (pk, pv))
  else:
    out = attention_lib.materialize(q, keys, vals, mask.dense(), mm, (pk, pv))
  all_k = np.concatenate([np.broadcast_to(pk, (b, p, k, h)), keys], 1)
  all_v = np.concatenate([np.broadcast_to(pv, (b, p, k, h)), vals], 1)
  mask = np.concatenate([np.ones((t, p), bool), causal], 1)
  s = np.einsum("btkgh,bskh->bkgts", q, all_k)
  s = np.where(mask, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bkgts,bskh->btkgh", w, all_v), atol=1e-5)


def test_merged_lora_computes_the_unmerged_model(base):
  _, params, tokens = base
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method="lora", rank=4, rslora=True, embed=True))
  model = _with_base(cfg, params)
  pure = _params(model)
  for path, v in ckpt_lib.flatten_tree(pure).items():  # non-zero B (the embedding's A), as after training
    if path[-1].endswith("_lora_b") or path[-1] == "embed_lora_a":
      ckpt_lib.tree_set(pure, path, 0.05 * jax.random.normal(jax.random.key(len(path[-1])), v.shape))
  assert "unembed_lora_b" in pure  # the output projection is adapted too
  nnx.update(model, nnx.State(pure))
  merged, merged_cfg = peft.merge_lora(pure, cfg)
  assert merged_cfg.peft.method == "none" and "q_lora_a" not in merged["blocks"]["attn"]
  assert "embed_lora_a" not in merged
  plain = Transformer(merged_cfg, nnx.Rngs(0))
  nnx.update(plain, nnx.State(merged))
  assert float(jnp.abs(model(tokens) - _with_base(cfg, params)(tokens)).max()) > 1e-3  # B matters
  np.testing.assert_allclose(plain(tokens), model(tokens), atol=1e-4)


def _sft_batch(batch_size=8, seq_len=64):
  from configs import sft
  from lmstack.data import sft as sft_data
  from lmstack.data.tokenizer import load_tokenizer
  config = sft.get_config("runlocal")
  tok = load_tokenizer(config.data.tokenizer)
  return next(iter(sft_data.make_sft_dataset(config.data, tok, seq_len=seq_len, batch_size=batch_size, seed=0)))


def _train(cfg, batch, steps, mesh_shape=(1, 1, 1), lr=1e-2, seed=0):
  """Trains the `cfg` model's trainable parameters on one batch; returns
  (losses, frozen before, frozen after, state)."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = sharding.resolve_rules("fsdp")
  tx, schedule = optim.make_optimizer(dataclasses.replace(_OPTIM, lr=lr), steps)
  m = state_lib.init_sharded(cfg, peft.trainable_pattern(cfg.peft.method), tx, mesh, rules, seed)
  state, frozen = m.init()
  before = jax.tree.map(np.array, nnx.to_pure_dict(frozen))
  data_sh = sharding.batch_sharding(mesh, rules)
  step = state_lib.jit_train_step(m, losses.next_token_loss, tx, schedule, 1, data_sh)
  batch = {k: jax.device_put(np.asarray(v), data_sh) for k, v in batch.items()}
  out = []
  with sharding.use(mesh, rules):
    for _ in range(steps):
      state, metrics = step(state, frozen, batch)
      out.append(float(metrics["loss"]))
  return out, before, jax.tree.map(np.array, nnx.to_pure_dict(frozen)), state


@dataclasses.dataclass
class _Optim:
  lr: float = 1e-2
  schedule: str = "constant"
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0
  decay_fraction: float = 0.2
  decay_shape: str = "linear"
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0


_OPTIM = _Optim()


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_only_the_method_and_lowers_the_loss(method):
  cfg = dataclasses.replace(PRESETS["tiny"], peft=peft.PeftConfig(method=method, dropout=0.1 * (method == "lora")))
  lr = {"prompt": 0.3, "prefix": 0.1, "llama_adapter": 0.1}.get(method, 1e-2)
  losses_, before, after, state = _train(cfg, _sft_batch(), steps=12, lr=lr)
  # A few virtual tokens steer a random tiny base only a little.
  assert losses_[-1] < losses_[0] - (0.02 if method in ("prompt", "prefix", "llama_adapter") else 0.1), losses_
  jax.tree.map(np.testing.assert_array_equal, before, after)  # the base, bitwise
  n_trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
  assert n_trainable == peft.num_trainable(cfg)
  # Adam's two moments cover the trainable parameters and nothing else.
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
  assert moments == 2 * n_trainable


def test_sharded_lora_equals_one_device():
  # float32 (BASE): how LoRA's factors are sharded does not depend on the dtype, and bf16 re-rounds every
  # matmul input, so a float32 ulp of reduction order can become a bf16 ulp (2**-7) and no tight bound holds.
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method="lora"))
  batch = _sft_batch()
  one, *_ = _train(cfg, batch, steps=4)
  eight, *_ = _train(cfg, batch, steps=4, mesh_shape=(1, 8, 1))
  two_by_four, *_ = _train(cfg, batch, steps=4, mesh_shape=(2, 4, 1))
  # Sharding changes only the order of float32 sums (u = 2**-24; two orders of K terms differ by at most
  # 2 K u sum|terms|). A token's loss holds a log-sum-exp over 8192 logits: at most 2 * 8192 u = 2**-10
  # absolute; the mean over the 8 x 64 tokens adds 2 * 512 u relative. Adam (lr 1e-2) keeps an update
  # whose gradient is well above the noise (lr * sign) and may flip only those at noise level, which move
  # the loss by about |g| * lr, i.e. nothing; so the same bound holds after each step, to first order.
  # Measured: 2e-7 relative (2e-6 absolute).
  np.testing.assert_allclose(eight, one, rtol=2 * 512 * 2.0 ** -24, atol=2.0 ** -10)
  np.testing.assert_allclose(two_by_four, one, rtol=2 * 512 * 2.0 ** -24, atol=2.0 ** -10)
  assert one[-1] < one[0] - 0.5  # it trained: the steps after the first are compared too


def test_lora_dropout_is_training_only(base):
  _, params, tokens = base
  cfg = dataclasses.replace(BASE, peft=peft.PeftConfig(method="lora", dropout=0.5))
  model = _with_base(cfg, params)
  pure = _params(model)
  for path, v in ckpt_lib.flatten_tree(pure).items():
    if path[-1].endswith("_lora_b"):
      ckpt_lib.tree_set(pure, path, jnp.full(v.shape, 0.05))
  nnx.update(model, nnx.State(pure))
  a, b = model(tokens, rng=jax.random.key(1)), model(tokens, rng=jax.random.key(2))
  assert float(jnp.abs(a - b).max()) > 1e-4
  np.testing.assert_array_equal(model(tokens), model(tokens))


def test_bad_peft_configs_are_one_line_errors():
  for kwargs, needle in [({"method": "lorax"}, "peft.method"), ({"method": "lora", "rank": 0}, "peft.rank"),
                         ({"method": "qlora", "quant": "fp4"}, "peft.quant"), ({"targets": "("}, "peft.targets"),
                         ({"dropout": 1.0}, "peft.dropout")]:
    with pytest.raises(ValueError, match=needle):
      peft.PeftConfig(**kwargs)
  with pytest.raises(ValueError, match="not lora"):
    peft.merge_lora({}, BASE)
