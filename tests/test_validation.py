"""Input validation: every bad config value and data record is one line naming the field or file.

  python -m pytest -q tests/test_validation.py      # ~1 min on 2 CPU cores
  LMSTACK_HYPOTHESIS_EXAMPLES=2000 python -m pytest -q tests/test_validation.py -k random   # a longer search

Table tests pin the message of each bad value; property tests (hypothesis) feed
random config overrides and random data files to the code that reads them and
require an LmstackError or success, never another exception and never a hang.
"""

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import threading
from unittest import mock

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from configs import anneal, dpo, lora, pretrain, sft
from lmstack.data import datasets, mixture, pipeline
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.model.transformer import PRESETS
from lmstack.train import build, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fixed set of examples in CI; LMSTACK_HYPOTHESIS_EXAMPLES=2000 searches further (new random examples each run).
_EXAMPLES = int(os.environ.get("LMSTACK_HYPOTHESIS_EXAMPLES", "0"))
PROPERTY = settings(max_examples=_EXAMPLES or 50, deadline=None, derandomize=not _EXAMPLES, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(pretrain.get_config().data.tokenizer)


def _override(config, path, value):
  """`config` with `path` ("optim.lr") set to `value`, past ConfigDict's type safety, as a config file can."""
  d = config.to_dict()
  node = d
  *parents, leaf = path.split(".")
  for key in parents:
    node = node[key]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


def _check(config):
  """What `trainer.run` checks before it builds anything."""
  trainer.validate(config, build.model_config(config), 8)


class _ReachedModel(Exception):
  pass


def _run_until_model(config, workdir):
  """trainer.run up to building the model: validation, mesh, rules, batch split, tokenizer, optimizer."""
  with mock.patch.object(trainer.build_lib, "build", side_effect=_ReachedModel):
    try:
      trainer.run(config, str(workdir))
    except _ReachedModel:
      pass


def _first_batches(ds, n=1, timeout=60):
  """The first `n` batches of `ds`, failing (not hanging) when none comes within `timeout` s."""
  out = {}

  def pull():
    try:
      it = iter(ds)
      out["batches"] = [b for _, b in zip(range(n), it)]
    except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
      out["error"] = e

  worker = threading.Thread(target=pull, daemon=True)
  worker.start()
  worker.join(timeout)
  assert not worker.is_alive(), f"no batch after {timeout} s: the data iterator spins"
  if "error" in out:
    raise out["error"]
  return out["batches"]


# ---------------------------------------------------------------------------
# Config values: each refused with one line naming the field


_BAD_VALUES = [
    ("train.steps", 2.5, "config.train.steps=2.5; expected an integer >= 1"),
    ("train.steps", True, "config.train.steps=True; expected an integer >= 1"),
    ("train.steps", None, "config.train.steps=None; expected an integer >= 1"),
    ("train.batch_size", 0, "config.train.batch_size=0; expected an integer >= 1"),
    ("train.seq_len", 1, "config.train.seq_len=1; expected an integer >= 2"),
    ("train.grad_accum_steps", 0, "config.train.grad_accum_steps=0; expected an integer >= 1"),
    ("train.log_every", 0, "config.train.log_every=0; expected an integer >= 1"),
    ("train.eval_every", -1, "config.train.eval_every=-1; expected an integer >= 0"),
    ("train.eval_batches", -1, "config.train.eval_batches=-1; expected an integer >= 0"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every=0; expected an integer >= 1"),
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints=0; expected an integer >= 1"),
    ("train.peak_flops", math.nan, "config.train.peak_flops=nan; expected a finite number"),
    ("train.tensorboard", "yes", "config.train.tensorboard='yes'; expected true or false"),
    ("optim.lr", -1e-3, "config.optim.lr=-0.001; expected a finite number >= 0"),
    ("optim.lr", math.inf, "config.optim.lr=inf; expected a finite number >= 0"),
    ("optim.lr", "1e-3", "config.optim.lr='1e-3'; expected a finite number >= 0"),
    ("optim.warmup_steps", 10, "optim.warmup_steps=10 must not exceed the 4 training steps"),
    ("optim.warmup_steps", -1, "config.optim.warmup_steps=-1; expected an integer >= 0"),
    ("optim.grad_clip", -1.0, "config.optim.grad_clip=-1.0; expected a finite number >= 0"),
    ("optim.b1", 1.0, "config.optim.b1=1.0; expected a number in [0, 1)"),
    ("optim.b2", -0.1, "config.optim.b2=-0.1; expected a number in [0, 1)"),
    ("optim.eps", 0.0, "config.optim.eps=0.0; expected a number > 0"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay=-0.1; expected a finite number >= 0"),
    ("optim.min_lr_ratio", 2.0, "config.optim.min_lr_ratio=2.0; expected a number in [0, 1]"),
    ("optim.decay_fraction", 1.5, "config.optim.decay_fraction=1.5; expected a number in [0, 1]"),
    ("optim.schedule", "exp", "optim.schedule='exp'; expected cosine, wsd, linear or constant"),
    ("optim.decay_shape", "cubic", "config.optim.decay_shape='cubic'; expected linear, 1-sqrt or cosine"),
    ("model.d_model", "64", "model.d_model='64'; expected an integer"),
    ("model.n_heads", 0, "model.n_heads=0; expected an integer >= 1"),
    ("model.n_kv_heads", 0, "model.n_kv_heads=0; expected an integer >= 1"),
    ("model.n_kv_heads", 3, "model.n_heads=4 is not a multiple of model.n_kv_heads=3"),
    ("model.n_layers", 0, "model.n_layers=0; expected an integer >= 1"),
    ("model.head_dim", -4, "model.head_dim=-4; expected an integer >= 0"),
    ("model.mlp_dim", -1, "model.mlp_dim=-1; expected an integer >= 1"),
    ("model.dtype", "float13", "model.dtype='float13'; expected one of bfloat16, float32, float16"),
    ("model.dtype", "int8", "model.dtype='int8'; expected one of bfloat16, float32, float16"),
    ("model.rope_theta", 0.0, "model.rope_theta=0.0; expected a number > 0"),
    ("model.norm_eps", -1e-5, "model.norm_eps=-1e-05; expected a number > 0"),
    ("model.scan_layers", "no", "model.scan_layers='no'; expected true or false"),
    ("model.max_seq_len", 32, "config.train.seq_len=64 exceeds config.model.max_seq_len=32"),
    ("mesh.shape", (0, -1, 1), "config.mesh.shape=(0, -1, 1); expected 3 integers"),
    ("mesh.shape", ("a", -1, 1), "config.mesh.shape=('a', -1, 1); expected 3 integers"),
    ("mesh.shape", "(1,-1,1)", "config.mesh.shape='(1,-1,1)'; expected 3 integers"),
    ("mesh.shape", (1, -1, 2, 1, 1), "config.mesh.shape=(1, -1, 2, 1, 1); expected 3 integers (data, fsdp, tensor) "
     "or 4 (data, fsdp, sequence, tensor)"),
    ("frozen_dtype", "bfloat16", "config.frozen_dtype='bfloat16'; expected 'auto' (frozen matmul weights in "
     "model.dtype) or 'float32'"),
    ("mesh.rules", [("embed", 3)], "config.mesh.rules=[('embed', 3)]; expected fsdp, fsdp_tp, dp or a list"),
    ("seed", 1.5, "config.seed=1.5; expected a 64-bit integer"),
    ("seed", 2**64, "config.seed=18446744073709551616; expected a 64-bit integer"),
    ("init_from", 3, "config.init_from=3; expected a string"),
    ("loss", "mse", "config.loss='mse'; expected one of ['dpo', 'next_token']"),
    ("trainable", "(", "config.trainable='(' is not a regular expression"),
    ("data.kind", "images", "config.data.kind='images'; expected one of"),
    ("data.jsonl_field", 5, "config.data.jsonl_field=5; expected a string"),
    ("data.tokenizer", "", "config.data.tokenizer=''; expected a tokenizer path"),
]


@pytest.mark.parametrize("path,value,message", _BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in _BAD_VALUES])
def test_bad_config_value_is_one_line(path, value, message):
  config = _override(pretrain.get_config("runlocal"), path, value)
  with pytest.raises(ConfigError) as e:
    _check(config)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("make,path,value,message", [
    (lambda: sft.get_config("method=lora,runlocal"), "peft.rank", "8", "peft.rank='8'; expected an integer"),
    (lambda: sft.get_config("method=lora,runlocal"), "peft.rank", 0, "peft.rank=0 must be >= 1"),
    (lambda: dpo.get_config("runlocal"), "dpo.beta", "x", "config.dpo.beta='x'; expected a number > 0"),
    (lambda: dpo.get_config("runlocal"), "dpo.label_smoothing", 0.7, "config.dpo.label_smoothing=0.7; expected"),
    (lambda: sft.get_config("runlocal"), "data.separator", None, "config.data.separator=None; expected a string"),
])
def test_bad_stage_value_is_one_line(make, path, value, message):
  with pytest.raises(ConfigError) as e:
    _check(_override(make(), path, value))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_every_stage_config_passes(tmp_path):
  """The control: the shipped stage configs are valid as they are."""
  for config in (pretrain.get_config("runlocal"), pretrain.get_config(), sft.get_config("runlocal"),
                 lora.get_config("runlocal"), dpo.get_config("runlocal"), dpo.get_config("method=lora,runlocal"),
                 _anneal_config(tmp_path)):
    _check(config)


@pytest.mark.parametrize("changes,message", [
    (dict(mesh__shape=(2, 2, 1)), "mesh.shape=(2, 2, 1) needs 4 devices, found 8"),
    (dict(mesh__shape=(3, -1, 1)), "mesh.shape=(3, -1, 1) does not divide the 8 devices"),
    (dict(train__batch_size=12), "batch_size=12 / grad_accum_steps=1 is not divisible by the 8 devices"),
    (dict(train__batch_size=16, train__grad_accum_steps=4), "is not divisible by the 8 devices"),
    (dict(train__grad_accum_steps=3), "batch_size=8 is not a multiple of config.train.grad_accum_steps=3"),
    (dict(model__vocab_size=1000), "has 8192 pieces but config.model.vocab_size=1000"),
])
def test_mesh_batch_and_vocab_against_the_run(tmp_path, changes, message):
  config = pretrain.get_config("runlocal")
  for key, value in changes.items():
    config = _override(config, key.replace("__", "."), value)
  with pytest.raises(LmstackError) as e:
    _run_until_model(config, tmp_path)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_command_line_prints_one_line(tmp_path):
  cmd = [sys.executable, "-m", "lmstack.main", "--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path}",
         "--config.optim.b2=1.5"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == ["error: config.optim.b2=1.5; expected a number in [0, 1)"]


def test_model_config_from_a_checkpoint_or_import_is_checked():
  """ModelConfig itself refuses what cannot be a model (a checkpoint's meta, a config.json)."""
  from lmstack.model.transformer import ModelConfig
  for bad, message in [(dict(n_heads=0), "model.n_heads=0"), (dict(vocab_size=2.0), "model.vocab_size=2.0"),
                       (dict(d_model=66, head_dim=0), "model.d_model=66 is not a multiple of model.n_heads=4"),
                       (dict(peft={"method": "lora", "rank": "4"}), "peft.rank='4'"),
                       (dict(peft=[1]), "model.peft=[1]"),
                       (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), "must exceed")]:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
      ModelConfig(**{**dataclasses.asdict(PRESETS["tiny"]), **bad})


# ---------------------------------------------------------------------------
# Data records


def _write(path, data):
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return str(path)


def _lm(files, fmt):
  config = pretrain.get_config("runlocal")
  config.data.update(format=fmt, train_files=files, eval_files=files)
  return config.data


def _sft(files, messages=False):
  config = sft.get_config("data=jsonl,runlocal")
  config.data.update(train_files=files, eval_files=files, messages_field="messages" if messages else "")
  return config.data


def _pref(files):
  config = dpo.get_config("data=jsonl,runlocal")
  config.data.update(train_files=files, eval_files=files)
  return config.data


def _batches(data, tok, seq_len=32, batch_size=2):
  """The first train batch and the first eval batches of `data`, through the stage's builder."""
  out = []
  for split in ("train", "eval"):
    ds = datasets.make_dataset(data, tok, seq_len=seq_len, batch_size=batch_size, seed=0, split=split)
    out += _first_batches(ds, n=1 if split == "train" else 3)
  return out


@pytest.mark.parametrize("line,message", [
    ('{"n": ' + "9" * 5000 + ', "text": "a"}', "lm.jsonl:1: not valid JSON (Exceeds the limit"),
    ("[" * 100_000, "lm.jsonl:1: not valid JSON (maximum recursion depth"),
    ('"text"', "lm.jsonl:1: expected a JSON object, got str"),
])
def test_jsonl_lines_json_cannot_hold(tmp_path, tok, line, message):
  files = _write(tmp_path / "lm.jsonl", line + "\n")
  with pytest.raises(DataError, match=message.replace("(", r"\(")):
    _batches(_lm(files, "jsonl"), tok)


def test_lone_surrogates_are_replaced_with_a_warning(tmp_path, tok, caplog):
  files = _write(tmp_path / "lm.jsonl", '{"text": "to be \\ud800 or not"}\n' * 4)
  with caplog.at_level(logging.WARNING):
    [batch, *_] = _batches(_lm(files, "jsonl"), tok)
  assert "\ufffd" in tok.decode(batch["inputs"][0].tolist())
  assert any("lm.jsonl: 4 lone surrogate escapes replaced" in r.getMessage() for r in caplog.records)
  sft_files = _write(tmp_path / "sft.jsonl", '{"prompt": "a\\udc80", "response": "b \\ud83d"}\n')
  assert _batches(_sft(sft_files), tok)


def test_sft_without_a_response_token_in_seq_len_is_an_error_not_a_hang(tmp_path, tok):
  files = _write(tmp_path / "sft.jsonl", json.dumps({"prompt": "word " * 100, "response": "ok"}) + "\n")
  with pytest.raises(DataError, match="sft.jsonl: no example of the train split has a response token"):
    _batches(_sft(files), tok)
  chat = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
  files = _write(tmp_path / "chat.jsonl", chat + "\n")
  with pytest.raises(DataError, match="chats without an assistant turn"):
    _batches(_sft(files, messages=True), tok)


@pytest.mark.parametrize("messages,message", [
    ([1, 2], "chat.jsonl:1: field 'messages': message 0 is not a"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "message 0 is not a"),
    ("hello", "chat.jsonl:1: field 'messages' must be a non-empty list of messages, got str"),
    ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}], "chat.jsonl:1: .*unknown role"),
])
def test_bad_chats_name_the_line(tmp_path, tok, messages, message):
  files = _write(tmp_path / "chat.jsonl", json.dumps({"messages": messages}) + "\n")
  with pytest.raises(DataError, match=message):
    _batches(_sft(files, messages=True), tok)


def test_documents_without_a_token_are_an_error_not_a_hang(tmp_path):
  class Silent:  # a tokenizer that encodes everything to nothing (e.g. one that drops control characters)
    bos_id, eos_id, vocab_size = 2, 3, 8

    def encode(self, text):
      del text
      return []

  files = _write(tmp_path / "ctrl.txt", "\x01\x02\n\n\x03\n")
  with pytest.raises(DataError, match="no document of the train split .*ctrl.txt.* has a token"):
    pipeline.make_lm_dataset(_lm(files, "text"), Silent(), seq_len=8, batch_size=2, seed=0)


def test_bad_mixture_fields(tmp_path):
  config = _anneal_config(tmp_path)
  tok = load_tokenizer(config.data.tokenizer)
  for path, value, message in [("data.sources.wordnet.weight", "x", "data.sources.wordnet.weight='x' must be"),
                               ("data.sources.wordnet.train_files", None, "train_files=None; expected a string"),
                               ("data.holdout_every", "20", "data.holdout_every='20'; expected an integer")]:
    with pytest.raises(ConfigError, match=message):
      mixture.make_mixture_dataset(_override(config, path, value).data, tok, seq_len=32, batch_size=2, seed=0)


# ---------------------------------------------------------------------------
# Property: random config overrides


def _anneal_config(tmp_path):
  """configs/anneal.py from a checkpoint that has only its meta (all a config reads)."""
  root = tmp_path / "source"
  if not root.exists():
    source = pretrain.get_config("runlocal")
    meta_dir = root / "checkpoints" / "4" / "meta"
    meta_dir.mkdir(parents=True)
    meta = {"config": source.to_dict(), "model": dataclasses.asdict(PRESETS["tiny"])}
    (meta_dir / "metadata").write_text(json.dumps(meta))
  return anneal.get_config(f"init_from={root},runlocal")


def _leaf_items(tree, prefix=""):
  """[(dotted path, value)] of a nested dict's leaves."""
  out = []
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out += _leaf_items(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


_VALUES = st.one_of(
    st.integers(-3, 3), st.integers(-2**63, 2**63), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=12),
    st.sampled_from(["bfloat16", "float32", "wsd", "constant", "lora", "prefix", "jsonl", "sft", "preference",
                     "mixture", "dpo", "copy", "precomputed", "fsdp_tp", ".*", "", "-1", "nowhere/*.txt"]),
    st.lists(st.integers(-2, 9), max_size=4).map(tuple), st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2),
)
_STAGES = ("pretrain", "anneal", "sft", "lora", "dpo")


def _like(value):
  """Values of the type a field already has, near its value: mostly plausible, sometimes out of range."""
  if isinstance(value, bool):
    return st.booleans()
  if isinstance(value, int):
    return st.integers(-2, 2 * abs(value) + 2)
  if isinstance(value, float):
    return st.floats(-0.5, 2 * abs(value) + 1) | st.sampled_from([0.0, 1.0, value])
  return _VALUES


@pytest.fixture(scope="module")
def stage_configs(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  return {"pretrain": pretrain.get_config("runlocal"), "anneal": _anneal_config(root),
          "sft": sft.get_config("runlocal"), "lora": lora.get_config("runlocal"),
          "dpo": dpo.get_config("runlocal")}


@PROPERTY
@given(data=st.data())
def test_random_config_overrides_pass_or_raise_lmstack_errors(stage_configs, tmp_path, data):
  stage = data.draw(st.sampled_from(_STAGES), label="stage")
  config = stage_configs[stage]
  leaves = dict(_leaf_items(config.to_dict()))
  for path in data.draw(st.lists(st.sampled_from(sorted(leaves)), min_size=1, max_size=2, unique=True), label="paths"):
    value = data.draw(st.one_of(_like(leaves[path]), _like(leaves[path]), _VALUES), label=path)
    config = _override(config, path, value)
  try:
    _run_until_model(config, tmp_path / "run")
    t = config.train
    if t.batch_size * t.seq_len > 1 << 14:  # valid, but too big to build here
      event("accepted (not built)")
      return
    tok = load_tokenizer(config.data.tokenizer)
    ds = datasets.make_dataset(config.data, tok, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed)
    _first_batches(ds)
    event("accepted, a batch built")
  except LmstackError as e:
    event(f"refused: {type(e).__name__}")
    assert "\n" not in str(e)


# ---------------------------------------------------------------------------
# Property: random bytes as a data file


_TEXT = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from("\ud800\udc80\x00\n{}[]\":,"), max_size=40)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=8)
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "wizard", 3]),
                                  "content": _TEXT | st.integers()})
_CHAT = st.tuples(_TEXT, _TEXT).map(lambda qa: [{"role": "user", "content": qa[0]},
                                                {"role": "assistant", "content": qa[1]}])


def _junk(fields):
  """JSON objects with the stage's fields holding random values (often the wrong type), random keys, any JSON."""
  return st.one_of(
      st.fixed_dictionaries({f: st.one_of(_TEXT, _JSON, st.lists(_MESSAGE, max_size=3)) for f in fields}),
      st.dictionaries(st.sampled_from(fields) | _TEXT, _JSON, max_size=3),
      _JSON)


def _file_bytes(good, fields):
  """A file of lines, mostly records of the right shape (`good`, random text), some junk, or random bytes."""
  dump = lambda r: st.sampled_from([json.dumps(r).encode(),  # lone surrogates as \ud800 escapes
                                    json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")])
  junk = st.one_of(_junk(fields).flatmap(dump), st.binary(max_size=40),
                   _TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")))
  line = st.one_of(*[good.flatmap(dump)] * 6, junk)
  return st.one_of(*[st.lists(line, min_size=1, max_size=6).map(b"\n".join)] * 4, st.binary(max_size=200))


_KINDS = {  # kind: (data config of a file, records of the right shape, the fields)
    "text": (lambda f: _lm(f, "text"), st.fixed_dictionaries({"text": _TEXT}), ["text"]),
    "lm_jsonl": (lambda f: _lm(f, "jsonl"), st.fixed_dictionaries({"text": _TEXT}), ["text"]),
    "sft": (_sft, st.fixed_dictionaries({"prompt": _TEXT, "response": _TEXT}), ["prompt", "response"]),
    "sft_chat": (lambda f: _sft(f, messages=True), st.fixed_dictionaries({"messages": _CHAT}), ["messages"]),
    "preference": (_pref, st.fixed_dictionaries({"prompt": _TEXT, "chosen": _TEXT | _CHAT, "rejected": _TEXT}),
                   ["prompt", "chosen", "rejected"]),
}


@PROPERTY
@given(data=st.data())
def test_random_data_files_build_batches_or_name_the_file(tmp_path, tok, data):
  kind = data.draw(st.sampled_from(sorted(_KINDS)), label="kind")
  make, good, fields = _KINDS[kind]
  path = tmp_path / f"random-{kind}.data"
  path.write_bytes(data.draw(_file_bytes(good, fields), label="bytes"))
  try:
    batches = _batches(make(str(path)), tok)
  except DataError as e:
    event(f"{kind}: refused")
    assert path.name in str(e) and "\n" not in str(e), str(e)
  else:
    event(f"{kind}: batches built")
    assert all(np.all(b["inputs"] >= 0) for b in batches)
