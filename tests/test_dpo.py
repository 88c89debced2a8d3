"""DPO: the losses against their formulas, the reference modes, preference data, training runs.

  python -m pytest -q tests/test_dpo.py              # ~1.5 min on 2 CPU cores
  python -m pytest -q tests/test_dpo.py -m slow      # + a killed and resumed run
"""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import fault_hooks
from configs import dpo, pretrain
from lmstack import sharding
from lmstack.data import datasets, preference
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import ConfigError, DataError
from lmstack.model.transformer import PRESETS, Transformer
from lmstack.train import build, losses, optim, reference, trainer
from lmstack.train import step as step_lib
from lmstack.train.state import init_sharded, jit_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(pretrain.get_config().data.tokenizer)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def _easy_pairs(tmp_path):
  """A preference any model can learn: "<word> is good." over "<word> is bad."; held-out words differ."""
  words = sorted({p["prompt"][len("Define: "):] for p in preference.wordnet_pairs("eval")[:400]} - {""})
  make = lambda ws: [{"prompt": f"Define: {w}", "chosen": f"{w} is good.", "rejected": f"{w} is bad."} for w in ws]
  return (_write_jsonl(tmp_path / "train.jsonl", make(words[::2])),
          _write_jsonl(tmp_path / "eval.jsonl", make(words[1::2])))


def _config(tmp_path, arg="", **train):
  config = dpo.get_config("runlocal" + (f",{arg}" if arg else ""))
  config.data.format = "jsonl"
  config.data.train_files, config.data.eval_files = _easy_pairs(tmp_path)
  config.train.update(peak_flops=0.0, tensorboard=False, **train)
  return config


# ---------------------------------------------------------------------------
# Losses: each against its formula, from the same log-probabilities.


def _pair_batch(tok, seq_len=32):
  pairs = [{"prompt": "Define: cat", "chosen": "a small feline", "rejected": "a large vehicle with wheels"},
           {"prompt": "Define: run", "chosen": "move fast on foot", "rejected": "sit"}]
  encode = preference.EncodePair(tok, seq_len)
  rows = [encode((i, p)) for i, p in enumerate(pairs)]
  return preference.PadPairs(3)({k: np.stack([r[k] for r in rows]) for k in rows[0]})  # + a padding pair


@pytest.fixture(scope="module")
def tiny(tok):
  """(jitted loss(batch, **options), batch, numpy log-probabilities [B, 2], token counts [B, 2])."""
  cfg = dataclasses.replace(PRESETS["tiny"], dtype="float32")
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  batch = _pair_batch(tok)
  b, r, t = batch["inputs"].shape
  flat = lambda k: batch[k].reshape(b * r, t)
  logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(flat("inputs"), flat("positions"),
                                                               flat("segment_ids")))(params), np.float64)
  logp = logits - logits.max(-1, keepdims=True)  # log-softmax in float64, here
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, flat("targets")[..., None], -1)[..., 0]
  mask = flat("loss_mask") * (flat("segment_ids") > 0)
  logps, counts = (picked * mask).sum(-1).reshape(b, r), mask.sum(-1).reshape(b, r)

  @functools.partial(jax.jit, static_argnames=("variant", "beta", "label_smoothing"))
  def loss(batch, **options):
    return losses.dpo_loss(nnx.merge(graphdef, params), batch, **options)

  seq_logps = jax.jit(lambda batch: losses.sequence_logps(nnx.merge(graphdef, params), batch)[0])
  return loss, seq_logps, batch, logps, counts


def _formula(variant, pc, pr, rc, rr, beta, e):
  h = (pc - rc) - (pr - rr)
  sig = lambda x: 1 / (1 + math.exp(-x))
  if variant == "sigmoid":
    return -(1 - e) * math.log(sig(beta * h)) - e * math.log(sig(-beta * h))
  if variant == "robust":
    return (-(1 - e) * math.log(sig(beta * h)) + e * math.log(sig(-beta * h))) / (1 - 2 * e)
  if variant == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  return max(0.0, 1 - beta * h)  # hinge


@pytest.mark.parametrize("variant,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("robust", 0.3, 0.1),
                                                    ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0)])
def test_each_loss_equals_its_formula(tiny, variant, beta, smoothing):
  loss, _, batch, logps, counts = tiny
  ref = logps[:2] + np.asarray([[3.0, -2.0], [-1.5, 4.0]])  # a reference that disagrees both ways
  batch = {**batch, "ref_logps": np.concatenate([ref, np.zeros((1, 2))]).astype(np.float32)}
  loss_sum, weight, metrics = loss(batch, variant=variant, beta=beta, label_smoothing=smoothing)
  assert float(weight) == 2  # the padding pair is not a pair
  if variant == "ipo":  # length-normalised
    pol, rf = logps[:2] / counts[:2], ref / counts[:2]
  else:
    pol, rf = logps[:2], ref
  want = [_formula(variant, pol[i, 0], pol[i, 1], rf[i, 0], rf[i, 1], beta, smoothing) for i in range(2)]
  np.testing.assert_allclose(float(loss_sum), sum(want), rtol=2e-5, atol=1e-5)
  rewards = beta * (pol - rf)
  np.testing.assert_allclose(float(metrics["rewards/chosen"]), rewards[:, 0].sum(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/rejected"]), rewards[:, 1].sum(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/margins"]), (rewards[:, 0] - rewards[:, 1]).sum(), rtol=1e-4,
                             atol=1e-5)
  assert float(metrics["rewards/accuracies"]) == float((rewards[:, 0] > rewards[:, 1]).sum())
  np.testing.assert_allclose(float(metrics["logps/chosen"]), logps[:2, 0].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["logps/rejected"]), logps[:2, 1].sum(), rtol=1e-5)


def test_policy_equal_to_reference_gives_log_2_and_zero_margins(tiny):
  loss, seq_logps, batch, _, _ = tiny
  batch = {**batch, "ref_logps": seq_logps(batch)}
  for smoothing in (0.0, 0.3):  # conservative DPO is log 2 at h = 0 too
    loss_sum, weight, metrics = loss(batch, variant="sigmoid", beta=0.1, label_smoothing=smoothing)
    np.testing.assert_allclose(float(loss_sum / weight), math.log(2), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0 and float(metrics["rewards/chosen"]) == 0
    assert float(metrics["rewards/accuracies"] / weight) == 0.5  # all ties


# ---------------------------------------------------------------------------
# Preference data


def test_pairs_become_two_rows_scored_on_the_response(tmp_path, tok):
  path = _write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "Define: cat", "chosen": "a small feline", "rejected": "a bus"},
      {"prompt": [{"role": "user", "content": "Define: dog"}], "chosen": "a canine",
       "rejected": [{"role": "assistant", "content": "a cat"}]},
      {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Define: owl"}, {"role": "assistant", "content": "a bird"}],
       "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Define: owl"}, {"role": "assistant", "content": "a fish"}]}])
  config = dpo.get_config("runlocal,data=jsonl")
  config.data.update(train_files=path, eval_files=path)
  batch = next(iter(preference.make_preference_dataset(config.data, tok, seq_len=128, batch_size=4, seed=0,
                                                        split="eval")))
  assert {k: v.shape for k, v in batch.items()} == {**{k: (4, 2, 128) for k in preference.FEATURES}, "index": (4, 2)}
  scored = [[tok.decode(batch["targets"][i, r][batch["loss_mask"][i, r] > 0].tolist()) for r in range(2)]
            for i in range(3)]
  assert scored[0] == ["a small feline", "a bus"]
  assert scored[1][0].startswith("a canine") and scored[1][0].endswith("<|im_end|>")
  assert scored[2][0].startswith("a bird") and "Hello" not in scored[2][0]  # only the last turn is scored
  assert batch["index"][:3].tolist() == [[0, 1], [2, 3], [4, 5]]
  assert not batch["segment_ids"][3].any() and not batch["loss_mask"][3].any()  # padding pair
  for i in range(3):
    for r in range(2):
      n = int(batch["segment_ids"][i, r].sum())
      assert batch["positions"][i, r, :n].tolist() == list(range(n))
      scored_at = np.flatnonzero(batch["loss_mask"][i, r])
      if i == 0:  # plain text: eos ends the row and is scored
        assert scored_at[-1] == n - 1 and batch["targets"][i, r, n - 1] == tok.eos_id
      else:  # a chat: the turn's <|im_end|> is scored last; the template's newline after it ends the row
        assert tok.decode(batch["targets"][i, r, scored_at].tolist()).endswith("<|im_end|>")
        assert scored_at[-1] == n - 2 and tok.decode([int(batch["targets"][i, r, n - 1])]) == "\n"


def test_builtin_pairs_are_real_held_out_and_deterministic():
  train, evals = preference.wordnet_pairs("train"), preference.wordnet_pairs("eval")
  assert len(evals) == 5883 and len(train) == 111776  # SFT's split: every 20th synset held out
  assert not {(p["prompt"], p["chosen"]) for p in evals} & {(p["prompt"], p["chosen"]) for p in train}
  assert all(p["chosen"] != p["rejected"] for p in evals)
  assert preference.wordnet_pairs("eval", 1, "any")[:50] != evals[:50]
  with pytest.raises(ConfigError, match="rejected_pos='noun'"):
    preference.wordnet_pairs("eval", 1, "noun")
  he_train, he_eval = preference.humaneval_pairs("train", 2), preference.humaneval_pairs("eval", 2)
  assert not {p["task_id"] for p in he_train} & {p["task_id"] for p in he_eval} and len(he_eval) >= 40
  for p in he_eval:
    compile(p["prompt"] + p["rejected"], "x", "exec")  # still valid Python, but different
    assert p["rejected"] != p["chosen"]
  preference.humaneval_pairs.cache_clear()
  assert preference.humaneval_pairs("eval", 2) == he_eval


@pytest.mark.parametrize("record,needle", [({"prompt": "x", "chosen": "y"}, "no field 'rejected'"),
                                           ({"prompt": "x", "chosen": "y", "rejected": " "}, "'rejected' is empty"),
                                           ({"chosen": "y", "rejected": "z"}, "no field 'prompt'"),
                                           ({"prompt": "x", "chosen": [{"role": "user", "content": "y"}],
                                             "rejected": "z"}, "ending with an assistant turn")])
def test_bad_records_name_the_line(tmp_path, tok, record, needle):
  path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, record])
  config = dpo.get_config("runlocal,data=jsonl")
  config.data.update(train_files=path, eval_files=path)
  with pytest.raises(DataError, match=f"p.jsonl:2: .*{needle}"):
    preference.make_preference_dataset(config.data, tok, seq_len=32, batch_size=2, seed=0)


def test_pairs_too_long_for_seq_len_are_an_error(tok):
  data = dpo.get_config("runlocal,data=humaneval_pairs").data
  with pytest.raises(DataError, match="no pair of the eval split keeps a response token .* seq_len=16"):
    preference.make_preference_dataset(data, tok, seq_len=16, batch_size=2, seed=0, split="eval")
  n = len(preference.pairs(data, "eval"))
  assert preference.check_pairs(data, tok, 16, "eval") == (n, n, n)  # (pairs, truncated, dropped)


def test_train_split_resumes_exactly(tok):
  data = dpo.get_config("runlocal").data
  it = iter(preference.make_preference_dataset(data, tok, seq_len=32, batch_size=4, seed=3))
  next(it)
  state = it.get_state()
  json.dumps(state)
  want = [next(it) for _ in range(2)]
  again = iter(preference.make_preference_dataset(data, tok, seq_len=32, batch_size=4, seed=3))
  again.set_state(state)
  for w in want:
    jax.tree.map(np.testing.assert_array_equal, next(again), w)


# ---------------------------------------------------------------------------
# Runs


def test_config_errors_are_one_line(tmp_path):
  config = _config(tmp_path, "reference=mirror")
  with pytest.raises(ConfigError, match="config.dpo.reference='mirror'; expected one of copy"):
    trainer.run(config, str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="adapters_off needs adapters .* not peft.method='none'"):
    trainer.run(_config(tmp_path, "reference=adapters_off"), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="adapters_off needs adapters .* not peft.method='prefix'"):
    trainer.run(_config(tmp_path, "method=prefix,reference=adapters_off"), str(tmp_path / "c"))
  config = _config(tmp_path, "variant=kto")
  with pytest.raises(ConfigError, match="config.dpo.variant='kto'"):
    trainer.run(config, str(tmp_path / "d"))
  config = _config(tmp_path)
  config.data.kind = "sft"
  with pytest.raises(ConfigError, match="needs preference pairs: config.data.kind='preference', not 'sft'"):
    trainer.run(config, str(tmp_path / "e"))
  config = _config(tmp_path)
  config.loss = "next_token"
  with pytest.raises(ConfigError, match="kind='preference' gives pairs; config.loss='next_token' is not"):
    trainer.run(config, str(tmp_path / "g"))
  config = _config(tmp_path)
  config.data.format = "wordnet"
  with pytest.raises(ConfigError, match="format='wordnet' for kind=preference"):
    trainer.run(config, str(tmp_path / "f"))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_three_reference_modes_give_the_same_loss_on_a_batch(tmp_path, tok):
  """LoRA policy with trained adapters: a frozen copy, the base with adapters off and stored values agree."""
  config = _config(tmp_path, "method=lora", steps=1, eval_batches=1)  # precomputed: a pass over 1 + 1 batches
  model_cfg = build.model_config(config)
  mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.resolve_rules("fsdp")  # 8 fake devices: FSDP
  data_sh = sharding.batch_sharding(mesh, rules)
  m = init_sharded(model_cfg, config.trainable, optim.make_optimizer(config.optim, 10)[0], mesh, rules, 0)
  state, frozen = m.init()
  keys = iter(jax.random.split(jax.random.key(1), 100))
  policy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state["params"])
  put = lambda b: {k: jax.device_put(np.asarray(v), data_sh) for k, v in b.items()}
  eval_step = jax.jit(step_lib.make_eval_step(m.graphdef, losses.make_loss(config)))
  batch = next(iter(datasets.make_dataset(config.data, tok, seq_len=config.train.seq_len, batch_size=8, seed=0,
                                          split="eval")))
  out = {}
  with sharding.use(mesh, rules):
    for mode in reference.MODES:
      config.dpo.reference = mode
      _, put_eval = reference.make_puts(
          config, m, state["params"], frozen, put, starting_model=lambda: reference.fresh_params(m), fresh=True,
          workdir=str(tmp_path / mode), tokenizer=tok, batch_size=8, shard=dict(shard_index=0, shard_count=1),
          mesh=mesh, rules=rules, data_sh=data_sh)
      with_ref = put_eval(batch)
      out[mode] = jax.device_get((with_ref["ref_logps"], eval_step(policy, frozen, with_ref)))
  assert os.path.exists(tmp_path / "precomputed" / "reference" / "eval.npz")
  ref, (loss_sum, weight, metrics) = out["copy"]
  assert float(weight) == 8 and abs(float(metrics["rewards/margins"])) > 1e-3  # the policy differs
  for mode in ("adapters_off", "precomputed"):
    np.testing.assert_allclose(out[mode][0], ref, rtol=1e-6)
    np.testing.assert_allclose(out[mode][1][0], loss_sum, rtol=1e-6)
    for k, v in metrics.items():
      np.testing.assert_allclose(out[mode][1][2][k], v, rtol=1e-5, atol=1e-6)


# Tolerances of the accumulation test, from the arithmetic (u = 2**-24, float32's unit roundoff). With
# float32 matmul inputs, accumulating micro-batches changes only the order of sums: the pair sums of
# loss/weight/metrics (16 terms as one sum, or 8 + 8), each weight gradient's sum over the batch's token
# rows (16 x 2 x 32 = 1024, or 512 + 512, over 8 devices), and, as a CPU may block a matmul differently
# for fewer rows, the contractions inside a row (d_model 64, mlp 192, the vocabulary's 8192 in the
# log-sum-exp and the LM head's backward). Two orders of a K-term sum differ by at most 2 K u sum|terms|.
#  - A row's log-probability: each token's log-sum-exp (positive terms) is off by at most 2 * 8192 u = 2**-10
#    in absolute value, the rest is far smaller, so a row of at most 32 tokens by 32 * 2**-10 = 2**-5; a
#    pair's beta * h moves by at most beta * 2 * 2**-5 (-log sigmoid has slope <= beta in h). That bounds
#    the mean margin and, with the 2 * 16 u of the pair sum, the mean loss. No pair of this batch has
#    |beta h| that small (the smallest is 0.09), so the reward accuracy must be equal.
#  - The gradient: each element is off by at most 2 K u sum|c_r| with K <= 8192 terms c_r; sum|c_r| over
#    |sum c_r| (the cancellation) is 3.2 over this batch's rows, measured once with per-row gradients, and
#    about 2 in the vocabulary contraction at init; with an allowance of 4, the gradient vector (and so its
#    norm) is off by at most 2 * 8192 * 4 u = 2**-8 of its norm.
# In bfloat16 (the model's default) every cast re-rounds: a float32 difference of one ulp can move a bf16
# input by a whole bf16 ulp (2**-7 relative; bf16's unit roundoff is 2**-8), and the honest bound is a few
# times 2**-8 per layer, loose enough to hide a dropped micro-batch (measured: 6.7e-5 in the grad norm on
# AMX, against 2.9e-2 for a dropped one). So the test runs the model in float32: how pairs are split does
# not depend on the dtype. Measured on a Xeon with AMX-BF16: loss, margins and grad norm equal
# for 2 micro-batches, the params 2e-5 of their bound; the wrong splits below land 3.8-19x (dropped) and
# 21-290x (split pairs) outside.
_U = 2.0 ** -24
_LOGP_ATOL = 32 * 2 * 8192 * _U  # a row's summed log-probability, absolute
_GRAD_RTOL = 2 * 8192 * 4 * _U  # the gradient vector, relative to its norm


def test_gradient_accumulation_splits_whole_pairs(tmp_path, tok):
  """Two micro-batches of pairs, sharded over 8 devices, make the same step as one batch.

  The optimizer is plain SGD with lr 1, so that the new parameters carry the gradient itself (AdamW's
  first step is lr * sign(g) for most elements and would hide a wrong gradient).
  """
  config = _config(tmp_path)
  model_cfg = dataclasses.replace(build.model_config(config), dtype="float32")
  mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.resolve_rules("fsdp")
  data_sh = sharding.batch_sharding(mesh, rules)
  tx, schedule = optax.sgd(1.0), optim.make_optimizer(config.optim, 10)[1]
  m = init_sharded(model_cfg, config.trainable, tx, mesh, rules, 0)
  batch = next(iter(datasets.make_dataset(config.data, tok, seq_len=32, batch_size=16, seed=0, split="train")))
  batch["ref_logps"] = np.random.default_rng(0).normal(-40, 5, (16, 2)).astype(np.float32)
  beta = config.dpo.beta
  # Wrong splits, fed to a correct one: "split pairs" puts every chosen row in the first micro-batch and
  # every rejected row in the second (a split along the row axis, not the pair axis); "dropped" keeps only
  # the first micro-batch (the second one's pairs become padding).
  split_pairs = {k: v.swapaxes(0, 1).reshape(v.shape) for k, v in batch.items()}
  first = (np.arange(16) < 8)[:, None, None].astype(batch["loss_mask"].dtype)
  dropped = {**batch, "loss_mask": batch["loss_mask"] * first}
  put = lambda b: {k: jax.device_put(v, data_sh) for k, v in b.items()}
  with sharding.use(mesh, rules):
    steps = {n: jit_train_step(m, losses.make_loss(config), tx, schedule, n, data_sh) for n in (1, 2)}

    def run(b, accum):
      state, frozen = m.init()
      return jax.device_get(steps[accum](state, frozen, put(b)))

    want, got = run(batch, 1), run(batch, 2)
    wrong = {"split pairs": run(split_pairs, 2), "dropped": run(dropped, 1)}

  def errors(out):
    """Each difference from the one-batch step over its bound (<= 1: within it)."""
    (state, metrics), (ref_params, ref) = out, (want[0]["params"], want[1])
    margin = beta * 2 * _LOGP_ATOL  # per pair, and so for the mean over pairs
    diff = optax.global_norm(jax.tree.map(lambda a, b: a - b, state["params"], ref_params))
    # New params are p - g, each rounded (u |p - g|): twice that beside the gradient's own bound.
    param_bound = _GRAD_RTOL * ref["grad_norm"] + 2 * _U * optax.global_norm(ref_params)
    return {"loss": abs(metrics["loss"] - ref["loss"]) / (margin + 2 * 16 * _U * ref["loss"]),
            "rewards/margins": abs(metrics["rewards/margins"] - ref["rewards/margins"]) / margin,
            "grad_norm": abs(metrics["grad_norm"] - ref["grad_norm"]) / (_GRAD_RTOL * ref["grad_norm"]),
            "params": float(diff) / float(param_bound)}

  assert float(want[1]["weight"]) == float(got[1]["weight"]) == 16
  assert float(got[1]["rewards/accuracies"]) == float(want[1]["rewards/accuracies"])
  assert max(errors(got).values()) <= 1, errors(got)
  for name, out in wrong.items():  # every bound is tight enough to see either wrong split
    assert min(errors(out).values()) > 3, (name, errors(out))


def test_training_raises_held_out_reward_accuracy(tmp_path, capsys):
  config = _config(tmp_path, steps=24, log_every=4, eval_every=12, eval_batches=0)
  config.optim.update(lr=1e-3, warmup_steps=2)
  last = trainer.run(config, str(tmp_path / "run"))
  evals = [r for r in _rows(tmp_path / "run") if "eval/rewards/accuracies" in r]
  assert evals[0]["step"] == 0 and evals[0]["eval/rewards/accuracies"] == 0.5  # policy == reference
  assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)
  assert last["eval/rewards/accuracies"] > 0.9 and last["eval/rewards/margins"] > 0
  assert last["eval/loss"] < math.log(2) - 0.1
  # exp of a DPO loss is no perplexity: neither logged nor printed.
  assert not any(k.endswith("perplexity") for r in _rows(tmp_path / "run") for k in r) and "perplexity" not in last
  out = capsys.readouterr().out
  assert "step      0 | eval loss 0.6931 | logps/accuracies " in out and "perplexity" not in out, out


# ---------------------------------------------------------------------------
# Resume: the reference stays the starting model


def _main(workdir, arg, *flags, env=None):
  main = [fault_hooks.MAIN] if env else ["-m", "lmstack.main"]  # faults come in through the test seam
  cmd = [sys.executable, *main, f"--config=configs/dpo.py:{arg}", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})},
                        timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_killed_dpo_run_resumes_with_identical_losses(base_run, tmp_path, reference):
  flags = ["--config.train.steps=8", "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
           "--config.optim.lr=1e-3", "--config.train.peak_flops=0"]
  arg = f"init_from={base_run},runlocal,reference={reference}"
  straight = _main(tmp_path / "straight", arg, *flags)
  assert straight.returncode == 0, straight.stderr[-2000:]
  killed = _main(tmp_path / "killed", arg, *flags, env={"LMSTACK_FAULT_KILL_AT_STEP": "4"})
  assert killed.returncode == -9
  resumed = _main(tmp_path / "killed", arg, *flags)
  assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
  read = lambda w: {r["step"]: (r["train/loss"], r["train/rewards/margins"]) for r in _rows(w) if "train/loss" in r}
  assert read(tmp_path / "killed") == read(tmp_path / "straight")
  assert read(tmp_path / "straight")[8][0] < math.log(2)  # the policy moved away from the reference


@pytest.mark.slow
def test_three_reference_modes_train_alike(tmp_path):
  """The same through the trainer: losses and held-out metrics step by step."""
  out = {}
  for mode in reference.MODES:
    config = _config(tmp_path, f"method=lora,reference={mode}", steps=3, log_every=1, eval_every=2)
    config.optim.lr = 1e-2
    trainer.run(config, str(tmp_path / mode))
    out[mode] = _rows(tmp_path / mode)
  keys = ("train/loss", "train/rewards/margins", "eval/loss", "eval/rewards/margins", "eval/rewards/accuracies")
  series = lambda rows: [(r["step"], k, r[k]) for r in rows for k in keys if k in r]
  want = series(out["copy"])
  assert [r for r in want if r[1] == "train/loss"][0][2] == pytest.approx(math.log(2), abs=1e-5)
  assert [r for r in want if r[1] == "train/loss"][-1][2] != pytest.approx(math.log(2), abs=1e-4)  # it trained
  for mode in ("adapters_off", "precomputed"):
    got = series(out[mode])
    assert [g[:2] for g in got] == [w[:2] for w in want]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=1e-5, atol=1e-6)
