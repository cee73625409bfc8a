r"""Loss and perplexity of a run's checkpoint, with per-layer MoE statistics.

  python -m sparse_lm.evaluate --workdir=runs/switch_tiny
  python -m sparse_lm.evaluate --workdir=runs/switch_tiny --step=200 --split=train --batches=4
  python -m sparse_lm.evaluate --workdir=runs/switch_tiny --dataset='files:~/corpus/*.txt' \
      --output=eval.json

Evaluates on --split (default: the run's data.eval_split) of the run's dataset,
or of --dataset (any value data.dataset takes), tokenized with the run's own
tokenizer, --batches batches of the run's batch size and sequence length. MoE
layers run as in the run's evaluation (eval_capacity_factor). Prints a table
and, with --output, writes JSON: loss, perplexity, tokens, and per MoE layer
the expert load (fraction of assignments per expert), the dropped fraction,
the router entropy, the load-balance loss and (token-choice routers) the mean
chosen gate, averaged over the batches. --compare_routing=<base workdir>
adds the routing drift from a base run (a fine-tuning run's init_from): per
MoE layer the KL divergence of the router distributions and the fraction of
tokens whose top-1 expert changed, on prompt and response tokens apart for
instruction data.

An encoder-decoder run (model.arch="encoder_decoder"; issue 30):

  python -m sparse_lm.evaluate --workdir=runs/translate --examples=200

the loss is its decoder's cross-entropy on the targets (decoder_loss_weights:
NLLB's forced [tgt_lang] not counted), "loss" the mean of the batches' own
means as train.py's eval_loss (its value for the same checkpoint and
batches), "token_loss" the mean over all their tokens; MoE layers are
numbered as in the run's metrics (decoder layer j is num_layers + j). On
seq2seq data, --examples pairs of the split (the first; -1 all, 0 none) are
also translated greedily (decode.seq2seq_generate, the encoder once and
cached decoder steps, up to the decoder's length data.targets_len) and
scored against their targets with sacrebleu (data/translation.py's score:
corpus chrF, chrF++, BLEU), over all of them and per language pair where the
pairs have languages; --output keeps every source, reference and hypothesis.

For studies (not a flag): `score_responses` gives each (prompt, response)
example's summed log-likelihood of its response given its prompt (per-example
losses), and `multiple_choice` scores items whose choices are responses to one
prompt by that sum (the choice with the highest is the model's answer).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import types

from absl import flags
from flax import nnx
import jax
import numpy as np

from sparse_lm import checkpoint as ckptlib
from sparse_lm import cli
from sparse_lm import config as cfglib
from sparse_lm import data as datalib
from sparse_lm import decode
from sparse_lm import finetune
from sparse_lm import sharding
from sparse_lm import state as statelib
from sparse_lm.data import seq2seq
from sparse_lm.data import sft
from sparse_lm.data import translation
from sparse_lm.errors import ConfigError
from sparse_lm.errors import UserError
from sparse_lm.models import encoder_decoder


def _define_flags():
  """Only when run as a program: the study reports import evaluate() with their own flags."""
  flags.DEFINE_string("workdir", None, "A training run's folder.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("split", None, "Split to evaluate (default: the run's eval split).")
  flags.DEFINE_string("dataset", None, "Another dataset (data.dataset syntax).")
  flags.DEFINE_integer("batches", None, "Batches (default: the run's eval_batches).")
  flags.DEFINE_string("output", None, "Write the results as JSON here.")
  flags.DEFINE_string(
    "mesh",
    "fsdp",
    "Where the model goes: fsdp (the parameters sharded over all devices, each batch whole "
    "on each), one (the first device), or a mesh as in config.mesh (the run's rules).",
  )
  flags.DEFINE_string(
    "compare_routing",
    None,
    "A base run's workdir[:step]: report how far this run's routing moved from it (per MoE "
    "layer: KL of the router distributions, top-1 changes; prompt / response tokens apart).",
  )
  flags.DEFINE_integer(
    "examples",
    256,
    "Encoder-decoder runs on seq2seq data: translate this many pairs of the split greedily "
    "and score chrF / BLEU (-1: all, 0: none).",
  )
  flags.mark_flags_as_required(["workdir"])


# gate_mean: token-choice routers only (the mean summed gate of the chosen experts).
STATS = ("expert_fraction", "dropped_fraction", "router_entropy", "load_balance_loss", "gate_mean")


def evaluate(
  workdir: str,
  step=None,
  split=None,
  dataset=None,
  batches=None,
  compare_routing=None,
  mesh="fsdp",
  examples=256,
) -> dict:
  """The numbers `main` prints, as a dict. mesh: where the model goes (the
  --mesh flag: state.mesh_for_use). examples: an encoder-decoder run's
  translations on seq2seq data (the --examples flag)."""
  workdir = os.path.abspath(workdir)
  c, mesh = statelib.mesh_for_use(ckptlib.read_config(workdir), mesh)
  encdec = c.model.get("arch") == "encoder_decoder"
  if encdec and compare_routing:
    raise ConfigError(
      f"--compare_routing: decoder-only runs only ({workdir} is an encoder-decoder)"
    )
  model, c, tok = statelib.load_model(workdir, step, mesh=mesh, config=c)
  d = c.data
  if dataset:
    d.dataset = dataset
  if split:
    d.eval_split = split
  n = batches or c.train.eval_batches
  if n < 1:
    raise ConfigError(f"--batches={n}: must be >= 1")
  seq2seq_pairs = encdec and d.objective == "seq2seq"
  if seq2seq_pairs:  # other pairs (or an import's preset dataset): the run's language ids
    got = seq2seq.encode_split(d, tok, d.eval_split)[1]["languages"]
    want = statelib.seq2seq_languages(c, tok, workdir)
    bad = {g: i for g, i in got.items() if want.get(g) != i}
    if bad:
      shown = ", ".join(f"{g}: {i} (run: {want.get(g, 'none')})" for g, i in list(bad.items())[:6])
      raise ConfigError(
        f"--dataset={d.dataset}: {len(bad)} of its languages take other token ids than the "
        f"run's ({shown})" + ("" if dataset else "; give --dataset with the run's languages")
      )
  eval_data = datalib.eval_batches(d, n, tokenizer=tok)
  graphdef, state = nnx.split(model)
  weight_key = "decoder_loss_weights" if encdec else "weights"

  @jax.jit
  def step_fn(state, batch):
    _, aux = statelib.loss_fn(nnx.merge(graphdef, state), batch, train=False, rng=None)
    return aux["ce"], jax.numpy.sum(batch[weight_key]), aux["moe"]

  ces, weights, moes = [], [], []
  with sharding.use(mesh, c) if mesh is not None else contextlib.nullcontext():
    for batch in eval_data:
      ce, w, moe = jax.device_get(step_fn(state, batch))
      ces.append(float(ce))
      weights.append(float(w))
      moes.append(moe)
  token_loss = float(np.average(ces, weights=weights))
  loss = float(np.mean(ces)) if encdec else token_loss  # encdec: train.py's eval_loss
  out = {
    "workdir": workdir,
    "step": step if step is not None else train_step_of(workdir),
    "dataset": d.dataset,
    "split": d.eval_split,
    "batches": len(ces),
    "tokens": int(sum(weights)),
    "loss": loss,
    "perplexity": math.exp(min(loss, 50.0)),
    "moe_layers": {},
  }
  if encdec:
    out["token_loss"] = token_loss
  if compare_routing:
    out["routing_drift"] = drift_from(compare_routing, model, c, tok, eval_data, mesh)
  if seq2seq_pairs and examples:
    out["translation"] = translate(model, c, tok, workdir, d, examples, mesh)
  spec = cfglib.model_spec(c)
  layer_ids = encoder_decoder.moe_layer_ids(spec) if encdec else spec.moe_layers
  for i, layer in enumerate(layer_ids):
    out["moe_layers"][str(layer)] = {
      k: np.mean([np.asarray(m[i][k]) for m in moes], axis=0).tolist()
      for k in STATS
      if k in moes[0][i]
    }
  return out


def translate(model, c, tok, workdir: str, d, examples: int, mesh=None) -> dict:
  """Greedy translations of the first `examples` pairs (-1: all) of data
  config d's eval split by an encoder-decoder run's model, scored with
  sacrebleu (translation.score) over all of them ("all") and per language
  pair ("pairs"; "src-tgt" -> its count and scores), and the pairs with
  their hypotheses ("translations"). Each source is laid out as training
  laid it out (seq2seq.encode_pair with the run's language ids), the
  decoder started with its forced prefix (decode.seq2seq_prompt), then up
  to the decoder length's targets decoded, data.batch_size rows at a time."""
  pairs = seq2seq.read_pairs(d, d.eval_split)
  pairs = pairs if examples < 0 else pairs[:examples]
  langs = statelib.seq2seq_languages(c, tok, workdir)
  enc_len, dec_len = seq2seq.lengths(d)
  prompts = [
    decode.seq2seq_prompt(seq2seq.encode_pair(p, tok, langs, enc_len, dec_len)[0]) for p in pairs
  ]
  model, names = decode.for_inference(model), decode.reserved_names(c, tok, langs)
  B, hyps = d.batch_size, [None] * len(pairs)
  by_prefix = {}  # rows decode together when their prefixes have one length
  for i, (_, prefix) in enumerate(prompts):
    by_prefix.setdefault(len(prefix), []).append(i)
  for P, idx in sorted(by_prefix.items()):
    for at in range(0, len(idx), B):
      rows = idx[at : at + B]
      full = rows + rows[:1] * (B - len(rows))  # one batch shape: one program
      g = decode.seq2seq_generate(
        model,
        [prompts[i][0] for i in full],
        [prompts[i][1] for i in full],
        max_new_tokens=dec_len - (P - 1),  # the targets after the forced ones, </s> included
        stop_ids=tok.stop_ids,
        mesh=mesh,
        config=c,
      )
      for i, toks in zip(rows, g.tokens):
        hyps[i] = decode.seq2seq_text(tok, toks, names)
  refs = [p["target"] for p in pairs]
  out = {"examples": len(pairs), "all": translation.score(hyps, refs), "pairs": {}}
  groups = {}
  for i, p in enumerate(pairs):
    if "src_lang" in p:
      groups.setdefault((p["src_lang"], p["tgt_lang"]), []).append(i)
  for (src, tgt), idx in sorted(groups.items()):
    s = translation.score([hyps[i] for i in idx], [refs[i] for i in idx], tgt)
    out["pairs"][f"{src}-{tgt}"] = {"examples": len(idx), **s}
  keep = ("source", "target", "src_lang", "tgt_lang")
  out["translations"] = [
    {**{k: p[k] for k in keep if k in p}, "hypothesis": h} for p, h in zip(pairs, hyps)
  ]
  return out


def drift_from(base: str, model, c, tok, batches, mesh=None) -> dict:
  """metrics.routing_drift of `model` against the base run's model, the mean
  over `batches` (the base must have the same MoE layers and tokenizer), the
  base loaded onto `mesh` as `model` was (config `c`'s mesh and rules)."""
  path, step = finetune.parse_source(base, key="compare_routing")
  base_c = ckptlib.read_config(path)
  base_c.mesh, base_c.sharding_rules = c.mesh, c.sharding_rules
  base_model, base_c, base_tok = statelib.load_model(path, step, mesh=mesh, config=base_c)
  ids = list(cfglib.model_spec(c).moe_layers)
  if list(cfglib.model_spec(base_c).moe_layers) != ids or not ids:
    raise ConfigError(f"--compare_routing={base}: its MoE layers are not this run's {ids}")
  if base_tok.fingerprint != tok.fingerprint:
    raise ConfigError(f"--compare_routing={base}: it has another tokenizer")
  probs = nnx.jit(finetune.router_probs)
  with sharding.use(mesh, c) if mesh is not None else contextlib.nullcontext():
    rows = [
      finetune.routing_drift(
        jax.device_get(probs(base_model, b)),
        jax.device_get(probs(model, b)),
        finetune.drift_sets(b),
        ids,
      )
      for b in batches
    ]
  return {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0]}


@nnx.jit
def _target_logprobs(model, b):
  """log p(target) of every weighted target of a batch, 0 elsewhere ([B, L])."""
  logits_BxLxV, _, _ = model(
    b["inputs"],
    mask_BxL=b["mask"],
    positions_BxL=b["positions"],
    segments_BxL=b["segment_ids"],
    train=False,
    rng=None,
  )
  lp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jax.numpy.float32))
  lp_BxL = jax.numpy.take_along_axis(lp_BxLxV, b["targets"][..., None], axis=-1)[..., 0]
  return lp_BxL * b["weights"]


def score_responses(
  model, c, tok, examples, *, template: str | None = None, mesh=None, batch_size=None
) -> dict[str, np.ndarray]:
  """Per example ({"prompt", "response"}): the summed log-likelihood of its
  response tokens and end-of-text given its prompt ("logprob", float64 [N]),
  their count ("tokens"), and whether it was cut at data.seq_len + 1 tokens
  ("truncated"; a cut example keeps the response tokens left, one with none
  left scores nan). Tokens as sft data encodes them with `template` (default
  the run's data.sft_template): the tokens the fine-tuning loss counts, so
  -logprob / tokens is an example's mean loss. Examples are packed by length
  into rows with segment ids (each computes as it would alone: sft.pack) and
  run data.batch_size rows at a time through the model's forward, in eval
  mode; per example only where routing does not depend on the other tokens
  of the batch (no token dropped: dropless dispatch or enough capacity)."""
  L, B = c.data.seq_len, batch_size or c.data.batch_size
  d = types.SimpleNamespace(
    dataset="sft:",
    sft_template=template or c.data.sft_template,
    seq_len=10**9,
    sft_overlong="truncate",
  )
  full, _ = sft.encode(list(enumerate(examples, 1)), tok, d, "examples")
  N = len(full)
  out = {
    "logprob": np.full(N, np.nan),
    "tokens": np.zeros(N, np.int64),
    "truncated": np.array([len(t) > L + 1 for t, _ in full]),
  }
  enc = [(t[: L + 1], m[: L + 1]) for t, m in full]
  keep = [i for i, (_, m) in enumerate(enc) if m[1:].any()]
  order = sorted(keep, key=lambda i: -len(enc[i][0]))
  rows = sft.pack(enc, order, L)
  # Row-major (row, segment) enumerates `order`: packing keeps its order.
  R = len(rows["tokens"])
  owner_RxS = np.full((R, int(rows["segments"].max()) + 1), -1)
  k = 0
  for r in range(R):
    for s in range(1, int(rows["segments"][r].max()) + 1):
      owner_RxS[r, s], k = order[k], k + 1
  pad = -R % B
  rows = {
    key: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for key, v in rows.items()
  }
  batch = sft.to_batch(rows)
  lp = []
  with sharding.use(mesh, c) if mesh is not None else contextlib.nullcontext():
    for i in range(0, len(batch["inputs"]), B):
      part = {key: v[i : i + B] for key, v in batch.items()}
      lp.append(np.asarray(jax.device_get(_target_logprobs(model, part)), np.float64))
  lp_RxL = np.concatenate(lp)[:R]
  w_RxL, seg_RxL = batch["weights"][:R], batch["segment_ids"][:R]
  who = owner_RxS[np.arange(R)[:, None], seg_RxL]
  hit = (w_RxL > 0) & (who >= 0)
  out["logprob"][keep] = 0.0
  np.add.at(out["logprob"], who[hit], lp_RxL[hit])
  np.add.at(out["tokens"], who[hit], 1)
  return out


def multiple_choice(model, c, tok, items, **kw) -> dict[str, np.ndarray]:
  """Items {"prompt", "choices": [str, ...], "answer": index}: each choice
  scored as the response to the prompt (score_responses, keywords alike) by
  its summed log-likelihood; "logprob" [N, K] (K: the most choices, nan
  past an item's own), "choice" (the argmax), "correct", and "truncated"
  (a choice of the item was cut)."""
  flat = [{"prompt": it["prompt"], "response": ch} for it in items for ch in it["choices"]]
  s = score_responses(model, c, tok, flat, **kw)
  K = max(len(it["choices"]) for it in items)
  lp_NxK = np.full((len(items), K), np.nan)
  cut = np.zeros(len(items), bool)
  at = 0
  for n, it in enumerate(items):
    k = len(it["choices"])
    lp_NxK[n, :k] = s["logprob"][at : at + k]
    cut[n] = s["truncated"][at : at + k].any()
    at += k
  choice = np.argmax(np.where(np.isnan(lp_NxK), -np.inf, lp_NxK), axis=1)
  answer = np.array([it["answer"] for it in items])
  return {"logprob": lp_NxK, "choice": choice, "correct": choice == answer, "truncated": cut}


def load_for_scoring(workdir: str, step=None, mesh: str = "fsdp"):
  """(model, config, tokenizer, mesh) of a run's checkpoint, placed as
  `evaluate` places it (--mesh), for score_responses / multiple_choice."""
  c, m = statelib.mesh_for_use(ckptlib.read_config(os.path.abspath(workdir)), mesh)
  model, c, tok = statelib.load_model(workdir, step, mesh=m, config=c)
  return model, c, tok, m


def train_step_of(workdir: str) -> int | None:
  ckpts = os.path.join(workdir, "checkpoints")
  steps = [int(s) for s in os.listdir(ckpts) if s.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps, default=None)


def table(r: dict) -> str:
  lines = [
    f"{r['workdir']} step {r['step']}: {r['dataset']} / {r['split']}, {r['batches']} batches, "
    f"{r['tokens']:,} tokens",
    f"  loss {r['loss']:.4f}   perplexity {r['perplexity']:.2f}",
  ]
  drift = r.get("routing_drift", {})
  if drift:
    lines.append(
      "  routing drift from the base: "
      + ", ".join(
        f"{k.removeprefix('drift/mean/')} {v:.4f}" for k, v in drift.items() if "/mean/" in k
      )
    )
  if "token_loss" in r:
    lines[-1] += f"   (the mean over all tokens: {r['token_loss']:.4f})"
  t = r.get("translation")
  if t:
    a = t["all"]
    lines.append(
      f"  translations of {t['examples']} pairs (greedy): chrF {a['chrf']:.2f}   "
      f"chrF++ {a['chrf++']:.2f}   BLEU {a['bleu']:.2f}"
    )
    if t["pairs"]:
      lines.append(f"  {'pair':>12} {'examples':>8} {'chrF':>7} {'chrF++':>7} {'BLEU':>7}")
      for k, v in t["pairs"].items():
        lines.append(
          f"  {k:>12} {v['examples']:>8} {v['chrf']:>7.2f} {v['chrf++']:>7.2f} {v['bleu']:>7.2f}"
        )
  if r["moe_layers"]:
    lines.append(
      f"  {'layer':>5} {'dropped':>8} {'entropy':>8} {'balance':>8} {'gate':>6}  expert load"
    )
    for layer, s in r["moe_layers"].items():
      load = " ".join(f"{x:.2f}" for x in s["expert_fraction"])
      gate = f"{s['gate_mean']:>6.3f}" if "gate_mean" in s else f"{'-':>6}"
      lines.append(
        f"  {layer:>5} {s['dropped_fraction']:>8.4f} {s['router_entropy']:>8.3f} "
        f"{s['load_balance_loss']:>8.3f} {gate}  {load}"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  r = evaluate(
    f.workdir, f.step, f.split, f.dataset, f.batches, f.compare_routing, f.mesh, f.examples
  )
  print(table(r))
  if f.output:
    try:
      with open(f.output, "w") as out:
        json.dump(r, out, indent=1)
    except OSError as e:
      raise UserError(f"--output={f.output}: {e.strerror or e}") from None
    print(f"wrote {f.output}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "sparse_lm.evaluate", config_flags=())
