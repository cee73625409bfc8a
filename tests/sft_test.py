"""Instruction data (sparse_lm/data/sft.py): reading, response-only loss,
document-masked packing against each example run alone, router statistics on
real tokens only, resumable batches."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm import config as cfglib
from sparse_lm import finetune
from sparse_lm import state as statelib
from sparse_lm.data import sft
from sparse_lm.data.tokenizer import ByteTokenizer
from sparse_lm.errors import ConfigError

TOK = ByteTokenizer()
EXAMPLES = [
  {"prompt": "def add(a, b):\n", "response": "  return a + b"},
  {"prompt": "Q: 2+2?\n", "response": "4"},
  {"prompt": "name: ", "response": "Ada Lovelace"},
  {"prompt": "", "response": "no prompt at all"},
]


def write(tmp_path, examples, name="train.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(e) + "\n" for e in examples))
  return str(path)


def data_cfg(path, seq_len=40, batch_size=4, **kw):
  d = cfglib.base_config().data
  d.dataset, d.tokenizer, d.seq_len, d.batch_size = f"sft:{path}", "byte", seq_len, batch_size
  d.eval_split = path  # the same file, all lines
  for k, v in kw.items():
    d[k] = v
  return d


def encoded(tmp_path, examples=EXAMPLES, **kw):
  path = write(tmp_path, examples)
  d = data_cfg(path, **kw)
  return sft.encode(sft.read_examples(path, path), TOK, d, path)


def test_loss_counts_response_tokens_only_and_never_crosses_examples(tmp_path):
  enc, counts = encoded(tmp_path, sft_template="<{prompt}>{response}")
  assert counts["examples"] == 4 and counts["truncated"] == 0
  toks, loss = enc[0]
  n_prompt = len(TOK.encode("<def add(a, b):\n>"))
  assert not loss[:n_prompt].any() and loss[n_prompt:].all() and toks[-1] == TOK.eos_id
  rows = sft.pack(enc, range(4), 40)
  batch = sft.to_batch(rows)
  for r in range(len(rows["tokens"])):
    seg, w = rows["segments"][r], batch["weights"][r]
    for i in range(39):  # target i+1: weighted iff a response token of input i's example
      want = rows["loss"][r, i + 1] and seg[i + 1] == seg[i] and seg[i] > 0
      assert bool(w[i]) == bool(want), (r, i)
  assert batch["weights"].sum() == counts["response_tokens"]  # every prompt is non-empty here


def test_packed_examples_compute_as_if_alone(tmp_path):
  # Segment ids keep attention inside each example and positions restart at 0:
  # each example's logits in a packed row equal the example run alone.
  enc, _ = encoded(tmp_path, seq_len=64)
  rows = sft.pack(enc, range(4), 64)
  batch = sft.to_batch(rows)
  assert len(rows["tokens"]) == 2 and rows["segments"].max() >= 2  # the test packs
  c = cfglib.base_config()
  c.model.d_model, c.model.num_heads, c.model.d_ff, c.data.seq_len = 32, 4, 64, 64
  with nnx.use_eager_sharding(False):
    model = statelib.create(cfglib.validate(c), TOK.vocab_size)[0]
  packed = model(
    jnp.asarray(batch["inputs"]),
    positions_BxL=jnp.asarray(batch["positions"]),
    segments_BxL=jnp.asarray(batch["segment_ids"]),
  )[0]
  # Each example alone: at the start of its own row (right-padding is never
  # seen by a causal model), all of them in one forward.
  where = [
    (r, np.flatnonzero(rows["segments"][r, :-1] == s))
    for r in range(len(rows["tokens"]))
    for s in range(1, rows["segments"][r].max() + 1)
  ]
  alone_NxL = np.zeros((len(where), 64), np.int32)
  for i, (r, at) in enumerate(where):
    alone_NxL[i, : len(at)] = rows["tokens"][r, at]
  alone = model(jnp.asarray(alone_NxL))[0]
  for i, (r, at) in enumerate(where):
    np.testing.assert_allclose(packed[r, at], alone[i, : len(at)], rtol=1e-5, atol=1e-5)


def test_prompt_tokens_get_no_loss_gradient(tmp_path):
  enc, _ = encoded(tmp_path, seq_len=64)
  batch = {k: jnp.asarray(v) for k, v in sft.to_batch(sft.pack(enc, range(4), 64)).items()}
  c = cfglib.base_config()
  c.model.d_model, c.model.num_heads, c.model.d_ff, c.data.seq_len = 32, 4, 64, 64
  with nnx.use_eager_sharding(False):
    inner = statelib.create(cfglib.validate(c), TOK.vocab_size)[0]

  class Shifted(nnx.Module):  # the model's logits plus a differentiable delta
    def __init__(self):
      self.inner, self.delta = inner, nnx.Param(jnp.zeros((2, 64, TOK.vocab_size)))

    def __call__(self, tokens, **kw):
      out = self.inner(tokens, **kw)  # the Transformer's Output(logits, moe_aux, cache)
      return out._replace(logits=out.logits + self.delta[...])

  model = Shifted()
  grads = nnx.grad(lambda m: statelib.loss_fn(m, batch, train=False, rng=None)[0])(model)
  g = np.abs(np.asarray(grads.delta[...])).sum(-1)
  w = np.asarray(batch["weights"])
  assert np.all(g[w == 0] == 0) and np.all(g[w > 0] > 0)
  # The mean is over the response tokens of the whole batch, not per row.
  ce = -jax.nn.log_softmax(
    inner(batch["inputs"], positions_BxL=batch["positions"], segments_BxL=batch["segment_ids"])[0]
  )
  ce = np.take_along_axis(np.asarray(ce), np.asarray(batch["targets"])[..., None], -1)[..., 0]
  loss = statelib.loss_fn(inner, batch, train=False, rng=None)[1]["ce"]
  np.testing.assert_allclose(loss, (ce * w).sum() / w.sum(), rtol=1e-5)


def test_router_statistics_ignore_padding(tmp_path):
  # The load-balance loss and the expert load count real tokens only
  # (transformers#28505, #29363 counted padding during SFT): a packed batch whose
  # padding holds other tokens gives the same statistics.
  enc, _ = encoded(tmp_path, seq_len=64)
  batch = sft.to_batch(sft.pack(enc, range(4), 64))
  assert (batch["mask"] == 0).sum() > 20  # plenty of padding
  other = dict(batch, inputs=np.where(batch["mask"] > 0, batch["inputs"], 77))
  c = cfglib.load_config("configs/switch.py:tiny")
  c.model.d_model, c.model.d_ff, c.data.seq_len = 32, 64, 64
  with nnx.use_eager_sharding(False):
    model = statelib.create(cfglib.validate(c), TOK.vocab_size)[0]
  aux = lambda b: statelib.loss_fn(
    model, {k: jnp.asarray(v) for k, v in b.items()}, train=False, rng=None
  )[1]
  a, b = aux(batch), aux(other)
  for key in ("load_balance_loss", "expert_fraction", "router_entropy", "z_loss"):
    np.testing.assert_allclose(a["moe"][0][key], b["moe"][0][key], rtol=1e-6, err_msg=key)
  padded = dict(other, mask=np.ones_like(batch["mask"]))  # if padding counted: different
  c_ = aux(padded)["moe"][0]["expert_fraction"]
  assert not np.allclose(c_, a["moe"][0]["expert_fraction"])


def test_overlong_examples_are_truncated_and_counted_or_refused(tmp_path):
  long = {"prompt": "x" * 30, "response": "y" * 30}
  only_prompt = {"prompt": "z" * 50, "response": "w"}
  enc, counts = encoded(tmp_path, EXAMPLES + [long, only_prompt], seq_len=40)
  assert counts["truncated"] == 2 and counts["dropped"] == 1 and counts["examples"] == 5
  assert max(len(t) for t, _ in enc) == 41
  with pytest.raises(ConfigError, match=r"train.jsonl:5: 61 tokens"):
    encoded(tmp_path, EXAMPLES + [long], seq_len=40, sft_overlong="refuse")


@pytest.mark.parametrize(
  "line,needle",
  [
    ('{"prompt": "a"}', "train.jsonl:2: no string field 'response'"),
    ('{"prompt": "a", "response": "  "}', "train.jsonl:2: the response is empty"),
    ("not json", "train.jsonl:2: not JSON"),
  ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, needle):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(EXAMPLES[0]) + "\n" + line + "\n")
  with pytest.raises(ConfigError, match=needle):
    sft.read_examples(str(path), str(path))


def test_batches_resume_exactly_and_do_not_depend_on_the_process_count(tmp_path):
  path = write(tmp_path, EXAMPLES * 5)
  d = data_cfg(path, batch_size=4, train_split=path)
  one = sft.SftInput(d, TOK, path, seed=3, process_index=0, process_count=1)
  want = [next(one) for _ in range(12)]  # several epochs
  two = [sft.SftInput(d, TOK, path, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  for b in range(12):
    halves = [next(t) for t in two]
    for k in want[b]:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), want[b][k])
  again = sft.SftInput(d, TOK, path, seed=3, process_index=0, process_count=1)
  again.set_state(one.get_state() | {"batches": 5})
  got = next(again)
  for k in want[5]:
    np.testing.assert_array_equal(got[k], want[5][k])


def test_routing_drift_by_hand():
  base = [np.array([[0.5, 0.5], [0.9, 0.1]])]
  now = [np.array([[0.25, 0.75], [0.9, 0.1]])]
  sets = {"": np.array([True, True]), "_prompt": np.array([True, False])}
  d = finetune.routing_drift(base, now, sets, [3])
  kl0 = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
  np.testing.assert_allclose(d["drift/layer3/kl"], kl0 / 2)
  np.testing.assert_allclose(d["drift/layer3/kl_prompt"], kl0)
  assert d["drift/layer3/top1_changed"] == 0.5 and d["drift/mean/top1_changed_prompt"] == 1.0
