"""SFT data (loss on responses only, packing) and fine-tuning runs end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import fault_hooks
from configs import lora, pretrain, sft
from lmstack import checkpoint as ckpt_lib
from lmstack.data import sft as sft_data
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import CheckpointError, ConfigError, DataError
from lmstack.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(pretrain.get_config().data.tokenizer)


def _data(tmp_path, records, **fields):
  path = tmp_path / "sft.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
  config = sft.get_config("data=jsonl,runlocal")
  config.data.update(train_files=str(path), eval_files=str(path), **fields)
  return config.data


def _segments(batch):
  """[(row, masked target ids, all target ids)] per packed example."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][row]
    for s in sorted(set(seg[seg > 0].tolist())):
      sel = seg == s
      out.append((row, batch["targets"][row][sel & (batch["loss_mask"][row] > 0)], batch["targets"][row][sel]))
  return out


def test_loss_mask_covers_exactly_the_response_and_eos(tmp_path, tok):
  records = [{"q": f"Question {i}: what is {i} plus {i}?", "a": f"It is {2 * i}."} for i in range(12)]
  data = _data(tmp_path, records, prompt_field="q", response_field="a")
  batches = list(sft_data.make_sft_dataset(data, tok, seq_len=64, batch_size=2, seed=0, split="eval"))
  segs = [s for b in batches for s in _segments(b)]
  assert len(segs) == 12 and len(batches) < 12  # packed: several examples per row
  answers = sorted(r["a"] for r in records)
  assert sorted(tok.decode(masked[:-1].tolist()) for _, masked, _ in segs) == answers
  for _, masked, targets in segs:
    assert masked[-1] == tok.eos_id and targets[-1] == tok.eos_id
    answer = tok.decode(masked[:-1].tolist())
    assert masked.tolist() == list(tok.encode(answer)) + [tok.eos_id]
    assert targets[-len(masked):].tolist() == masked.tolist()  # the mask is the tail: the response
  for batch in batches:  # positions restart per example; padding is never trained on
    for row in range(2):
      seg, pos = batch["segment_ids"][row], batch["positions"][row]
      starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
      assert all(pos[s] == 0 for s in starts if seg[s] > 0)
      assert not batch["loss_mask"][row][seg == 0].any()


def test_chat_messages_train_on_assistant_turns(tmp_path, tok):
  records = [{"messages": [{"role": "user", "content": "Define: cat"},
                           {"role": "assistant", "content": "a small domesticated feline"}]}]
  data = _data(tmp_path, records, messages_field="messages")
  batch = next(iter(sft_data.make_sft_dataset(data, tok, seq_len=64, batch_size=1, seed=0, split="eval")))
  [(_, masked, targets)] = _segments(batch)
  text = tok.decode(masked.tolist())
  assert text.startswith("a small domesticated feline") and text.endswith("<|im_end|>")
  assert "Define" in tok.decode(targets.tolist()) and "Define" not in text


def test_long_examples_are_truncated_or_dropped(tmp_path, tok):
  records = [{"prompt": "word " * 100, "response": "short"}, {"prompt": "Hi", "response": "long answer " * 80}]
  data = _data(tmp_path, records)
  assert sft_data.check_examples(data, tok, seq_len=32, split="eval") == (2, 2, 1)
  batch = next(iter(sft_data.make_sft_dataset(data, tok, seq_len=32, batch_size=2, seed=0, split="eval")))
  [(_, masked, targets)] = _segments(batch)  # the prompt-only one is gone
  assert len(targets) == 32 and tok.decode(masked.tolist()).startswith("long answer")


def test_builtin_sets_hold_out_disjoint_examples():
  for fn, n_eval in [(sft_data.wordnet_examples, 5883), (sft_data.humaneval_examples, 21)]:
    train, evals = fn("train"), fn("eval")
    assert len(evals) == n_eval and len(train) > len(evals)
    assert not {json.dumps(e) for e in evals} & {json.dumps(e) for e in train}
  assert sft_data.wordnet_examples("eval")[0] == {
      "prompt": "Define: entity",
      "response": "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)"}


@pytest.mark.parametrize("record,needle", [({"prompt": "x"}, "expected string fields 'prompt' and 'response'"),
                                           ({"prompt": "x", "response": " "}, "is empty"),
                                           ([1, 2], "expected a JSON object")])
def test_bad_records_name_the_line(tmp_path, tok, record, needle):
  data = _data(tmp_path, [{"prompt": "a", "response": "b"}, record])
  with pytest.raises(DataError, match=f"sft.jsonl:2: .*{needle}"):
    sft_data.make_sft_dataset(data, tok, seq_len=32, batch_size=2, seed=0)


def test_train_split_resumes_exactly(tok):
  data = sft.get_config("runlocal").data
  ds = sft_data.make_sft_dataset(data, tok, seq_len=64, batch_size=4, seed=3)
  it = iter(ds)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = iter(sft_data.make_sft_dataset(data, tok, seq_len=64, batch_size=4, seed=3))
  again.set_state(state)
  for w in want:
    jax.tree.map(np.testing.assert_array_equal, next(again), w)


# ---------------------------------------------------------------------------
# Runs: pre-train -> fine-tune with each method, merge, resume, bad hand-offs.


def _run(workdir, config_arg, *flags, env=None, config="configs/sft.py"):
  main = [fault_hooks.MAIN] if env else ["-m", "lmstack.main"]  # faults come in through the test seam
  cmd = [sys.executable, *main, f"--config={config}:{config_arg}", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})},
                        timeout=600)


def test_lora_run_saves_only_adapters_and_merges(base_run, tmp_path):
  config = lora.get_config(f"init_from={base_run},runlocal")
  last = trainer.run(config, str(tmp_path / "lora"))
  assert np.isfinite(last["eval/loss"])
  # The checkpoint holds the adapters; restore_params completes them with the base.
  meta_params = ckpt_lib.flatten_tree(ckpt_lib.restore_params(str(tmp_path / "lora"))[0])
  assert ("blocks", "attn", "q_lora_a") in meta_params and ("blocks", "attn", "q") in meta_params
  base_params, _, _ = ckpt_lib.restore_params(base_run)
  np.testing.assert_array_equal(meta_params[("embed",)], base_params["embed"])

  out = subprocess.run([sys.executable, "tools/merge_lora.py", f"--ckpt={tmp_path / 'lora'}",
                        f"--out={tmp_path / 'merged'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lora_params, lora_cfg, _ = ckpt_lib.restore_params(str(tmp_path / "lora"))
  merged, merged_cfg, _ = ckpt_lib.restore_params(str(tmp_path / "merged"))
  assert merged_cfg.peft.method == "none"
  tokens = np.asarray(load_tokenizer(config.data.tokenizer).encode("Define: dog\n"))[None]
  f32 = lambda c: __import__("dataclasses").replace(c, dtype="float32")
  want = ckpt_lib.model_from_params(lora_params, f32(lora_cfg))(tokens)
  got = ckpt_lib.model_from_params(merged, f32(merged_cfg))(tokens)
  assert float(np.abs(np.asarray(want - ckpt_lib.model_from_params(base_params, f32(merged_cfg))(tokens))).max()) > 0
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("method", ["qlora", "prefix"])
def test_other_methods_run_from_a_checkpoint(base_run, tmp_path, method):
  config = sft.get_config(f"init_from={base_run},method={method},runlocal")
  last = trainer.run(config, str(tmp_path))
  assert np.isfinite(last["eval/loss"])
  params, cfg, _ = ckpt_lib.restore_params(str(tmp_path))
  assert cfg.peft.method == ("lora" if method == "qlora" else method)  # qlora restores dequantized
  model = ckpt_lib.model_from_params(params, cfg)
  assert np.isfinite(np.asarray(model(np.asarray([[2, 40, 50]])))).all()


def test_prompt_init_from_text_uses_the_embedding_rows(base_run, tmp_path, tok):
  config = sft.get_config(f"init_from={base_run},method=prompt,runlocal")
  config.peft.update(prompt_init="text", prompt_init_text="Define the word", num_virtual_tokens=6)
  config.train.steps = 1
  config.optim.lr = 1e-9
  trainer.run(config, str(tmp_path))
  params, _, _ = ckpt_lib.restore_params(str(tmp_path))
  ids = list(tok.encode("Define the word"))
  want = np.asarray(params["embed"])[(ids * 6)[:6]]
  np.testing.assert_allclose(params["prompt"], want, atol=1e-6)


@pytest.mark.slow
def test_killed_lora_run_resumes_with_identical_losses(base_run, tmp_path):
  flags = ["--config.train.steps=8", "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
           "--config.peft.dropout=0.1"]
  arg = f"init_from={base_run},runlocal"
  straight = _run(tmp_path / "straight", arg, *flags, config="configs/lora.py")
  assert straight.returncode == 0, straight.stderr[-2000:]
  killed = _run(tmp_path / "killed", arg, *flags, config="configs/lora.py", env={"LMSTACK_FAULT_KILL_AT_STEP": "4"})
  assert killed.returncode == -9
  resumed = _run(tmp_path / "killed", arg, *flags, config="configs/lora.py")
  assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
  read = lambda w: {r["step"]: r["train/loss"] for r in map(json.loads, open(w / "metrics.jsonl")) if "train/loss" in r}
  assert read(tmp_path / "killed") == read(tmp_path / "straight")


def test_bad_hand_offs_are_one_line_errors(base_run, tmp_path):
  prefix = tmp_path / "prefix"
  trainer.run(sft.get_config(f"init_from={base_run},method=prefix,runlocal"), str(prefix))
  with pytest.raises(CheckpointError, match="is a prefix model; a lora run can start only"):
    trainer.run(lora.get_config(f"init_from={prefix},runlocal"), str(tmp_path / "x"))
  out = _run(tmp_path / "y", f"init_from={base_run},runlocal", "--config.peft.rnak=4")
  assert out.returncode == 1 and "rnak" in out.stderr
  config = lora.get_config(f"init_from={base_run},runlocal")
  config.peft.method = "dora"
  with pytest.raises(ConfigError, match="peft.method='dora'"):
    trainer.run(config, str(tmp_path / "z"))
  with pytest.raises(ValueError, match="method='dpo'"):
    sft.get_config("method=dpo")
