"""Tokenizer ids, chat template and streaming detokenization against the reference."""

import random

import pytest

from meshserve.engine.output import TextStream
from meshserve.models import IncrementalDetokenizer


def test_encode_matches_reference(model, golden):
  for j in range(golden.ntok):
    text = str(golden[f"tok{j}_text"])
    assert model.tokenizer.encode(text) == golden[f"tok{j}_ids"].tolist(), text


def test_decode_roundtrip(model, golden):
  for j in range(golden.ntok):
    text = str(golden[f"tok{j}_text"])
    assert model.tokenizer.decode(golden[f"tok{j}_ids"].tolist()) == text


def test_chat_template_text_and_ids(model, golden):
  chat = golden.chat_cases()
  assert len(chat) == len(golden["chat_text"])
  for i, expected_text in zip(chat, golden["chat_text"], strict=True):
    text = model.tokenizer.apply_chat_template(golden.messages(i), add_generation_prompt=True)
    assert text == str(expected_text)
    assert model.tokenizer.encode(text) == golden[f"{i}_ids"].tolist()


def test_greedy_text_decodes_like_reference(model, golden):
  for i in range(golden.n):
    assert model.tokenizer.decode(golden[f"{i}_greedy"].tolist()) == str(golden[f"{i}_greedy_text"])


def test_chat_template_rejects_bad_messages(model):
  with pytest.raises(ValueError, match="messages"):
    model.tokenizer.apply_chat_template([])
  with pytest.raises(ValueError, match=r"messages\[0\]"):
    model.tokenizer.apply_chat_template([{"content": "no role"}])


def test_incremental_detokenizer_never_splits_a_character(model, golden):
  ids = golden["tok3_ids"].tolist()  # CJK and emoji: characters spread over several tokens
  detok = IncrementalDetokenizer(model.tokenizer)
  deltas = [detok.add([t]) for t in ids]
  assert all("\ufffd" not in d for d in deltas)
  assert sum(1 for d in deltas if d == "") >= 2  # some tokens ended mid-character
  assert "".join(deltas) == str(golden["tok3_text"])


def test_incremental_detokenizer_long_stream(model):
  text = "Streaming text — with ümlauts, 数字 and 🎉 emoji — over many tokens. " * 8
  ids = model.tokenizer.encode(text)
  detok = IncrementalDetokenizer(model.tokenizer)
  assert "".join(detok.add([t]) for t in ids) == text


def _stream(model, text, stop):
  s = TextStream(model.tokenizer, stop)
  deltas = []
  for t in model.tokenizer.encode(text):
    deltas.append(s.add(t))
    if s.stopped:
      break
  deltas.append(s.flush())
  return s, deltas


def test_stop_string_across_tokens_is_cut_and_never_shown(model):
  text = "The answer is: red, blue, and yellow. Done."
  s, deltas = _stream(model, text, ("blue, and",))
  assert s.stopped and s.text == "The answer is: red, "
  assert "".join(deltas) == s.text
  assert all("blue" not in d for d in deltas)


def test_held_back_prefix_is_released_when_no_stop_follows(model):
  s, deltas = _stream(model, "one two three", ("two four",))
  assert not s.stopped and s.text == "one two three" and "".join(deltas) == s.text


class _Chars:
  """A detokenizer whose tokens are single characters: TextStream's matching on its own."""

  def __init__(self):
    self.text = ""

  def add(self, ids):
    self.text += "".join(map(chr, ids))


def test_stop_matching_equals_a_plain_search_on_random_text(model):
  """Whatever the stop strings (overlapping, repetitive, prefixes of each other) and however
  the text arrives, the stream shows exactly the text before the earliest stop string, and
  holds back exactly the longest end of the text that a stop string could still complete."""
  rng = random.Random(0)
  for _ in range(2000):
    stops = tuple(
      "".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))
    )
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
    s = TextStream(model.tokenizer, stops)
    s.detok = _Chars()
    shown = ""
    for i, ch in enumerate(text):
      shown += s.add(ord(ch))
      seen = text[: i + 1]
      hits = [seen.find(x) for x in stops if x in seen]
      if hits:
        assert s.stopped and shown == seen[: min(hits)], (stops, seen, shown)
        break
      assert not s.stopped and seen.startswith(shown), (stops, seen, shown)
      could_complete = [
        n for n in range(1, len(seen) + 1) if any(x.startswith(seen[-n:]) for x in stops)
      ]
      assert len(seen) - len(shown) == max(could_complete, default=0), (stops, seen, shown)
    else:
      assert shown + s.flush() == text
