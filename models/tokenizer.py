"""Tokenizer and chat template, built from GGUF metadata with `tokenizers` and `jinja2`.

`IncrementalDetokenizer` turns a growing list of ids into text deltas that never end inside a
multi-byte UTF-8 character, so a stream can be printed as it is produced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers

# GGUF token types (llama.cpp's `llama_token_type`).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_SPACE = "\u2581"  # sentencepiece's visible space


def _byte_level(individual_digits: bool) -> pre_tokenizers.PreTokenizer:
  """GPT-2 byte-level splitting; llama.cpp's "smollm" also splits every digit on its own."""
  steps = [pre_tokenizers.Digits(individual_digits=True)] if individual_digits else []
  steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
  return pre_tokenizers.Sequence(steps)


# GGUF `tokenizer.ggml.pre` -> the equivalent `tokenizers` pre-tokenizer.
PRE_TOKENIZERS = {
  "smollm": lambda: _byte_level(individual_digits=True),
  "gpt-2": lambda: _byte_level(individual_digits=False),
  "default": lambda: _byte_level(individual_digits=False),
}


class Tokenizer:
  """encode / decode / apply_chat_template with the special tokens of the model."""

  def __init__(
    self,
    hf: tokenizers.Tokenizer,
    *,
    bos_token_id: int | None,
    eos_token_id: int | None,
    add_bos: bool,
    chat_template: str | None,
  ):
    self.hf = hf
    self.bos_token_id, self.eos_token_id, self.add_bos = bos_token_id, eos_token_id, add_bos
    self.bos_token = None if bos_token_id is None else hf.id_to_token(bos_token_id)
    self.eos_token = None if eos_token_id is None else hf.id_to_token(eos_token_id)
    self.chat_template = chat_template
    self._template = None if chat_template is None else _compile_template(chat_template)

  @classmethod
  def from_gguf(cls, f) -> Tokenizer:
    """Builds the tokenizer from a `models.gguf_loader.GGUFFile`'s metadata: GPT-2 style
    byte-level BPE (`gpt2`) or sentencepiece BPE (`llama`: Llama 2, Mistral, Gemma)."""
    kind = f.require("tokenizer.ggml.model")
    tokens = f.require("tokenizer.ggml.tokens")
    types = f.meta("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
      hf = _byte_level_bpe(f, tokens)
    elif kind == "llama":
      hf = _sentencepiece_bpe(f, tokens, types)
    else:
      raise ValueError(f"{f.path.name}: tokenizer model {kind!r} is not supported yet")
    # Control tokens are special (skipped when decoding for display); user-defined ones are
    # ordinary text, but like them matched whole before the model's own splitting.
    specials = [
      AddedToken(t, special=ty == _CONTROL, normalized=False)
      for t, ty in zip(tokens, types, strict=True)
      if ty in (_CONTROL, _USER_DEFINED)
    ]
    hf.add_tokens(specials)
    bos, eos = f.meta("tokenizer.ggml.bos_token_id"), f.meta("tokenizer.ggml.eos_token_id")
    return cls(
      hf,
      bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos),
      add_bos=bool(f.meta("tokenizer.ggml.add_bos_token", False)),
      chat_template=f.meta("tokenizer.chat_template"),
    )

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ids = self.hf.encode(text, add_special_tokens=False).ids
    if add_special_tokens and self.add_bos and self.bos_token_id is not None:
      ids = [self.bos_token_id, *ids]
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
    self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
  ) -> str:
    if self._template is None:
      raise ValueError("this model has no chat template")
    if not messages:
      raise ValueError("messages: a conversation needs at least one message")
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"messages[{i}]: each message needs 'role' and 'content'")
    try:
      return self._template.render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "",
        eos_token=self.eos_token or "",
      )
    except jinja2.exceptions.TemplateError as e:  # e.g. the template's own raise_exception
      raise ValueError(f"messages: the chat template refused them: {e}") from None


def _byte_level_bpe(f, tokens: list[str]) -> tokenizers.Tokenizer:
  pre = f.meta("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"{f.path.name}: unknown pre-tokenizer {pre!r}")
  merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
  bpe = tokenizers.models.BPE(
    vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False
  )
  hf = tokenizers.Tokenizer(bpe)
  hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
  hf.decoder = decoders.ByteLevel()
  return hf


def _sentencepiece_bpe(f, tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
  """Sentencepiece BPE as llama.cpp runs it: spaces become U+2581, and adjacent pieces merge
  best score first; a character outside the vocabulary falls back to its <0xNN> bytes.

  GGUF stores scores, not merges, so the merges are derived: every split of a normal piece into
  two normal pieces is a merge, ranked by the merged piece's score."""
  scores = f.require("tokenizer.ggml.scores")
  vocab = {t: i for i, t in enumerate(tokens)}
  normal = [ty == _NORMAL for ty in types]
  merges = []
  for i, piece in enumerate(tokens):
    if not normal[i]:
      continue
    for cut in range(1, len(piece)):
      left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
      if left is not None and right is not None and normal[left] and normal[right]:
        merges.append((-scores[i], i, piece[:cut], piece[cut:]))
  merges.sort()
  unk = f.meta("tokenizer.ggml.unknown_token_id")
  bpe = tokenizers.models.BPE(
    vocab=vocab,
    merges=[(left, right) for *_, left, right in merges],
    unk_token=None if unk is None else tokens[int(unk)],
    fuse_unk=True,
    byte_fallback=True,
  )
  hf = tokenizers.Tokenizer(bpe)
  decode = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if f.meta("tokenizer.ggml.add_space_prefix", True):  # Llama 2, Mistral: "▁" before the text
    hf.pre_tokenizer = pre_tokenizers.Metaspace(_SPACE, prepend_scheme="first", split=False)
    decode.append(decoders.Strip(" ", 1, 0))
  else:  # Gemma
    hf.normalizer = normalizers.Replace(" ", _SPACE)
  hf.decoder = decoders.Sequence(decode)
  return hf


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
  # The same environment HF transformers renders chat templates in.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
  env.globals["raise_exception"] = _raise
  return env.from_string(source)


class IncrementalDetokenizer:
  """Text deltas for a stream of ids. A delta is held back while the text decoded so far ends
  in U+FFFD, i.e. inside a multi-byte character split across tokens."""

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
    self.tokenizer, self.skip_special = tokenizer, skip_special_tokens
    self.ids: list[int] = []
    self.text = ""  # everything emitted so far
    self._prefix = 0  # ids before this index are settled; decoding restarts here for context
    self._prefix_text = ""

  def add(self, token_ids: Sequence[int]) -> str:
    self.ids.extend(token_ids)
    window = self.tokenizer.decode(self.ids[self._prefix :], self.skip_special)
    if window.endswith("\ufffd"):
      return ""
    delta = window[len(self._prefix_text) :]
    # Settle all but the last few ids: decoding stays O(1) per token and BPE byte-level
    # merges never reach back further than a character's worth of bytes.
    if len(self.ids) - self._prefix > 8:
      self._prefix = len(self.ids) - 4
      self._prefix_text = self.tokenizer.decode(self.ids[self._prefix :], self.skip_special)
    else:
      self._prefix_text = window
    self.text += delta
    return delta
