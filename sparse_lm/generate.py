r"""Sample text from a run's checkpoint (KV-cache decoding, sparse_lm/decode.py).

  python -m sparse_lm.generate --workdir=runs/switch_tiny --prompt="def fib(n):" \
      --max_new_tokens=64 --temperature=0.8 --top_p=0.95
  python -m sparse_lm.generate --workdir=runs/switch_tiny --prompts=prompts.jsonl \
      --output=completions.jsonl --expert_choices
  python -m sparse_lm.generate --workdir=runs/qwen3 --chat --prompt="Who wrote Emma?"

Prompts: --prompt (repeatable), and/or --prompts: a text file (one prompt per
line) or a .jsonl file (objects with a "prompt" field). They decode as one
batch (left-padded; each row as it would alone). Greedy by default
(--temperature=0); --top_k / --top_p restrict the sampled set; --seed fixes
the draw. A row stops at the end-of-text token (every eos_token_id of an imported checkpoint's
generation_config.json: a chat model's end of turn too) or at any --stop string.
--chat: each prompt is one user message, rendered by the checkpoint's chat
template with the generation prompt (as transformers' apply_chat_template(...,
add_generation_prompt=True)), so the model answers it as its assistant.
Uses the run's own config and tokenizer; MoE layers decode without dropping
(model.moe.decode_dispatch). Prints each completion and the tokens/s; with
--output, one JSON line per prompt (prompt, completion, tokens, and with
--expert_choices the experts each generated token was routed to, per MoE layer).
--speculative (a run trained with model.mtp_depth >= 1, DeepSeek-V3's
multi-token prediction): each step the first MTP module drafts the next
token and the main model verifies it in the same cached forward, so a step
gives 1 or 2 tokens, exactly greedy decoding's; prints the drafts accepted.

An encoder-decoder run (model.arch="encoder_decoder"; issue 30):

  python -m sparse_lm.generate --workdir=runs/translate --prompt="Save and add another" \
      --src_lang=en --tgt_lang=de
  python -m sparse_lm.generate --workdir=runs/switch_t5 --prompt="def <extra_id_0>(n):"

each prompt is a source, laid out as the run's data lays out its sources
(data/seq2seq.py's encode_pair): with the run's NLLB language tokens (a
seq2seq run whose pairs have languages: --src_lang and --tgt_lang, required
there) [src_lang] source </s>, the decoder started at </s> with [tgt_lang]
forced; T5's source </s> and start 0 otherwise (a span corruption run's
prompt may hold T5's sentinels <extra_id_k>). The encoder runs once, the
decoder decodes with its caches (decode.seq2seq_generate), greedy or
sampled as above, and each row stops at end-of-text or --max_new_tokens;
prints each source and its target text. --chat, --expert_choices and
--speculative are decoder-only.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from sparse_lm import cli
from sparse_lm.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS = flags.DEFINE_string("prompts", None, "A .txt (one per line) or .jsonl file of prompts.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop a row at this text (repeatable).")
_OUTPUT = flags.DEFINE_string("output", None, "Write one JSON line per prompt here.")
_CHAT = flags.DEFINE_bool(
  "chat", False, "Each prompt is a user message in the tokenizer's chat template."
)
_EXPERTS = flags.DEFINE_bool("expert_choices", False, "Record each token's experts in --output.")
_SPECULATIVE = flags.DEFINE_bool(
  "speculative",
  False,
  "Self-speculative greedy decoding: a run trained with model.mtp_depth >= 1 drafts "
  "with its first MTP module, the main model verifies (the same tokens as greedy).",
)
_SRC_LANG = flags.DEFINE_string(
  "src_lang", None, "Encoder-decoder runs with languages: the prompts' language."
)
_TGT_LANG = flags.DEFINE_string(
  "tgt_lang", None, "Encoder-decoder runs with languages: the language to translate into."
)
_MESH = flags.DEFINE_string(
  "mesh",
  "fsdp",
  "Where the model goes: fsdp (the parameters sharded over all devices, each "
  "batch whole on each), one (the first device), or a mesh, e.g. \"(('data', 1), "
  "('fsdp', 1), ('expert', 8), ('tensor', 1))\" (the run's sharding rules).",
)
flags.mark_flags_as_required(["workdir"])


def read_prompts(path: str) -> list[str]:
  if not os.path.exists(path):
    raise UserError(f"--prompts={path}: no such file")
  with open(path, encoding="utf-8") as f:
    if not path.endswith(".jsonl"):
      return [line.rstrip("\n") for line in f if line.strip()]
    out = []
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line)["prompt"])
      except (ValueError, KeyError, TypeError):
        raise UserError(f"--prompts={path} line {i}: not a JSON object with a 'prompt'") from None
    return out


def check_sampling():
  if _MAX_NEW.value < 1:
    raise UserError(f"--max_new_tokens={_MAX_NEW.value}: must be >= 1")
  if _TEMPERATURE.value < 0:
    raise UserError(f"--temperature={_TEMPERATURE.value}: must be >= 0 (0 = greedy)")
  if _TOP_K.value < 0:
    raise UserError(f"--top_k={_TOP_K.value}: must be >= 0 (0 = off)")
  if not 0 < _TOP_P.value <= 1:
    raise UserError(f"--top_p={_TOP_P.value}: must be in (0, 1]")


def chat_prompts(tok, prompts: list[str]) -> list[list[int]]:
  """Each prompt as one user message, rendered with the generation prompt."""
  from sparse_lm.data import chat  # pylint: disable=g-import-not-at-top

  if not getattr(tok, "chat_template", None):
    where = getattr(tok, "path", "not a tokenizer.json")
    raise UserError(f"--chat: the run's tokenizer has no chat template ({where})")
  out = []
  for i, p in enumerate(prompts, 1):
    try:
      out.append(chat.encode_prompt(tok, [{"role": "user", "content": p}]))
    except chat.TemplateError as e:
      raise UserError(f"--chat: prompt {i}: {e}") from None
  return out


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
  cut = min((text.find(s) for s in stops if s and s in text), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


def seq2seq_sources(c, tok, workdir: str, prompts: list[str]):
  """(encoder ids, decoder prefixes, reserved-id names) of the prompts as
  sources of an encoder-decoder run (module docstring); a note on stderr
  for a source cut to data.seq_len."""
  from sparse_lm import decode  # pylint: disable=g-import-not-at-top
  from sparse_lm import state as statelib  # pylint: disable=g-import-not-at-top

  src, tgt = _SRC_LANG.value, _TGT_LANG.value
  langs = statelib.seq2seq_languages(c, tok, workdir) if c.data.objective == "seq2seq" else {}
  if langs:
    for flag, v in (("src_lang", src), ("tgt_lang", tgt)):
      if v not in langs:
        what = ": give one of" if v is None else f"={v} is not one of"
        names = sorted(langs)
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise UserError(f"--{flag}{what} the languages of {workdir}'s run ({shown})")
  elif src is not None or tgt is not None:
    raise UserError(
      f"--src_lang / --tgt_lang: {workdir}'s run has no languages (data.dataset="
      f"{c.data.dataset!r}, data.objective={c.data.objective!r})"
    )
  sources, prefixes = [], []
  for i, p in enumerate(prompts, 1):
    if not p:
      raise UserError(f"prompt {i} is empty")
    ex, cut = decode.seq2seq_example(c, tok, p, langs, src, tgt)
    if cut:
      print(f"prompt {i}: cut to data.seq_len={c.data.seq_len} tokens", file=sys.stderr)
    ids, prefix = decode.seq2seq_prompt(ex)
    sources.append(ids)
    prefixes.append(prefix)
  return sources, prefixes, decode.reserved_names(c, tok, langs)


def main(argv):
  del argv
  check_sampling()
  prompts = list(_PROMPT.value) + (read_prompts(_PROMPTS.value) if _PROMPTS.value else [])
  if not prompts:
    raise UserError("give a --prompt or a --prompts file")
  from sparse_lm import checkpoint  # pylint: disable=g-import-not-at-top
  from sparse_lm import decode  # pylint: disable=g-import-not-at-top
  from sparse_lm import state as statelib  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  config, mesh = statelib.mesh_for_use(checkpoint.read_config(workdir), _MESH.value)
  seq2seq = config.model.get("arch") == "encoder_decoder"
  if seq2seq:
    for flag in (_CHAT, _EXPERTS, _SPECULATIVE):
      if flag.value:
        raise UserError(f"--{flag.name}: decoder-only runs only ({workdir} is an encoder-decoder)")
  elif _SRC_LANG.value is not None or _TGT_LANG.value is not None:
    raise UserError(
      f"--src_lang / --tgt_lang: encoder-decoder runs only ({workdir} is decoder-only)"
    )
  if _SPECULATIVE.value and (_TEMPERATURE.value or _EXPERTS.value):
    raise UserError("--speculative is greedy only: without --temperature and --expert_choices")
  model, c, tok = statelib.load_model(
    workdir, _STEP.value, inference=True, mesh=mesh, config=config, keep_mtp=_SPECULATIVE.value
  )
  if _SPECULATIVE.value and not c.model.get("mtp_depth"):
    raise UserError(
      f"--speculative needs a run trained with config.model.mtp_depth >= 1 ({workdir}'s is 0)"
    )
  sampling = decode.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  if seq2seq:
    sources, prefixes, names = seq2seq_sources(c, tok, workdir, prompts)
    g = decode.seq2seq_generate(
      model,
      sources,
      prefixes,
      max_new_tokens=_MAX_NEW.value,
      sampling=sampling,
      seed=_SEED.value,
      stop_ids=tok.stop_ids,
      mesh=mesh,
      config=c,
    )
    texts = [decode.seq2seq_text(tok, t, names) for t in g.tokens]
  else:
    ids = chat_prompts(tok, prompts) if _CHAT.value else [tok.encode(p) for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
      raise UserError(f"prompt {empty[0] + 1} is empty")
    g = decode.generate(
      model,
      ids,
      max_new_tokens=_MAX_NEW.value,
      sampling=sampling,
      seed=_SEED.value,
      stop_ids=tok.stop_ids,
      pad_id=tok.eos_id if tok.pad_id is None else tok.pad_id,
      mesh=mesh,
      config=c,
      return_experts=_EXPERTS.value,
      speculative=_SPECULATIVE.value,
    )
    texts = [tok.decode(t) for t in g.tokens]
  rows = []
  for i, (prompt, toks, full) in enumerate(zip(prompts, g.tokens, texts)):
    text, stopped = truncate_at_stop(full, _STOP.value)
    rows.append({"prompt": prompt, "completion": text, "tokens": toks, "stopped_at_text": stopped})
    if seq2seq and _SRC_LANG.value is not None:
      rows[-1].update(src_lang=_SRC_LANG.value, tgt_lang=_TGT_LANG.value)
    if g.experts is not None:
      rows[-1]["experts"] = g.experts[i]
    shown = f"{prompt}\n=> {text}" if seq2seq else f"{prompt}{text}"
    print(f"--- {i + 1}/{len(prompts)} ({len(toks)} tokens)\n{shown}")
  n = sum(len(t) for t in g.tokens)
  first = "encoder, prefill" if seq2seq else "prefill"
  print(
    f"\n{n} tokens for {len(prompts)} prompt(s): {first} {g.prefill_s:.2f} s and first step "
    f"{g.first_step_s:.2f} s (both compile), then {g.tokens_per_s():,.1f} tokens/s "
    f"({g.steps} steps of {len(prompts)} row(s) after the first in {g.decode_s:.2f} s, "
    "no compile in them)"
  )
  if g.drafts:
    accepted, verified = g.drafts
    print(
      f"speculative: {accepted} of {verified} drafts accepted "
      f"({1 + accepted / max(verified, 1):.2f} tokens per row and step)"
    )
  if _OUTPUT.value:
    try:
      with open(_OUTPUT.value, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    except OSError as e:
      raise UserError(f"--output={_OUTPUT.value}: {e.strerror or e}") from None
    print(f"wrote {_OUTPUT.value}")
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main, "sparse_lm.generate", config_flags=())
