r"""Instruction tuning (SFT) of a trained run: its weights, the stdlib instruction tasks.

  python -m sparse_lm.main --config=configs/finetune/sft.py:switch_tiny \
      --workdir=runs/switch_tiny_sft
  python -m sparse_lm.generate --workdir=runs/switch_tiny_sft \
      --prompt="$(printf '# Write the body of this function.\ndef is_even(n):\n')"

Variants (the string after ':'), each fine-tuning the run named in
train.init_from (README: the quick start's runs/switch_tiny, and
runs/dense_tiny from configs/dense.py:tiny):
  switch_tiny   SFT of runs/switch_tiny with every weight trained
  dense_tiny    the same for runs/dense_tiny (the dense baseline)
  switch_paper  the Switch paper's fine-tuning regularisation (Fedus et al.
                2021, table 4, "expert dropout"): dropout 0.1 outside the
                experts, 0.4 inside them
  st_moe        ST-MoE's (Zoph et al. 2022, section 4): only the non-expert
                weights train (the routed experts frozen), router z-loss 1e-3

Data: "sft:stdlib", the instruction tasks of the embedded corpus (body from
signature + docstring, docstring, name, signature; sparse_lm/data/stdlib_tasks.py),
built into the data dir on first use; the tokenizer is the base run's
(data.tokenizer_dataset = "stdlib"). The loss counts response tokens only;
examples are packed with segment ids. The model block must be the base run's
(its config file's), the optimizer and schedule start fresh.
"""

from sparse_lm import config as cfglib

VARIANTS = {  # name: (base config, base workdir)
  "switch_tiny": ("configs/switch.py:tiny", "runs/switch_tiny"),
  "dense_tiny": ("configs/dense.py:tiny", "runs/dense_tiny"),
  "switch_paper": ("configs/switch.py:tiny", "runs/switch_tiny"),
  "st_moe": ("configs/switch.py:tiny", "runs/switch_tiny"),
}


def get_config(arg: str = "switch_tiny"):
  arg = cfglib.check_variant("configs/finetune/sft.py", VARIANTS, arg, default="switch_tiny")
  base, workdir = VARIANTS[arg]
  c = cfglib.load_config(base)
  c.data.dataset, c.data.tokenizer_dataset = "sft:stdlib", "stdlib"
  t = c.train
  t.init_from = workdir
  t.learning_rate, t.schedule, t.warmup_steps = 1e-3, "constant", 20
  t.num_steps, t.cooldown_steps = 300, 100
  t.eval_every, t.checkpoint_every = 50, 100
  if arg == "switch_paper":
    c.model.dropout, c.model.moe.expert_dropout = 0.1, 0.4
  if arg == "st_moe":
    t.frozen = ":experts"
    c.model.moe.z_loss_weight = 1e-3
  return c
