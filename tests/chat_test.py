"""Chat templates and chat data (sparse_lm/data/chat.py), generate --chat, the
stop ids of generation_config.json, and the tokenizer fixes (a pad that is the
eos, special tokens after the text). The golden values come from transformers
(tests/fixtures/hf/make_fixtures.py: the olmoe fixture's ChatML template and
chat_golden.json); neither torch nor transformers is needed here."""

import json
import pathlib
import shutil
import sys

from helpers import in_process
import numpy as np
import pytest
import tokenizers

from sparse_lm import config as cfglib
from sparse_lm import convert
from sparse_lm.data import chat
from sparse_lm.data import pipeline
from sparse_lm.data import sft
from sparse_lm.data import tokenizer as toklib
from sparse_lm.errors import ConfigError

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf" / "olmoe"
GOLDEN = json.loads((FIX / "chat_golden.json").read_text(encoding="utf-8"))
CONV = GOLDEN["conversation"]  # system, then 3 user / assistant turns


def fixture_tok(folder=FIX):
  return toklib.HuggingFaceTokenizer(str(folder / "tokenizer.json"), 320)


def chat_cfg(path, tokenizer_file=FIX / "tokenizer.json", seq_len=128, batch_size=2):
  c = cfglib.base_config()
  d = c.data
  d.dataset, d.tokenizer, d.tokenizer_file = f"chat:{path}", "huggingface", str(tokenizer_file)
  d.vocab_size, d.seq_len, d.batch_size, d.eval_split = 320, seq_len, batch_size, str(path)
  d.num_streams = 1
  return c


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


# ------------------------------------------------------------------ rendering


def test_the_fixture_tokenizer_has_its_template_specials_and_stop_ids():
  tok = fixture_tok()
  assert tok.chat_template == GOLDEN["chatml"]  # from chat_template.jinja
  assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
  assert tok.eos_id == 2 and tok.stop_ids == (2, 260)  # generation_config.json's list


@pytest.mark.parametrize(
  "name", ["chatml", "chatml_tagged", "qwen1.5", "mixtral_style", "features"]
)
def test_templates_render_as_transformers_renders_them(name):
  """apply_chat_template(tokenize=False), with and without the generation
  prompt: special tokens, raise_exception, tojson (no HTML escaping, non-ASCII
  kept), loop controls, namespace, trim_blocks / lstrip_blocks."""
  tok = fixture_tok()
  if name in ("chatml", "chatml_tagged"):
    template, want = GOLDEN[name], {"rendered": GOLDEN["rendered"]}
    conv = CONV
  else:
    g = GOLDEN["templates"][name]
    template, want = g["template"], g
    conv = [m for m in CONV if m["role"] != "system"] if name == "mixtral_style" else CONV
  assert chat.render(template, conv, tok.special_tokens) == want["rendered"]
  if "rendered_generation_prompt" in want:
    got = chat.render(template, conv[:-1], tok.special_tokens, add_generation_prompt=True)
    assert got == want["rendered_generation_prompt"]


def test_a_template_that_raises_is_a_template_error():
  template = GOLDEN["templates"]["mixtral_style"]["template"]
  with pytest.raises(chat.TemplateError, match="refuses it: Conversation roles must alternate"):
    chat.render(template, CONV, {})  # a system turn first
  with pytest.raises(chat.TemplateError, match="does not parse"):
    chat.render("{% if %}", CONV, {})


# ------------------------------------------------------------------ assistant tokens


@pytest.mark.parametrize("template", ["chatml", "chatml_tagged"])
def test_three_turns_mask_exactly_the_assistant_tokens(template, monkeypatch):
  """The tokens and assistant mask of the 3-turn conversation equal
  transformers' (apply_chat_template(return_assistant_tokens_mask=True) with
  the tagged template): found from the untagged template by rendering each
  turn with and without it, or from the tags. Read back through the offsets,
  the masked tokens are exactly each assistant turn's content and <|im_end|>."""
  tok = fixture_tok()
  monkeypatch.setattr(tok, "chat_template", GOLDEN[template])
  ids, mask = chat.encode(tok, CONV)
  assert ids == GOLDEN["input_ids"]
  assert [int(m) for m in mask] == GOLDEN["assistant_masks"]
  text = GOLDEN["rendered"]
  _, offsets = tok.encode_with_offsets(text)
  runs, cur = [], None
  for m, (s, e) in zip(mask, offsets):
    if m:
      cur = (cur[0], e) if cur else (s, e)
    elif cur:
      runs.append(text[cur[0] : cur[1]])
      cur = None
  runs += [text[cur[0] : cur[1]]] if cur else []
  assert runs == [m["content"] + "<|im_end|>" for m in CONV if m["role"] == "assistant"]


def test_a_template_that_rewrites_earlier_turns_is_refused():
  """Without generation tags the spans need each prefix of the conversation
  to render as a prefix of the whole; a template that drops earlier turns'
  text (as Qwen3's drops their reasoning) is refused, naming the way out."""
  rewriting = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
    "{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
  )
  with pytest.raises(chat.TemplateError, match=r"rewrites earlier turns.*generation %\} tags"):
    chat.assistant_spans(rewriting, CONV, {})


def test_chat_sft_packs_conversations_with_loss_on_assistant_tokens(tmp_path):
  """data.dataset="chat:FILE": each conversation's tokens and assistant mask,
  packed with segment ids; a target is weighted iff it is an assistant token
  of its own conversation."""
  short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
  path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, {"messages": short}] * 2)
  c = chat_cfg(path, seq_len=320)
  cfglib.validate(c)
  tok = fixture_tok()
  inp = pipeline.make_input(c.data, seed=0, process_index=0, process_count=1)
  assert inp.fingerprint["dataset"] == f"chat:{path}" and inp.fingerprint["examples"] == 4
  b = next(inp)
  seg, w = b["segment_ids"], b["weights"]
  seen = 0
  for r in range(len(seg)):
    for s in set(seg[r][seg[r] > 0].tolist()):
      at = np.flatnonzero(seg[r] == s)
      ids, mask = chat.encode(tok, CONV if len(at) > 40 else short)
      assert b["inputs"][r, at].tolist() == ids[: len(at)]
      k = min(len(at), len(ids) - 1)  # inputs whose target is in this conversation
      want = np.zeros(len(at), np.float32)
      want[:k] = mask[1 : k + 1]
      np.testing.assert_array_equal(w[r, at], want)
      seen += 1
  assert seen >= 2 and (w > 0).any()
  batches = pipeline.eval_batches(c.data, 1, process_index=0, process_count=1)
  assert batches[0]["weights"].sum() > 0


@pytest.mark.parametrize(
  "line, needle",
  [
    ('{"prompt": "x", "response": "y"}', "no non-empty 'messages' list"),
    ('{"messages": [{"role": "user"}]}', "message 1 has no string 'content'"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
    ("not json", "not JSON"),
  ],
)
def test_bad_chat_lines_name_the_dataset_file_and_line(tmp_path, line, needle):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"messages": CONV}) + "\n" + line + "\n")
  with pytest.raises(ConfigError, match=rf"data\.dataset chat: {path}:2: {needle}"):
    sft.read_examples(str(path), str(path), "chat")


def test_a_conversation_the_template_refuses_names_the_file_and_line(tmp_path, monkeypatch):
  tok = fixture_tok()
  monkeypatch.setattr(tok, "chat_template", GOLDEN["templates"]["mixtral_style"]["template"])
  path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}])
  c = chat_cfg(path)
  with pytest.raises(ConfigError, match=rf"data\.dataset chat: {path}:1: .*roles must alternate"):
    sft.encode(sft.read_examples(str(path), str(path), "chat"), tok, c.data, str(path))


def test_chat_needs_a_huggingface_tokenizer_with_a_template(tmp_path):
  c = chat_cfg(tmp_path / "x.jsonl")
  c.data.tokenizer, c.data.tokenizer_file, c.data.tokenizer_dataset = "byte", "", "stdlib"
  with pytest.raises(ConfigError, match=r"data\.dataset=.*needs data\.tokenizer='huggingface'"):
    cfglib.validate(c)
  plain = tmp_path / "plain"
  shutil.copytree(FIX, plain)
  (plain / "chat_template.jinja").unlink()
  with pytest.raises(ConfigError, match="needs a chat template"):
    chat.template_of(fixture_tok(plain), "chat:x.jsonl")


# ------------------------------------------------------------------ generate --chat


def test_generate_chat_gives_transformers_tokens_and_stops_at_the_eos_list(tmp_path, monkeypatch):
  """An imported checkpoint carries its tokenizer files (chat_template.jinja
  included) both ways; generate --chat renders the prompt as
  apply_chat_template(add_generation_prompt=True) and decodes greedily the
  tokens transformers' generate gave, stopping where it stopped: at
  <|im_end|>, an eos of generation_config.json only (the tokenizer's is </s>)."""
  g = GOLDEN["generate"]
  tok = fixture_tok()
  assert chat.encode_prompt(tok, [{"role": "user", "content": g["message"]}]) == g["prompt_ids"]
  wd = tmp_path / "run"
  convert.import_checkpoint(str(FIX), str(wd), say=lambda *a: None)
  for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
    assert (wd / "hf" / name).read_bytes() == (FIX / name).read_bytes(), name
  out = tmp_path / "out.jsonl"
  args = [sys.executable, "-m", "sparse_lm.generate", f"--workdir={wd}", "--chat", "--mesh=one"]
  args += [f"--prompt={g['message']}", f"--max_new_tokens={g['max_new_tokens']}", f"--output={out}"]
  p = in_process(args, monkeypatch=monkeypatch)
  assert p.returncode == 0, p.stderr[-2000:]
  row = json.loads(out.read_text())
  assert g["stopped"] and g["generated"][-1] == 260 and len(g["generated"]) < g["max_new_tokens"]
  assert row["tokens"] == g["generated"][:-1]  # the stop token ends the row, unrecorded
  exported = tmp_path / "exported"
  convert.export_checkpoint(str(wd), str(exported), say=lambda *a: None)
  for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
    assert (exported / name).read_bytes() == (FIX / name).read_bytes(), name


def test_generate_chat_without_a_template_is_one_line(tmp_path, monkeypatch):
  plain = tmp_path / "plain"
  shutil.copytree(FIX, plain)
  (plain / "chat_template.jinja").unlink()
  convert.import_checkpoint(str(plain), str(tmp_path / "run"), say=lambda *a: None)
  args = [sys.executable, "-m", "sparse_lm.generate", f"--workdir={tmp_path / 'run'}", "--chat"]
  p = in_process(args + ["--prompt=hi", "--mesh=one"], monkeypatch=monkeypatch)
  assert p.returncode == 1 and "--chat: the run's tokenizer has no chat template" in p.stderr


# ------------------------------------------------------------------ tokenizer fixes


def test_stop_ids_read_generation_config_as_int_or_list(tmp_path):
  d = tmp_path / "tok"
  shutil.copytree(FIX, d)
  for eos, want in ((7, (7,)), ([2, 5], (2, 5)), (None, (2,))):
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert fixture_tok(d).stop_ids == want
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
  with pytest.raises(ConfigError, match="generation_config.json: eos_token_id='</s>'"):
    fixture_tok(d)


def test_an_eos_that_is_also_the_pad_stays_a_target(tmp_path):
  """Qwen's base tokenizers name <|endoftext|> as both pad and eos: every
  document's end-of-text target keeps its weight (packing never pads). It
  was weighted 0 wherever the target was the pad id."""
  d = tmp_path / "tok"
  shutil.copytree(FIX, d)
  cfg = json.loads((d / "tokenizer_config.json").read_text())
  (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "</s>"}))
  tok = fixture_tok(d)
  assert tok.pad_id == tok.eos_id == 2
  for i in range(20):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i}: short.\n")
  c = cfglib.base_config().data
  c.dataset, c.tokenizer, c.tokenizer_file = (
    f"files:{tmp_path}/*.txt",
    "huggingface",
    str(d / "tokenizer.json"),
  )
  c.vocab_size, c.seq_len, c.batch_size, c.num_streams, c.data_dir = 320, 32, 2, 1, str(tmp_path)
  b = next(pipeline.make_input(c, seed=0, process_index=0, process_count=1))
  assert (b["targets"] == 2).sum() >= 2
  assert (b["weights"] == 1).all()


def test_special_tokens_after_the_text_are_not_taken_for_a_prefix(tmp_path):
  """A tokenizer whose post-processor puts </s> after every text: encode("")
  is [<s>, </s>], which was taken for the prefix, so an SFT response lost its
  first token; and one that adds only </s> made </s> the exported bos."""
  t = tokenizers.Tokenizer.from_file(str(FIX / "tokenizer.json"))
  for single, prefix, suffix in (("<s> $A </s>", (1,), (2,)), ("$A </s>", (), (2,))):
    t.post_processor = tokenizers.processors.TemplateProcessing(
      single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    d = tmp_path / single.replace(" ", "_").replace("$", "")
    shutil.copytree(FIX, d)
    t.save(str(d / "tokenizer.json"))
    tok = fixture_tok(d)
    assert (tok.prefix_ids, tok.suffix_ids) == (prefix, suffix)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q: 1+1?\n", "response": "2, it is."}])
    c = cfglib.base_config().data
    c.dataset, c.seq_len = f"sft:{path}", 64
    [(toks, loss)], _ = sft.encode(sft.read_examples(str(path), str(path)), tok, c, str(path))
    plain = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert toks.tolist() == [*prefix, *plain("Q: 1+1?\n"), *plain("2, it is."), 2]
    assert toks[loss].tolist() == [*plain("2, it is."), 2]
