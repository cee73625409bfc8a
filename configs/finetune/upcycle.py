r"""Sparse upcycling (Komatsuzaki et al. 2022): a trained dense run becomes an MoE.

  python -m sparse_lm.main --config=configs/dense.py:tiny --workdir=runs/dense_tiny
  python -m sparse_lm.main --config=configs/finetune/upcycle.py:mixtral --workdir=runs/upcycled

Each MoE layer's experts start as copies of that layer's dense MLP, the router
is new, every other weight carries over, and the optimizer starts fresh; the
run goes on pretraining on the same data, from where the dense run stopped
(train.init_data="continue": unseen batches, as the paper's upcycled runs
continue the dense run's data; it needs the dense run's data settings and
train.seed). With gates that sum to 1 per token
and no dropped token, the upcycled model's output at step 0 is the dense
model's (tests/finetune_test.py checks it per router, within 1e-5).

Variants (the string after ':'):
  mixtral  8 experts, softmax over the top-2 logits (gates sum to 1: equal at step 0)
  switch   8 experts, Switch top-1: its gate is the chosen probability, so the
           copies' output is scaled by E (train.init_gate_scale="expected",
           He et al. 2024's compensation; exact for a zero router only)
  drop     mixtral with Drop-Upcycling (arXiv 2502.19261): half of each expert's
           hidden units re-initialised, a different half per expert
"""

from sparse_lm import config as cfglib

VARIANTS = ("mixtral", "switch", "drop")


def get_config(arg: str = "mixtral"):
  arg = cfglib.check_variant("configs/finetune/upcycle.py", dict.fromkeys(VARIANTS), arg, "mixtral")
  c = cfglib.load_config("configs/dense.py:tiny")
  m, t = c.model.moe, c.train
  m.num_experts, m.every, m.offset, m.dispatch = 8, 2, 1, "dropless"
  if arg == "switch":
    m.router, m.top_k = "switch", 1
    t.init_gate_scale = "expected"
  else:
    m.router, m.top_k = "mixtral", 2
  if arg == "drop":
    t.init_reinit_fraction = 0.5
  t.init_from = "runs/dense_tiny"
  t.init_data = "continue"
  t.warmup_steps = 20
  return c
