"""Chat templates: conversations -> text, and -> token ids with a loss mask.

  tok = load_tokenizer("path/to/hf_model_dir")
  chat = ChatTemplate.from_tokenizer(tok)    # its chat_template, or ChatML
  messages = [{"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}]
  chat.render_chat(messages)                 # the text the model sees
  chat.render_chat(messages[:1], add_generation_prompt=True)  # a prompt
  enc = chat.encode_chat(messages)           # for SFT / DPO
  enc.ids, enc.loss_mask                     # int32 arrays; mask 1 on the
                                             # assistant tokens only

Rendering follows transformers' `apply_chat_template`, so a model's template
gives the same string here: Jinja in an immutable sandbox, trim_blocks and
lstrip_blocks, the loopcontrols extension, `raise_exception(message)`,
`strftime_now(format)`, a `tojson` that keeps non-ASCII and key order, and the
variables `messages`, `add_generation_prompt`, `tools` and `documents` (None
unless given), every special token of the tokenizer (`bos_token`,
`eos_token`, ... see Tokenizer.special_tokens) and any keyword argument
(`enable_thinking=False`, ...). `{% generation %}` blocks render their body.
A tokenizer without a template (lmstack's own SentencePiece model) gets
`CHATML_TEMPLATE`; there the markers <|im_start|> and <|im_end|> are not
special tokens, so they encode as a few ordinary tokens, and a generation
loop must stop on the text <|im_end|>.

The loss mask, by rendering prefixes. For the assistant message i:
  before  = render(messages[:i], add_generation_prompt=True)
  through = render(messages[:i + 1])
and both must be prefixes of render(messages). The characters from
len(before) to len(through) are the assistant's turn; they are cut after the
last end-of-turn marker in them (the text of each `eos_ids` token, and
<|im_end|> for the fallback), so that a separator the template writes after
the marker (ChatML's newline) is not trained on: the model stops at the
marker. The whole text is then tokenized once, and a token is in the mask
when its first character is in an assistant span; the ids are exactly
tokenizer.encode(render(messages)), what apply_chat_template(tokenize=True)
gives. Limits:
  * a template that renders a conversation's earlier turns differently once
    later messages follow (e.g. one that drops the reasoning of past turns)
    has no consistent prefixes: encode_chat raises DataError;
  * if the generation prompt is not a prefix of the rendered turn (a
    template that ignores add_generation_prompt, or writes the prompt
    differently), the span starts right after the previous message, so the
    assistant header is trained on too;
  * a token that straddles a span boundary (rare: templates put special
    tokens or newlines around the content) belongs to the span it starts in;
  * rendering is quadratic in the number of assistant turns;
  * special-token text inside a message ("<|im_end|>") encodes as that token,
    as in transformers.
For SentencePiece tokenizers, the strings of their special tokens (e.g. a
template's bos_token "<s>") are split out of the text and encode as their
ids, as transformers' SentencePiece tokenizers do; SentencePiece itself would
encode them as plain text.

Every problem (a template that is not valid Jinja or that fails to render,
with the message of its raise_exception; an unknown role) is a one-line
lmstack.errors.DataError naming the template and the tokenizer file.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import datetime
import functools
import json
import re
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from lmstack.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, where: str, field: str):
  """DataError naming `where` unless `messages` is a non-empty list of
  {"role": str, "content": str} dicts (a chat as a data record holds it).

  Whether the roles are ones the template knows is checked when it renders.
  """
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: field {field!r} must be a non-empty list of messages, got "
                    f"{type(messages).__name__}")
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
      raise DataError(f"{where}: field {field!r}: message {i} is not a {{\"role\": str, \"content\": str}} dict: "
                      f"{_one_line(repr(m))[:80]}")


# ChatML (as in Qwen and SmolLM): every message is
# <|im_start|>{role}\n{content}<|im_end|>\n, the generation prompt opens an
# assistant turn. No bos: the caller adds one if the model wants it.
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
CHATML_END = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
  """A tokenized conversation.

  Attributes:
    text: the rendered conversation.
    ids: int32 token ids of `text` (with bos first when asked for).
    loss_mask: int32, 1 on the tokens of assistant turns, else 0.
    spans: the (start, end) character spans of the assistant turns in text.
  """

  text: str
  ids: np.ndarray
  loss_mask: np.ndarray
  spans: tuple[tuple[int, int], ...]


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: transformers' marker of
  assistant text for its own masks. We compute masks by prefixes, so the
  block just renders its body (without the tag a template would not parse).
  """

  tags = {"generation"}

  def parse(self, parser):
    next(parser.stream)  # The `generation` name token.
    return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _RaisedByTemplate(jinja2.TemplateError):
  """What the template's raise_exception(message) raises."""


def _raise_exception(message):
  raise _RaisedByTemplate(str(message))


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None,
            sort_keys=False):
  # Jinja's own tojson escapes <, >, & and ' for HTML and sorts keys; chat
  # templates (tool schemas) want the plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[jinja2.ext.loopcontrols, _GenerationTag],
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


class ChatTemplate:
  """A compiled chat template, with the tokenizer it encodes for.

  Pickles as its source (grain may send it to worker processes).

  Args:
    source: the Jinja source.
    tokenizer: a tokenizer from lmstack.data.tokenizer; gives the special
      token variables and end-of-turn markers, and is needed by encode_chat.
    special_tokens: more template variables (override the tokenizer's).
    end_markers: the texts that end an assistant turn (default: the tokens
      of tokenizer.eos_ids).
    roles: the roles a message may have.
    name: how errors name the template.
  """

  def __init__(
      self,
      source: str,
      *,
      tokenizer=None,
      special_tokens: Mapping[str, Any] | None = None,
      end_markers: Sequence[str] | None = None,
      roles: Sequence[str] = ROLES,
      name: str = "chat template",
  ):
    self.source = source
    self.tokenizer = tokenizer
    self.name = name
    self.roles = tuple(roles)
    self.special_tokens = dict(tokenizer.special_tokens) if tokenizer else {}
    self.special_tokens.update(special_tokens or {})
    if end_markers is None:
      end_markers = [tokenizer.id_to_piece(i) for i in tokenizer.eos_ids] if (
          tokenizer) else []
    self.end_markers = tuple(m for m in end_markers if m)
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise DataError(
          f"{name} is not a valid Jinja template ({_one_line(e.message)},"
          f" line {e.lineno})"
      ) from None

  @classmethod
  def from_tokenizer(
      cls, tokenizer, template_name: str | None = None, *,
      fallback: bool = True, **kwargs
  ) -> "ChatTemplate":
    """The tokenizer's chat template ("default" of several unless
    `template_name`), or CHATML_TEMPLATE when it has none and `fallback`."""
    where = f"tokenizer {tokenizer.name!r}"
    template = tokenizer.chat_template
    if isinstance(template, Mapping):
      key = template_name or "default"
      if key not in template:
        raise DataError(
            f"{where} has no chat template named {key!r} (it has"
            f" {', '.join(map(repr, template))})"
        )
      return cls(template[key], tokenizer=tokenizer,
                 name=f"chat template {key!r} of {where}", **kwargs)
    if template is not None:
      if template_name not in (None, "default"):
        raise DataError(
            f"{where} has a single chat template, not one named"
            f" {template_name!r}"
        )
      return cls(template, tokenizer=tokenizer,
                 name=f"chat template of {where}", **kwargs)
    if not fallback or template_name not in (None, "default"):
      raise DataError(
          f"{where} has no chat template (no chat_template in"
          " tokenizer_config.json, no chat_template.jinja)"
      )
    markers = [tokenizer.id_to_piece(i) for i in tokenizer.eos_ids]
    kwargs.setdefault("end_markers", markers + [CHATML_END])
    return cls(CHATML_TEMPLATE, tokenizer=tokenizer,
               name=f"built-in ChatML template (for {where})", **kwargs)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_template"]  # Compiled code: rebuilt from the source.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._template = _environment().from_string(self.source)

  def __repr__(self):
    return f"ChatTemplate({self.name})"

  # -- Rendering.

  def _check_messages(self, messages):
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(
        messages, Sequence):
      raise DataError(
          f"{self.name}: messages must be a list of"
          f" {{'role': ..., 'content': ...}} dicts, got"
          f" {type(messages).__name__}"
      )
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping) or "role" not in message:
        raise DataError(
            f"{self.name}: message {i} is not a dict with a 'role':"
            f" {_one_line(repr(message))[:80]}"
        )
      if message["role"] not in self.roles:
        raise DataError(
            f"{self.name}: message {i} has unknown role"
            f" {message['role']!r}; expected one of {', '.join(self.roles)}"
        )

  def _render(self, messages, add_generation_prompt: bool, kwargs) -> str:
    variables = dict(self.special_tokens)
    variables.update(tools=None, documents=None)
    variables.update(kwargs)
    variables.update(messages=list(messages),
                     add_generation_prompt=bool(add_generation_prompt))
    try:
      return self._template.render(**variables)
    except _RaisedByTemplate as e:
      raise DataError(f"{self.name} refused the conversation: {_one_line(e)}"
                      ) from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError,
            AttributeError, IndexError) as e:
      raise DataError(
          f"{self.name} failed to render ({type(e).__name__}:"
          f" {_one_line(e)})"
      ) from None

  def render_chat(
      self, messages: Sequence[Mapping[str, Any]],
      add_generation_prompt: bool = False, **kwargs
  ) -> str:
    """The conversation as text, plus an open assistant turn when
    `add_generation_prompt`. `kwargs` become template variables."""
    self._check_messages(messages)
    return self._render(messages, add_generation_prompt, kwargs)

  def assistant_spans(
      self, messages: Sequence[Mapping[str, Any]], **kwargs
  ) -> tuple[str, list[tuple[int, int]]]:
    """render_chat(messages) and the character span of each assistant turn,
    found by rendering prefixes (see the module docstring)."""
    self._check_messages(messages)
    full = self._render(messages, False, kwargs)
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      through = self._render(messages[:i + 1], False, kwargs)
      before = self._render(messages[:i], True, kwargs)
      if not through.startswith(before):
        before = self._render(messages[:i], False, kwargs)
      if not (full.startswith(through) and through.startswith(before)):
        raise DataError(
            f"{self.name}: cannot find assistant message {i} for the loss"
            " mask: the template renders the conversation up to it"
            " differently from the whole conversation"
        )
      start, end = len(before), len(through)
      turn = through[start:end]
      cuts = [turn.rfind(m) + len(m) for m in self.end_markers if m in turn]
      spans.append((start, start + max(cuts) if cuts else end))
    return full, spans

  def encode_chat(
      self, messages: Sequence[Mapping[str, Any]], *,
      add_bos: bool = False, **kwargs
  ) -> ChatEncoding:
    """Token ids of render_chat(messages) and a loss mask that is 1 exactly
    on the assistant turns (their content and end-of-turn marker).

    Args:
      messages: the conversation, [{"role": ..., "content": ...}, ...].
      add_bos: prepend the tokenizer's bos id (mask 0) unless the text
        already starts with it. Templates that want a bos write bos_token
        themselves (Llama, Gemma, Mistral); lmstack's pre-training puts bos
        before every document, so pass True for lmstack's own tokenizer.
      **kwargs: template variables.

    Returns:
      A ChatEncoding.
    """
    if self.tokenizer is None:
      raise DataError(f"{self.name}: encode_chat needs a tokenizer")
    text, spans = self.assistant_spans(messages, **kwargs)
    ids, offsets = self._encode_with_offsets(text)
    starts = np.asarray([o[0] for o in offsets], np.int64)
    mask = np.zeros(len(ids), bool)
    for start, end in spans:
      mask |= (starts >= start) & (starts < end)
    ids = np.asarray(ids, np.int32)
    bos = self.tokenizer.bos_id
    if add_bos and bos >= 0 and not (len(ids) and ids[0] == bos):
      ids = np.concatenate([np.asarray([bos], np.int32), ids])
      mask = np.concatenate([[False], mask])
    return ChatEncoding(text=text, ids=ids, loss_mask=mask.astype(np.int32),
                        spans=tuple(spans))

  def _encode_with_offsets(self, text):
    tok = self.tokenizer
    if tok.kind != "sentencepiece":
      return tok.encode_with_offsets(text)
    # SentencePiece never matches control pieces in text: split them out.
    specials = {}
    for value in self.special_tokens.values():
      for piece in value if isinstance(value, list) else [value]:
        if isinstance(piece, str) and piece and tok.piece_to_id(piece) >= 0:
          specials[piece] = tok.piece_to_id(piece)
    if not specials:
      return tok.encode_with_offsets(text)
    pattern = "|".join(
        re.escape(p) for p in sorted(specials, key=len, reverse=True))
    ids, offsets, pos = [], [], 0
    for match in re.finditer(pattern, text):
      part_ids, part_offsets = tok.encode_with_offsets(text[pos:match.start()])
      ids += part_ids
      offsets += [(a + pos, b + pos) for a, b in part_offsets]
      ids.append(specials[match.group()])
      offsets.append(match.span())
      pos = match.end()
    part_ids, part_offsets = tok.encode_with_offsets(text[pos:])
    ids += part_ids
    offsets += [(a + pos, b + pos) for a, b in part_offsets]
    return ids, offsets
