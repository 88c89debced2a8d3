"""Hugging Face import/export against transformers' own Llama, Mistral and Qwen2.

The references are tiny random models built here from configs with
transformers (torch CPU, float32, eager attention) and saved with
`save_pretrained`; an import must give the same logits, and an export must
load back into `AutoModelForCausalLM` with the same logits.
"""

import base64
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
import safetensors.numpy
import sentencepiece as spm
import tokenizers
import torch
import transformers

from lmstack import assets, sharding
from lmstack.convert import hf
from lmstack.data.chat import CHATML_TEMPLATE, ChatTemplate
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import CheckpointError, ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # wavelengths 6..2e4 fall in all three bands
VARIANTS = {
    "llama": (transformers.LlamaConfig, {}),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama3_rope": (transformers.LlamaConfig, dict(rope_scaling=LLAMA3_ROPE)),
    "linear_rope": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=8)),  # shorter than the test sequences
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen2_sliding": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
}
# 24 positions: past Mistral's window of 8.
TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 24))


def _logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _make_hf(variant, directory, **save_kwargs):
  """A random tiny HF model saved to `directory`; returns its logits on TOKENS."""
  config_cls, extra = VARIANTS[variant]
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      config_cls(**TINY, **extra), attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomize everything
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
  return _logits(model)


_CACHE = {}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """variant -> (directory, reference logits), built once per module."""
  def get(variant, **save_kwargs):
    key = (variant, tuple(sorted(save_kwargs.items())))
    if key not in _CACHE:
      directory = str(tmp_path_factory.mktemp(variant))
      _CACHE[key] = directory, _make_hf(variant, directory, **save_kwargs)
    return _CACHE[key]
  return get


def _import(directory, mesh=None, rules=None):
  cfg = hf.hf_to_model_config(hf.read_hf_config(directory), dtype="float32")
  return hf.load_hf_params(directory, cfg, mesh, rules), cfg


def _lmstack_logits(params, cfg):
  return np.asarray(hf.model_from_params(params, cfg)(TOKENS))


def _reload(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_and_export_match_transformers(hf_model, tmp_path, variant):
  directory, want = hf_model(variant)
  params, cfg = _import(directory)
  np.testing.assert_allclose(_lmstack_logits(params, cfg), want, rtol=1e-4, atol=1e-4)

  hf.save_hf(params, cfg, tmp_path / "out", architecture="auto")
  reloaded = _reload(tmp_path / "out")
  assert type(reloaded).__name__ == VARIANTS[variant][0].__name__.replace("Config", "ForCausalLM")
  np.testing.assert_allclose(_logits(reloaded), want, rtol=1e-4, atol=1e-4)


def test_config_mapping(hf_model):
  assert _import(hf_model("mistral")[0])[1].sliding_window == 8
  cfg = _import(hf_model("qwen2")[0])[1]
  assert cfg.qkv_bias and cfg.sliding_window == 0
  assert _import(hf_model("qwen2_sliding")[0])[1].sliding_window == 8
  cfg = _import(hf_model("llama3_rope")[0])[1]
  assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == ("llama3", 8.0, 64)
  assert _import(hf_model("llama_tied")[0])[1].tie_embeddings


def test_sharded_files_and_8_device_mesh(hf_model, tmp_path):
  directory, want = hf_model("llama", max_shard_size="20KB")
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) >= 3
  mesh = sharding.make_mesh((1, -1, 1))
  sharded, cfg = _import(directory, mesh, "fsdp")
  single, _ = _import(directory)
  for path, x in hf.flatten_tree(sharded).items():
    assert len(x.sharding.device_set) == 8, path
    assert not x.sharding.is_fully_replicated, path  # every parameter has a d_model (embed) axis: 64 / 8
    np.testing.assert_array_equal(np.asarray(x), np.asarray(hf.tree_get(single, path)))
  assert sharded["embed"].addressable_shards[0].data.shape == (128, 8)
  np.testing.assert_allclose(_lmstack_logits(sharded, cfg), want, rtol=1e-4, atol=1e-4)

  # Export in shards too, from the sharded arrays.
  hf.save_hf(sharded, cfg, tmp_path / "out", max_shard_bytes=30_000)
  with open(tmp_path / "out" / "model.safetensors.index.json") as f:
    assert len(set(json.load(f)["weight_map"].values())) >= 3
  np.testing.assert_allclose(_logits(_reload(tmp_path / "out")), want, rtol=1e-4, atol=1e-4)


def test_bfloat16_export_and_import(hf_model, tmp_path):
  params, cfg = _import(hf_model("qwen2")[0])
  hf.save_hf(params, cfg, tmp_path / "out", dtype="bfloat16")
  with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  assert _reload(tmp_path / "out").dtype == torch.bfloat16
  again = hf.load_hf_params(tmp_path / "out", cfg)  # bf16 tensors read back as float32
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16).astype(np.float32))


def _random_params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), hf.abstract_params(cfg))


def test_tokenizer_export(tmp_path):
  tok_path = assets.resolve(assets.DEFAULT_TOKENIZER)
  cfg = hf.hf_to_model_config(dict(TINY, vocab_size=8192, architectures=["LlamaForCausalLM"]))
  hf.save_hf(_random_params(cfg), cfg, tmp_path / "out", tokenizer_path=tok_path)
  with open(tmp_path / "out" / "config.json") as f:
    config = json.load(f)
  assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 2, 3)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
  sp = spm.SentencePieceProcessor(model_file=tok_path)
  text = "To be, or not to be:\n  that is the question. 1234 \u00e9t\u00e9 \U0001F600"
  ids = tok(text)["input_ids"]
  assert ids == [2] + sp.EncodeAsIds(text)
  assert tok.decode(ids, skip_special_tokens=True) == text


# ---- Tokenizers: kept by the import, written by the export ----

TOKEN_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_end|>"]  # 0..4; Llama's bos 1 and eos 2
TEMPLATES = [{"name": "default", "template": CHATML_TEMPLATE},
             {"name": "plain", "template": "{{ messages[0].content }}"}]
MESSAGES = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
WORDS = "w1 w7 w90 <|im_end|> w3 nope"


def _word_tokenizer(n_words):
  """A tokenizers WordLevel tokenizer of len(TOKEN_SPECIALS) + n_words tokens."""
  vocab = {t: i for i, t in enumerate(TOKEN_SPECIALS + [f"w{i}" for i in range(n_words)])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(TOKEN_SPECIALS)  # matched whole in text, at their vocabulary ids
  return tok


def _with_tokenizer(src, dst, tok, **configs):
  """A copy of the HF model directory `src` with `tok` and config files."""
  directory = _copy(src, dst)
  tok.save(os.path.join(directory, "tokenizer.json"))
  for name, obj in configs.items():
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
      json.dump(obj, f)
  return directory


def _read_json(*path):
  with open(os.path.join(*map(str, path))) as f:
    return json.load(f)


def test_import_keeps_the_tokenizer_and_export_writes_it(hf_model, tmp_path, caplog):
  directory = _with_tokenizer(
      hf_model("llama")[0], tmp_path / "m", _word_tokenizer(95),  # 100 tokens for 128 embedding rows
      tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                        "chat_template": TEMPLATES},
      generation_config={"bos_token_id": 1, "eos_token_id": [2, 4]})  # two stop tokens, as Llama 3's
  tok = load_tokenizer(directory)
  assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.pad_id, tok.unk_id) == (100, 1, [2, 4], 3, 0)
  with caplog.at_level(logging.WARNING):
    hf.import_checkpoint(directory, tmp_path / "ckpt", dtype="float32")
  warnings = [r.getMessage() for r in caplog.records if "tokenizer" in r.getMessage()]
  assert len(warnings) == 1 and "has 100 tokens, fewer than the 128 rows" in warnings[0], warnings
  _, _, meta = hf.load_params_checkpoint(tmp_path / "ckpt")
  assert base64.b64decode(meta["tokenizer_model"]) == tok.to_bytes()  # what a run on `directory` compares

  hf.export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
  out = tmp_path / "out"
  assert (out / "tokenizer.json").read_bytes() == open(os.path.join(directory, "tokenizer.json"), "rb").read()
  assert _read_json(out, "tokenizer_config.json") == {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
      "unk_token": "<unk>", "chat_template": TEMPLATES, "clean_up_tokenization_spaces": False,
      "model_max_length": 2048}
  for name in ("config.json", "generation_config.json"):
    ids = _read_json(out, name)
    assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (1, [2, 4], 3), name
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.encode(WORDS, add_special_tokens=False) == tok.encode(WORDS) == [6, 12, 95, 4, 8, 0]
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (1, 2, 3, 0)
  assert hf_tok.apply_chat_template(MESSAGES, tokenize=False) == ChatTemplate.from_tokenizer(tok).render_chat(
      MESSAGES)
  # The export reads back as the very same tokenizer: importing it again
  # gives a checkpoint that trains on with this run's tokenizer check.
  assert load_tokenizer(str(out)).to_bytes() == tok.to_bytes()


def test_import_refuses_a_tokenizer_larger_than_the_embedding(hf_model, tmp_path):
  tok = _word_tokenizer(123)  # 128 tokens: as many as the embedding table's rows ...
  tok.add_special_tokens(["<|extra|>"])  # ... and an added token above them, id 128
  directory = _with_tokenizer(hf_model("llama")[0], tmp_path / "m", tok)
  assert load_tokenizer(directory).vocab_size == 129  # added tokens count
  with pytest.raises(CheckpointError) as e:
    hf.import_checkpoint(directory, tmp_path / "ckpt")
  assert "the tokenizer has 129 tokens but config.json's vocab_size is 128" in _one_line(e)
  assert not os.path.exists(tmp_path / "ckpt")  # refused before anything was written


def test_import_without_a_tokenizer_and_export_with_another(hf_model, tmp_path):
  directory = hf_model("llama")[0]
  hf.import_checkpoint(directory, tmp_path / "ckpt")
  _, _, meta = hf.load_params_checkpoint(tmp_path / "ckpt")
  assert "tokenizer_model" not in meta
  hf.export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
  assert not {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} & set(os.listdir(tmp_path / "out"))
  config = _read_json(tmp_path / "out", "config.json")
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # the source's

  # --tokenizer: a tokenizer.json, or a Hugging Face directory (its configs too).
  tok_dir = _with_tokenizer(directory, tmp_path / "tok", _word_tokenizer(10),
                            tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
  hf.export_checkpoint(tmp_path / "ckpt", tmp_path / "out2", tokenizer_path=os.path.join(tok_dir, "tokenizer.json"))
  config = _read_json(tmp_path / "out2", "tokenizer_config.json")
  assert config["bos_token"] is config["eos_token"] is None  # a bare file names none
  hf.export_checkpoint(tmp_path / "ckpt", tmp_path / "out3", tokenizer_path=tok_dir)
  assert _read_json(tmp_path / "out3", "tokenizer_config.json")["eos_token"] == "</s>"
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out3").encode(
      "w1 w9", add_special_tokens=False) == [6, 14]
  with pytest.raises(DataError) as e:
    hf.export_checkpoint(tmp_path / "ckpt", tmp_path / "out4", tokenizer_path=tmp_path / "nowhere")
  assert "tokenizer not found" in _one_line(e) and not os.path.exists(tmp_path / "out4")


def test_export_sentencepiece_with_a_chat_template(tmp_path):
  # A SentencePiece model with a tokenizer_config (an envelope, not raw
  # proto bytes): the .model as it is, plus its template and stop tokens.
  raw = open(assets.resolve(assets.DEFAULT_TOKENIZER), "rb").read()
  (tmp_path / "sp").mkdir()
  (tmp_path / "sp" / "tokenizer.model").write_bytes(raw)
  (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
  (tmp_path / "sp" / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
  cfg = hf.hf_to_model_config(dict(TINY, vocab_size=8192, architectures=["LlamaForCausalLM"]))
  hf.save_hf(_random_params(cfg), cfg, tmp_path / "out", tokenizer_path=str(tmp_path / "sp"))
  assert (tmp_path / "out" / "tokenizer.model").read_bytes() == raw
  config = _read_json(tmp_path / "out", "tokenizer_config.json")
  assert config["tokenizer_class"] == "LlamaTokenizer" and config["chat_template"] == CHATML_TEMPLATE
  assert _read_json(tmp_path / "out", "generation_config.json")["eos_token_id"] == [3, 1]
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  text = tok.apply_chat_template(MESSAGES, tokenize=False)
  assert text == "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\nw3<|im_end|>\n"
  assert tok(text)["input_ids"] == [2] + spm.SentencePieceProcessor(model_file=str(tmp_path / "sp" / "tokenizer.model")
                                                                   ).EncodeAsIds(text)


def test_params_checkpoint_roundtrip_sharded(hf_model, tmp_path):
  directory, _ = hf_model("llama_tied")
  params, cfg = _import(directory)
  hf.save_params_checkpoint(tmp_path / "ckpt", params, cfg, source=directory,
                            hf_config=hf.read_hf_config(directory))
  mesh = sharding.make_mesh((1, -1, 1))
  restored, cfg2, meta = hf.load_params_checkpoint(tmp_path / "ckpt", mesh, "fsdp")
  assert cfg2 == cfg
  assert meta["model"] == dataclasses.asdict(cfg) and meta["source"] == directory
  assert meta["hf_config"]["architectures"] == ["LlamaForCausalLM"]
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for path, x in hf.flatten_tree(restored).items():
    assert len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(hf.tree_get(params, path)))


@pytest.mark.slow
def test_export_from_training_workdir(tmp_path):
  """A checkpoint as the trainer writes it: only params are read, the
  tokenizer comes from its meta."""
  from configs import pretrain
  from lmstack import checkpoint as ckpt_lib
  from lmstack.data.tokenizer import Tokenizer
  from lmstack.train import build, optim
  from lmstack.train.state import init_sharded

  config = pretrain.get_config("runlocal")
  cfg = dataclasses.replace(build.model_config(config), dtype="float32", init_std=0.2)
  tx, _ = optim.make_optimizer(config.optim, 10)
  mesh = sharding.make_mesh((1, -1, 1))
  state, _ = init_sharded(cfg, ".*", tx, mesh, sharding.resolve_rules("fsdp"), seed=0).init()
  tokenizer = Tokenizer.load(assets.DEFAULT_TOKENIZER)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
  ckpt.save(7, state, {}, ckpt_lib.make_meta(config, dataclasses.asdict(cfg), tokenizer.to_bytes()))
  ckpt.close()

  hf.export_checkpoint(tmp_path / "run", tmp_path / "out")
  assert {"tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))
  want = _lmstack_logits(params, cfg)
  np.testing.assert_allclose(_logits(_reload(tmp_path / "out")), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_command_line(hf_model, tmp_path):
  directory, want = hf_model("mistral")
  tool = [sys.executable, os.path.join(REPO, "tools", "convert_hf.py")]
  run = lambda *args: subprocess.run(tool + list(args), capture_output=True, text=True, cwd=REPO)  # noqa: E731
  r = run("import", f"--hf_dir={directory}", f"--out={tmp_path / 'ckpt'}")
  assert r.returncode == 0, r.stderr
  r = run("export", f"--ckpt={tmp_path / 'ckpt'}", f"--out={tmp_path / 'out'}", "--max_shard_size=40KB")
  assert r.returncode == 0, r.stderr
  reloaded = _reload(tmp_path / "out")
  assert type(reloaded).__name__ == "MistralForCausalLM"  # the source's architecture
  np.testing.assert_allclose(_logits(reloaded), want, rtol=1e-4, atol=1e-4)
  r = run("export", f"--ckpt={tmp_path / 'nowhere'}", f"--out={tmp_path / 'out2'}")
  assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "checkpoint not found" in r.stderr


# ---- Bad input: one-line errors naming the problem ----


def _one_line(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_error_unsupported_architecture(hf_model, tmp_path):
  directory = _copy(hf_model("llama")[0], tmp_path / "m")
  config = hf.read_hf_config(directory)
  config["architectures"] = ["GPT2LMHeadModel"]
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError) as e:
    hf.load_hf_params(directory)
  assert "architectures" in _one_line(e) and "GPT2LMHeadModel" in str(e.value)


def test_error_missing_shard(hf_model, tmp_path):
  directory = _copy(hf_model("llama", max_shard_size="20KB")[0], tmp_path / "m")
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    shard = json.load(f)["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  os.remove(os.path.join(directory, shard))
  with pytest.raises(CheckpointError) as e:
    hf.load_hf_params(directory)
  assert shard in _one_line(e) and "missing" in str(e.value)


def _rewrite_tensor(directory, name, value):
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  tensors[name] = value
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_error_wrong_shape(hf_model, tmp_path):
  directory = _copy(hf_model("llama")[0], tmp_path / "m")
  _rewrite_tensor(directory, "model.layers.1.self_attn.k_proj.weight", np.zeros((64, 64), np.float32))
  with pytest.raises(CheckpointError) as e:
    hf.load_hf_params(directory)
  assert "model.layers.1.self_attn.k_proj.weight has shape [64, 64]" in _one_line(e)
  assert "[32, 64]" in str(e.value)


def test_error_unsupported_dtype(hf_model, tmp_path):
  directory = _copy(hf_model("llama")[0], tmp_path / "m")
  _rewrite_tensor(directory, "model.layers.0.mlp.up_proj.weight", np.ones((96, 64), np.int8))
  with pytest.raises(CheckpointError) as e:
    hf.load_hf_params(directory)
  assert "model.layers.0.mlp.up_proj.weight has dtype I8" in _one_line(e)


def test_error_missing_config(hf_model, tmp_path):
  directory = _copy(hf_model("llama")[0], tmp_path / "m")
  os.remove(os.path.join(directory, "config.json"))
  with pytest.raises(CheckpointError) as e:
    hf.load_hf_params(directory)
  assert "config.json not found" in _one_line(e)


def test_error_unexpected_tensor(hf_model, tmp_path):
  directory = _copy(hf_model("llama")[0], tmp_path / "m")
  _rewrite_tensor(directory, "model.layers.0.self_attn.o_proj.bias", np.zeros(64, np.float32))
  with pytest.raises(CheckpointError) as e:
    hf.load_hf_params(directory)
  assert "model.layers.0.self_attn.o_proj.bias" in _one_line(e)


_LLAMA = dict(TINY, architectures=["LlamaForCausalLM"])


@pytest.mark.parametrize("change, field", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type='dynamic'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=16, max_window_layers=1),
     "1 of 2 layers sliding"),
    (dict(architectures=["Qwen3ForCausalLM"]), "Qwen3ForCausalLM"),
    (dict(hidden_size=None), "'hidden_size' is missing"),
])
def test_error_unsupported_config(change, field):
  with pytest.raises(CheckpointError) as e:
    hf.hf_to_model_config({**_LLAMA, **change})
  assert field in _one_line(e)


def test_config_spellings():
  # transformers 4: rope_theta + rope_scaling {"type": ...}; transformers 5: rope_parameters.
  cfg = hf.hf_to_model_config({**_LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (5e5, "linear", 2.0)
  cfg = hf.hf_to_model_config({**_LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
  assert (cfg.rope_theta, cfg.rope_scaling) == (7.0, "none")
  cfg = hf.hf_to_model_config({**_LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": None,
                               "head_dim": 32}, scan_layers=False)
  assert (cfg.sliding_window, cfg.head_dim, cfg.scan_layers) == (0, 32, False)
  cfg = hf.hf_to_model_config({**_LLAMA, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
                               "sliding_window": 16, "max_window_layers": 0})
  assert cfg.sliding_window == 16
  with pytest.raises(ConfigError, match="unknown ModelConfig fields"):
    hf.hf_to_model_config(_LLAMA, d_modle=3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_config_to_hf_round_trip(variant):
  config_cls, extra = VARIANTS[variant]
  cfg = hf.hf_to_model_config(config_cls(**TINY, **extra).to_dict())
  assert hf.hf_to_model_config(hf.model_config_to_hf(cfg, "auto")) == cfg


def test_export_refuses_what_the_architecture_cannot_compute():
  cfg = hf.hf_to_model_config(_LLAMA)
  with pytest.raises(ConfigError, match="qkv_bias"):
    hf.model_config_to_hf(dataclasses.replace(cfg, qkv_bias=True), "LlamaForCausalLM")
  with pytest.raises(ConfigError, match="sliding_window"):
    hf.model_config_to_hf(dataclasses.replace(cfg, sliding_window=8), "LlamaForCausalLM")
  with pytest.raises(ConfigError, match="architecture"):
    hf.model_config_to_hf(cfg, "GPT2LMHeadModel")
