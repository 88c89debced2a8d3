"""Tests of Hugging Face tokenizers (lmstack/data/tokenizer.py) and chat
templates (lmstack/data/chat.py).

  python -m pytest tests/test_hf_tokenizer.py -q

The reference is independent of lmstack: a small byte-level BPE trained here
with the `tokenizers` package, Hugging Face model directories written by
hand (a ChatML and a Llama-3-style chat template), expected strings written
out in full, and, when transformers is installed, its tokenizer and
apply_chat_template on the same files.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmstack import assets
from lmstack.data import sources
from lmstack.data.chat import CHATML_TEMPLATE, ChatTemplate
from lmstack.data.tokenizer import (
    ENVELOPE_MAGIC, HFTokenizer, Tokenizer, load_tokenizer,
    tokenizer_from_bytes,
)
from lmstack.errors import DataError

SPECIALS = [
    "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
    "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>",
]
SPECIAL_ID = {t: i for i, t in enumerate(SPECIALS)}  # The trainer's order.
EMOJI = "\U0001f642"

# Written for these tests in the formats of Qwen (ChatML, with a default
# system message) and Llama 3 (bos first, headers, content trimmed, roles
# checked with raise_exception).
CHATML = (
    "{%- if messages[0]['role'] != 'system' %}\n"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
LLAMA3 = (
    "{%- for message in messages %}\n"
    "  {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "    {{- raise_exception('Llama 3 has no role ' + message['role']) }}\n"
    "  {%- endif %}\n"
    "  {%- set turn = '<|start_header_id|>' + message['role']"
    " + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}\n"
    "  {%- if loop.first %}{% set turn = bos_token + turn %}{% endif %}\n"
    "  {{- turn }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CONVERSATION = [
    {"role": "user", "content": "Who is Botchan?"},
    {"role": "assistant", "content": "A teacher from Tokyo."},
    {"role": "user", "content": "Where does he go?"},
    {"role": "assistant", "content": f"To a school\n\non Shikoku {EMOJI}."},
]


@pytest.fixture(scope="module")
def base_json():
  """A byte-level BPE (600 tokens) trained on ~100 KB of the corpus."""
  text = sources.read_text(assets.resolve(assets.DEFAULT_TRAIN_FILES))
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=600, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(text[:100_000].split("\n"), trainer)
  assert all(tok.token_to_id(t) == i for t, i in SPECIAL_ID.items())
  return tok.to_str()


def _write_model_dir(path, tokenizer_json, post_processor, **configs):
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  tok.post_processor = post_processor
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  for name, obj in configs.items():
    (path / f"{name}.json").write_text(json.dumps(obj), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, base_json):
  # GPT-2 style post-processing: trimmed offsets (encode_with_offsets must
  # not be fooled by them) and a bos that encode must not add.
  post = processors.Sequence([
      processors.ByteLevel(trim_offsets=True),
      processors.TemplateProcessing(single="<s> $A",
                                    special_tokens=[("<s>", 0)]),
  ])
  pad = {"__type": "AddedToken", "content": "<pad>", "lstrip": False,
         "normalized": False, "rstrip": False, "single_word": False}
  return _write_model_dir(
      tmp_path_factory.mktemp("hf") / "chatml", base_json, post,
      tokenizer_config={
          "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": pad,
          "unk_token": None, "add_bos_token": False, "chat_template": CHATML,
          "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
      },
  )


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, base_json):
  post = processors.TemplateProcessing(
      single="<|begin_of_text|> $A",
      special_tokens=[("<|begin_of_text|>", SPECIAL_ID["<|begin_of_text|>"])],
  )
  bos = {"__type": "AddedToken", "content": "<|begin_of_text|>",
         "lstrip": False, "normalized": False,
         "rstrip": False, "single_word": False, "special": True}
  eot, eot_text = SPECIAL_ID["<|eot_id|>"], SPECIAL_ID["<|end_of_text|>"]
  return _write_model_dir(
      tmp_path_factory.mktemp("hf") / "llama3", base_json, post,
      tokenizer_config={
          "bos_token": bos, "eos_token": "<|eot_id|>",
          "chat_template": [
              {"name": "default", "template": LLAMA3},
              {"name": "plain", "template": "{{ messages[0]['content'] }}"},
          ],
      },
      generation_config={"bos_token_id": 5, "eos_token_id": [eot_text, eot]},
      config={"bos_token_id": 5, "eos_token_id": eot_text},
  )


@pytest.fixture(scope="module")
def chatml(chatml_dir):
  return load_tokenizer(str(chatml_dir))


@pytest.fixture(scope="module")
def llama3(llama3_dir):
  return load_tokenizer(str(llama3_dir))


@pytest.fixture(scope="module")
def sp_default():
  return load_tokenizer(assets.DEFAULT_TOKENIZER)


def _runs(enc, tok):
  """The text of each run of consecutive masked tokens."""
  mask = np.concatenate([[0], enc.loss_mask, [0]])
  edges = np.flatnonzero(np.diff(mask))
  return [tok.decode(enc.ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


# -- Tokenizers.


def test_encode_decode_matches_tokenizers(chatml, chatml_dir):
  ref = tokenizers.Tokenizer.from_file(str(chatml_dir / "tokenizer.json"))
  docs = sources.text_documents(assets.resolve(assets.DEFAULT_EVAL_FILES))
  texts = docs[:20] + [f"  odd\n\ttext {EMOJI} 東京 <|im_start|>x<|im_end|>"]
  for text in texts:
    ids = chatml.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert chatml.decode(ids) == text
  assert ref.encode("Hi").ids[0] == 0 and chatml.encode("Hi")[0] != 0
  assert chatml.encode("<|im_start|>") == [SPECIAL_ID["<|im_start|>"]]
  # Untrimmed offsets (the ByteLevel post-processor trims spaces), which
  # tile an ASCII text.
  text = "a\n\n  b  to be<|im_end|>"
  ids, offsets = chatml.encode_with_offsets(text)
  assert ids == chatml.encode(text)
  assert "".join(text[a:b] for a, b in offsets) == text
  assert all(b == a for (_, b), (a, _) in zip(offsets, offsets[1:]))
  assert chatml.vocab_size == ref.get_vocab_size() == 600
  assert chatml.id_to_piece(4) == "<|im_end|>"
  assert chatml.piece_to_id("<|im_end|>") == 4
  assert chatml.piece_to_id("<nope>") == -1


def test_special_ids(chatml, llama3, chatml_dir):
  assert chatml.kind == "hf"
  assert (chatml.bos_id, chatml.eos_id, chatml.pad_id, chatml.unk_id) == (
      0, SPECIAL_ID["<|im_end|>"], SPECIAL_ID["<pad>"], -1)
  assert chatml.eos_ids == [SPECIAL_ID["<|im_end|>"]]
  assert chatml.special_tokens == {
      "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
  }
  # tokenizer_config's tokens win over the ids of the other two files, whose
  # eos ids all become stop tokens.
  assert llama3.bos_id == SPECIAL_ID["<|begin_of_text|>"]
  assert llama3.eos_id == SPECIAL_ID["<|eot_id|>"]
  assert llama3.eos_ids == [SPECIAL_ID["<|eot_id|>"],
                            SPECIAL_ID["<|end_of_text|>"]]
  assert llama3.pad_id == -1
  bare = load_tokenizer(str(chatml_dir / "tokenizer.json"))
  assert (bare.bos_id, bare.eos_id, bare.pad_id, bare.eos_ids) == (
      -1, -1, -1, [])
  assert bare.chat_template is None


def test_hf_bytes_and_pickle_round_trip(chatml, llama3, llama3_dir, tmp_path):
  text = f"To be, or not to be {EMOJI}<|eot_id|>"
  for tok in (chatml, llama3):
    blob = tok.to_bytes()
    assert blob.startswith(ENVELOPE_MAGIC)
    for again in (tokenizer_from_bytes(blob), pickle.loads(pickle.dumps(tok))):
      assert isinstance(again, HFTokenizer)
      assert again.encode(text) == tok.encode(text)
      assert again.to_bytes() == blob
      assert (again.bos_id, again.eos_ids, again.pad_id) == (
          tok.bos_id, tok.eos_ids, tok.pad_id)
      assert again.chat_template == tok.chat_template
  # The bytes depend on the files only: loading again gives the same bytes.
  assert load_tokenizer(str(llama3_dir)).to_bytes() == llama3.to_bytes()
  (tmp_path / "tok.bin").write_bytes(llama3.to_bytes())
  assert load_tokenizer(str(tmp_path / "tok.bin")).eos_ids == llama3.eos_ids


def test_sentencepiece_bytes_stay_compatible(sp_default, tmp_path):
  raw = open(assets.resolve(assets.DEFAULT_TOKENIZER), "rb").read()
  # A checkpoint's stored proto loads through the new entry point ...
  tok = tokenizer_from_bytes(raw)
  assert isinstance(tok, Tokenizer) and tok.to_bytes() == raw
  assert sp_default.to_bytes() == raw == Tokenizer.load(
      assets.DEFAULT_TOKENIZER).to_bytes()
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (2, 3, 0, [3])
  assert tok.special_tokens["eos_token"] == "</s>"
  # ... and so does a Hugging Face directory with only tokenizer.model, which
  # stays raw bytes; with a tokenizer_config it becomes an envelope.
  (tmp_path / "bare").mkdir()
  shutil.copy(assets.resolve(assets.DEFAULT_TOKENIZER),
              tmp_path / "bare/tokenizer.model")
  assert load_tokenizer(str(tmp_path / "bare")).to_bytes() == raw
  shutil.copytree(tmp_path / "bare", tmp_path / "cfg")
  (tmp_path / "cfg/tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ 'x' }}"}))
  (tmp_path / "cfg/generation_config.json").write_text(
      json.dumps({"eos_token_id": [3, 1]}))
  cfg = load_tokenizer(str(tmp_path / "cfg"))
  assert cfg.kind == "sentencepiece" and cfg.to_bytes().startswith(
      ENVELOPE_MAGIC)
  assert cfg.eos_ids == [3, 1] and cfg.pad_id == 0  # The proto's.
  for again in (tokenizer_from_bytes(cfg.to_bytes()),
                Tokenizer.from_bytes(cfg.to_bytes()),
                pickle.loads(pickle.dumps(cfg))):
    assert isinstance(again, Tokenizer)
    assert again.to_bytes() == cfg.to_bytes()
    assert again.chat_template == "{{ 'x' }}" and again.eos_ids == [3, 1]
    assert again.encode("To be") == sp_default.encode("To be")


# -- Chat templates.


def test_chatml_render(chatml):
  chat = ChatTemplate.from_tokenizer(chatml)
  assert chat.render_chat(CONVERSATION) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\nWho is Botchan?<|im_end|>\n"
      "<|im_start|>assistant\nA teacher from Tokyo.<|im_end|>\n"
      "<|im_start|>user\nWhere does he go?<|im_end|>\n"
      f"<|im_start|>assistant\nTo a school\n\non Shikoku {EMOJI}.<|im_end|>\n"
  )
  system = [{"role": "system", "content": "Be brief."}, CONVERSATION[0]]
  assert chat.render_chat(system, add_generation_prompt=True) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n"
      "<|im_start|>user\nWho is Botchan?<|im_end|>\n"
      "<|im_start|>assistant\n"
  )


def test_llama3_render(llama3):
  chat = ChatTemplate.from_tokenizer(llama3)  # "default" of the list.
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi!"},
      {"role": "assistant", "content": "  Hello there.\n"},
  ]
  expected = (
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
      "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
      "Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
      "Hello there.<|eot_id|>"
  )
  assert chat.render_chat(messages) == expected
  assert chat.render_chat(messages, add_generation_prompt=True) == (
      expected + "<|start_header_id|>assistant<|end_header_id|>\n\n")
  plain = ChatTemplate.from_tokenizer(llama3, "plain")
  assert plain.render_chat(messages) == "Be brief."


def test_loss_mask_chatml(chatml):
  chat = ChatTemplate.from_tokenizer(chatml)
  enc = chat.encode_chat(CONVERSATION)
  assert enc.ids.dtype == enc.loss_mask.dtype == np.int32
  assert enc.ids.tolist() == chatml.encode(chat.render_chat(CONVERSATION))
  assert _runs(enc, chatml) == [
      m["content"] + "<|im_end|>" for m in CONVERSATION
      if m["role"] == "assistant"
  ]
  # Everything else (headers, user turns, the newline after <|im_end|>) is
  # context only.
  unmasked = chatml.decode(enc.ids[enc.loss_mask == 0])
  assert "Tokyo" not in unmasked and "Who is Botchan?" in unmasked
  assert enc.ids[enc.loss_mask == 0][-1] == chatml.encode("\n")[0]
  # A conversation without an assistant turn trains on nothing.
  assert not chat.encode_chat(CONVERSATION[:1]).loss_mask.any()


def test_loss_mask_llama3(llama3):
  chat = ChatTemplate.from_tokenizer(llama3)
  messages = [{"role": "system", "content": "Be brief."}] + [
      dict(m, content=f" {m['content']} ") for m in CONVERSATION]
  enc = chat.encode_chat(messages, add_bos=True)
  assert enc.ids[0] == llama3.bos_id and (enc.ids == llama3.bos_id).sum() == 1
  assert _runs(enc, llama3) == [  # The template trims the content.
      m["content"].strip() + "<|eot_id|>" for m in messages
      if m["role"] == "assistant"
  ]


def test_loss_mask_fallback_on_sentencepiece(sp_default):
  chat = ChatTemplate.from_tokenizer(sp_default)
  assert chat.source == CHATML_TEMPLATE
  assert chat.render_chat(CONVERSATION[:2], add_generation_prompt=False) == (
      "<|im_start|>user\nWho is Botchan?<|im_end|>\n"
      "<|im_start|>assistant\nA teacher from Tokyo.<|im_end|>\n")
  enc = chat.encode_chat(CONVERSATION, add_bos=True)
  assert enc.ids[0] == sp_default.bos_id == 2 and enc.loss_mask[0] == 0
  assert enc.ids[1:].tolist() == sp_default.encode(enc.text)
  assert _runs(enc, sp_default) == [
      m["content"] + "<|im_end|>" for m in CONVERSATION
      if m["role"] == "assistant"
  ]
  again = pickle.loads(pickle.dumps(chat))
  assert again.encode_chat(CONVERSATION, add_bos=True).ids.tolist() == (
      enc.ids.tolist())


def test_sentencepiece_template_special_tokens(sp_default):
  # A Llama-2-style template writes bos_token/eos_token as text; they must
  # encode as the control ids, which SentencePiece alone would not do.
  chat = ChatTemplate(
      "{% for m in messages %}{% if m['role'] == 'user' %}"
      "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
      "{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}",
      tokenizer=sp_default,
  )
  enc = chat.encode_chat(CONVERSATION[:2])
  assert enc.text == ("<s>[INST] Who is Botchan? [/INST] A teacher from"
                      " Tokyo. </s>")
  assert enc.ids[0] == 2 and enc.ids[-1] == 3 and 2 not in enc.ids[1:]
  assert _runs(enc, sp_default) == [" A teacher from Tokyo. "]  # </s>: ""
  assert enc.loss_mask[-1] == 1


def test_template_features():
  chat = ChatTemplate(
      "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
      "{% endif %}{% generation %}{{ m['content'] | tojson }}"
      "{% endgeneration %}{% endfor %}{{ greeting }}"
  )
  messages = [{"role": "system", "content": "x"},
              {"role": "user", "content": "東京 <b>"}]
  assert chat.render_chat(messages, greeting="!") == '"東京 <b>"!'


def test_matches_transformers(chatml, llama3, chatml_dir, llama3_dir):
  transformers = pytest.importorskip("transformers")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(chatml_dir / "tokenizer.json"))
  for text in ["To be, or not to be", f"  odd\n\t{EMOJI} <|im_end|>x"]:
    assert fast.encode(text, add_special_tokens=False) == chatml.encode(text)
  for tok, path in ((chatml, chatml_dir), (llama3, llama3_dir)):
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    chat = ChatTemplate.from_tokenizer(tok)
    for messages, gen in ((CONVERSATION, False), (CONVERSATION[:3], True)):
      expected = hf.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=gen)
      assert chat.render_chat(messages, add_generation_prompt=gen) == expected
      if not gen:
        ids = hf(expected, add_special_tokens=False)["input_ids"]
        assert chat.encode_chat(messages).ids.tolist() == ids
    if tok is llama3:  # Its raise_exception, as test_errors sees it.
      tool = CONVERSATION[:1] + [{"role": "tool", "content": "{}"}]
      with pytest.raises(Exception, match="Llama 3 has no role tool"):
        hf.apply_chat_template(tool, tokenize=False)


# -- Errors.


def _one_line_error(fn, match):
  with pytest.raises(DataError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)


def test_errors(tmp_path, base_json, llama3, llama3_dir):
  _one_line_error(lambda: load_tokenizer(str(tmp_path / "missing")),
                  "tokenizer not found.*missing")
  (tmp_path / "empty").mkdir()
  _one_line_error(lambda: load_tokenizer(str(tmp_path / "empty")),
                  "empty.*holds no tokenizer.json or tokenizer.model")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "tokenizer.json").write_text(base_json[:len(base_json) // 2])
  _one_line_error(lambda: load_tokenizer(str(broken)),
                  "broken/tokenizer.json.*not a valid Hugging Face")
  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
  _one_line_error(lambda: load_tokenizer(str(tmp_path / "tokenizer.json")),
                  "tokenizer.json.*not a valid Hugging Face")
  cfg = shutil.copytree(llama3_dir, tmp_path / "cfg")
  (cfg / "tokenizer_config.json").write_text('{"bos_token": ')
  _one_line_error(lambda: load_tokenizer(str(cfg)),
                  "cfg/tokenizer_config.json.*unreadable")
  (cfg / "tokenizer_config.json").write_text('{"pad_token": "<nope>"}')
  _one_line_error(lambda: load_tokenizer(str(cfg)),
                  "tokenizer_config.json: pad_token '<nope>' is not in")
  _one_line_error(lambda: tokenizer_from_bytes(ENVELOPE_MAGIC + b"{oops"),
                  "damaged header")

  chat = ChatTemplate.from_tokenizer(llama3)
  where = f"chat template 'default' of tokenizer '{llama3_dir}'"
  bad_role = CONVERSATION[:1] + [{"role": "bot", "content": "hi"}]
  _one_line_error(lambda: chat.render_chat(bad_role),
                  f"{where}: message 1 has unknown role 'bot'")
  tool = CONVERSATION[:1] + [{"role": "tool", "content": "{}"}]
  _one_line_error(lambda: chat.encode_chat(tool),
                  "refused the conversation: Llama 3 has no role tool")
  _one_line_error(lambda: chat.render_chat("hi"), "must be a list")
  _one_line_error(lambda: ChatTemplate.from_tokenizer(llama3, "nope"),
                  "no chat template named 'nope'")
  _one_line_error(lambda: ChatTemplate("{% for %}", name="t.jinja"),
                  "t.jinja is not a valid Jinja template")
  _one_line_error(lambda: ChatTemplate("{{ 1 + messages }}").render_chat([]),
                  "failed to render")
  _one_line_error(
      lambda: ChatTemplate.from_tokenizer(load_tokenizer(
          str(llama3_dir / "tokenizer.json")), fallback=False),
      "has no chat template")
