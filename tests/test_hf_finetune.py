"""A Hugging Face model through lmstack and back: import, train, export.

  python -m pytest tests/test_hf_finetune.py -q

The model is a tiny random `LlamaForCausalLM` made with transformers; its
tokenizer is a small byte-level BPE trained here with the `tokenizers`
package (tokenizer.json and a tokenizer_config.json with a ChatML template,
beside the weights, as on the Hub). The path is the one a user takes:
tools/convert_hf.py import, a pre-training stage with `init_from` and the HF
directory as its tokenizer, tools/convert_hf.py export, then transformers'
`from_pretrained` on the result; and tools/generate.py on the import.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from configs import pretrain
from lmstack import assets, checkpoint as ckpt_lib
from lmstack.data import sources
from lmstack.data.chat import CHATML_TEMPLATE, ChatTemplate
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import CheckpointError
from lmstack.train import trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: the trainer puts them first
SENTENCE = "HAMLET. To be, or not to be: that is the question.\n  Whether 'tis nobler"
MESSAGES = [{"role": "user", "content": "Who is Botchan?"}, {"role": "assistant", "content": "A teacher."}]


def _tool(*args):
  r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, f"{args[0]} failed:\n{r.stderr[-3000:]}"
  return r


def _make_hf_dir(path):
  """A tiny random Llama and its tokenizer, as `save_pretrained` lays them out."""
  text = sources.read_text(assets.resolve(assets.DEFAULT_TRAIN_FILES))
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(text[:50_000].split("\n"), trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  # As Llama's tokenizer.json: transformers prepends <s>; lmstack's encode
  # (the pipeline adds bos itself) must not.
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
  vocab = tok.get_vocab_size()

  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(path, safe_serialization=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "pad_token": "<pad>", "chat_template": CHATML_TEMPLATE, "model_max_length": 128}, f)
  return vocab


def _train(init_from, hf_dir, model_cfg, workdir, **optim):
  config = pretrain.get_config("runlocal")
  config.init_from = init_from
  config.data.tokenizer = hf_dir
  config.model.update(dataclasses.asdict(model_cfg))
  config.train.update(steps=3, eval_every=0, checkpoint_every=3, tensorboard=False)
  config.optim.update(optim)
  trainer.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
  params, _, _ = ckpt_lib.restore_params(workdir)
  return losses, params


def _leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow
def test_import_train_export_generate(tmp_path):
  hf_dir, ckpt, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "out")
  vocab = _make_hf_dir(hf_dir)
  lm_tok = load_tokenizer(hf_dir)
  assert (lm_tok.vocab_size, lm_tok.bos_id, lm_tok.eos_id, lm_tok.pad_id) == (vocab, 0, 1, 2)

  _tool("tools/convert_hf.py", "import", f"--hf_dir={hf_dir}", f"--out={ckpt}", "--model_dtype=float32")
  imported, model_cfg, meta = ckpt_lib.restore_params(ckpt)
  assert model_cfg.vocab_size == vocab and model_cfg.dtype == "float32"
  assert meta["tokenizer_model"]  # the import kept the directory's tokenizer

  # The runs below pass the trainer's tokenizer check (init_from's meta
  # against data.tokenizer), which is live: the same tokenizer.json with
  # another eos token would be refused.
  other = tmp_path / "other"
  other.mkdir()
  shutil.copy(os.path.join(hf_dir, "tokenizer.json"), other)
  (other / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<pad>"}))
  with pytest.raises(CheckpointError, match="different tokenizer"):
    ckpt_lib.check_compatible(meta, meta["model"], load_tokenizer(str(other)).to_bytes(), ckpt)

  # lr 0: three steps leave the parameters where init_from put them, so the
  # run trained the imported weights (the trainer checked the tokenizer).
  losses, params = _train(ckpt, hf_dir, model_cfg, str(tmp_path / "frozen"), lr=0.0, schedule="constant")
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
  for a, b in zip(_leaves(imported), _leaves(params)):
    np.testing.assert_array_equal(a, b)

  workdir = str(tmp_path / "run")
  losses, params = _train(ckpt, hf_dir, model_cfg, workdir, lr=1e-2, schedule="constant", warmup_steps=0)
  assert all(np.isfinite(list(losses.values()))) and losses[3] < losses[1], losses
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(imported), _leaves(params)))

  # Export the trained run: its weights and its (the HF directory's) tokenizer.
  _tool("tools/convert_hf.py", "export", f"--ckpt={workdir}", f"--out={out}")
  with open(os.path.join(hf_dir, "tokenizer.json"), "rb") as f, open(os.path.join(out, "tokenizer.json"), "rb") as g:
    assert f.read() == g.read()
  for name in ("config.json", "generation_config.json"):
    with open(os.path.join(out, name)) as f:
      ids = json.load(f)
    assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (0, 1, 2), name

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = lm_tok.encode(SENTENCE)
  assert hf_tok.encode(SENTENCE, add_special_tokens=False) == ids
  assert hf_tok(SENTENCE)["input_ids"] == [0] + ids  # the post-processor's <s> survives
  assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == tuple(SPECIALS)
  tokens = np.array([[lm_tok.bos_id] + ids])
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(ckpt_lib.model_from_params(params, model_cfg)(tokens))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  text = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert text == ChatTemplate.from_tokenizer(lm_tok).render_chat(MESSAGES, add_generation_prompt=True)
  assert text.startswith("<|im_start|>user\nWho is Botchan?<|im_end|>\n")
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == lm_tok.encode(text)

  r = _tool("tools/generate.py", f"--ckpt={ckpt}", "--prompt=To be, or not", "--max_new_tokens=5")
  assert "To be, or not" in r.stdout
