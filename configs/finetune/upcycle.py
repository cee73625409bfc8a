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

Variants (the string after ':'); each is a recipe (RECIPES), which
tests/finetune_test.py applies to a small model and measures at step 0:
  mixtral       8 experts, softmax over the top-2 logits (gates sum to 1 for any
                router: equal to the dense model at step 0, fresh router)
  switch        8 experts, Switch top-1 with the router at zero
                (train.init_router="zero") and the copies' output scaled by E
                (train.init_gate_scale="expected", He et al. 2024's
                compensation): the chosen gate is exactly 1/E, so equal at step 0
  switch_fresh  the same with a fresh router (the old study's recipe): the
                chosen probability is above 1/E (about 2.9/E for logits of std
                1), so the MLP output starts too large; not function-preserving
  drop          mixtral with Drop-Upcycling (arXiv 2502.19261): half of each
                expert's hidden units re-initialised, a different half per expert
"""

from sparse_lm import config as cfglib

_TOP2 = {"model.moe.router": "mixtral", "model.moe.top_k": 2}
_TOP1 = {"model.moe.router": "switch", "model.moe.top_k": 1, "train.init_gate_scale": "expected"}
# {variant: {dotted config key: value}}: what makes each upcycling recipe.
RECIPES = {
  "mixtral": _TOP2,
  "switch": {**_TOP1, "train.init_router": "zero"},
  "switch_fresh": {**_TOP1, "train.init_router": "fresh"},
  "drop": {**_TOP2, "train.init_reinit_fraction": 0.5},
}
VARIANTS = tuple(RECIPES)


def apply_recipe(c, arg: str):
  """Sets recipe `arg`'s keys in config c (in place) and returns it."""
  for key, value in RECIPES[arg].items():
    node, *path = [c] + key.split(".")
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value
  return c


def get_config(arg: str = "mixtral"):
  arg = cfglib.check_variant("configs/finetune/upcycle.py", dict.fromkeys(VARIANTS), arg, "mixtral")
  c = cfglib.load_config("configs/dense.py:tiny")
  m, t = c.model.moe, c.train
  m.num_experts, m.every, m.offset, m.dispatch = 8, 2, 1, "dropless"
  apply_recipe(c, arg)
  t.init_from = "runs/dense_tiny"
  t.init_data = "continue"
  t.warmup_steps = 20
  return c
