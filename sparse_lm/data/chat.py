"""Chat templates, rendered as transformers renders them, and chat data with
the loss on the assistant turns only.

A checkpoint's chat template (its chat_template.jinja, else the
chat_template of tokenizer_config.json: HuggingFaceTokenizer.chat_template)
is Jinja run the way transformers' apply_chat_template runs it (its
utils/chat_template_utils.py): a sandboxed environment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that keeps
non-ASCII and HTML characters, `strftime_now`, the `{% generation %}` tag, and
as variables the messages, `add_generation_prompt`, `tools` and `documents`
(None) and the named special tokens' text (bos_token, eos_token, ...). The
rendered text is tokenized without added special tokens (the template holds
its own), as apply_chat_template(tokenize=True) does.

`data.dataset = "chat:FILE.jsonl"` ("chat:DIR": DIR/<split>.jsonl, splits as
for sft:, sparse_lm/data/sft.py): one {"messages": [{"role", "content"}, ...]}
object per line, any number of turns. Each conversation is rendered whole and
the loss counts the tokens of the assistant turns only: those overlapping an
assistant span of the rendered text (transformers' rule for
return_assistant_tokens_mask). The spans are the template's own `{% generation
%}` blocks when it has them; otherwise, for each assistant message, what
rendering the conversation up to it adds after rendering the conversation
before it with the generation prompt (its content and end-of-turn token:
"Hi<|im_end|>" in ChatML, trailing whitespace left out). That needs a template
that renders a conversation as a prefix of its continuations; one that rewrites
earlier turns (Qwen3's drops their reasoning) is refused, one line naming the
file and line, until it gets generation tags. Examples are then packed with
segment ids as sft: examples are.
"""

from __future__ import annotations

import datetime
import functools
import json
import re

from sparse_lm.errors import ConfigError

# Marks a {% generation %} block's output in the rendered text (private-use
# code points: a message holding them is refused).
_OPEN, _CLOSE = "\ue000", "\ue001"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
  """The template failed or refused the conversation (its raise_exception)."""


@functools.lru_cache(maxsize=8)
def _compile(source: str):
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  class Generation(ext.Extension):
    """{% generation %}...{% endgeneration %}: its output, between markers."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
      return _OPEN + caller() + _CLOSE

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise TemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from e


def render_marked(
  template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = False
) -> str:
  """The rendered text, with any {% generation %} output between markers."""
  import jinja2  # pylint: disable=g-import-not-at-top

  messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
  try:
    return _compile(template).render(
      **special_tokens,
      messages=messages,
      tools=None,
      documents=None,
      add_generation_prompt=add_generation_prompt,
    )
  except jinja2.exceptions.TemplateError as e:
    raise TemplateError(f"the chat template refuses it: {e}") from None


def render(
  template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = False
) -> str:
  """apply_chat_template(messages, tokenize=False, add_generation_prompt=...)."""
  text = render_marked(template, messages, special_tokens, add_generation_prompt)
  return text.replace(_OPEN, "").replace(_CLOSE, "")


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
  """The text without markers, and the [start, end) spans they enclosed."""
  out, spans, at, start = [], [], 0, None
  for piece in re.split(f"([{_OPEN}{_CLOSE}])", text):
    if piece == _OPEN:
      start = at
    elif piece == _CLOSE:
      if start is not None and at > start:
        spans.append((start, at))
      start = None
    else:
      out.append(piece)
      at += len(piece)
  return "".join(out), spans


def assistant_spans(
  template: str, messages: list[dict], special_tokens: dict
) -> tuple[str, list[tuple[int, int]]]:
  """The rendered conversation and the [start, end) character spans of its
  assistant turns (the module docstring says which characters)."""
  marked = render_marked(template, messages, special_tokens)
  text, spans = _unmark(marked)
  if _GENERATION_TAG.search(template):
    return text, spans
  spans = []
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    before = render(template, messages[:i], special_tokens, add_generation_prompt=True)
    upto = render(template, messages[: i + 1], special_tokens)
    if not (upto.startswith(before) and text.startswith(upto)):
      raise TemplateError(
        f"the chat template does not render the conversation up to message {i + 1} as a "
        "prefix of the whole (it rewrites earlier turns): give it {% generation %} tags"
      )
    spans.append((len(before), len(before) + len(upto[len(before) :].rstrip())))
  return text, spans


def encode(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
  """Tokens of the rendered conversation and, per token, whether it is an
  assistant token (it overlaps an assistant span)."""
  text, spans = assistant_spans(tok.chat_template, messages, tok.special_tokens)
  ids, offsets = tok.encode_with_offsets(text)
  mask, s = [False] * len(ids), 0
  for t, (start, end) in enumerate(offsets):
    while s < len(spans) and start >= spans[s][1]:
      s += 1
    if s == len(spans):
      break
    mask[t] = end > spans[s][0]
  return ids, mask


def encode_prompt(tok, messages: list[dict]) -> list[int]:
  """Tokens of a conversation rendered with the generation prompt, to decode
  the assistant's next turn from (apply_chat_template(add_generation_prompt=True))."""
  text = render(tok.chat_template, messages, tok.special_tokens, add_generation_prompt=True)
  return tok.encode(text, add_special_tokens=False)


def check_messages(ex) -> str | None:
  """Why a chat example is malformed, or None."""
  msgs = ex.get("messages") if isinstance(ex, dict) else None
  if not isinstance(msgs, list) or not msgs:
    return "no non-empty 'messages' list"
  for i, m in enumerate(msgs, 1):
    if not isinstance(m, dict):
      return f"message {i} is not an object"
    for k in ("role", "content"):
      if not isinstance(m.get(k), str):
        return f"message {i} has no string {k!r}"
    if _OPEN in m["content"] or _CLOSE in m["content"]:
      return f"message {i} holds the private-use characters U+E000 / U+E001"
  if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
    return "no assistant message with content (nothing to train on)"
  return None


def template_of(tok, dataset: str) -> str:
  """tok's chat template, or a one-line error naming data.dataset."""
  t = getattr(tok, "chat_template", None)
  if not t:
    folder = getattr(tok, "path", "the tokenizer")
    raise ConfigError(
      f"config.data.dataset={dataset!r} needs a chat template: {folder}'s folder has no "
      "chat_template.jinja and its tokenizer_config.json no chat_template"
    )
  return t
