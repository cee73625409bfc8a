r"""Fine-tuning an imported Hugging Face checkpoint (sparse_lm/convert/): its
own config, weights and tokenizer; fresh optimizer and schedule.

  python -m sparse_lm.convert import --hf_dir=~/hf/OLMoE-1B-7B-0924 --workdir=runs/olmoe
  python -m sparse_lm.main --config=configs/finetune/imported.py:runs/olmoe \
      --workdir=runs/olmoe_sft --config.train.num_steps=500

The string after ':' is the imported run's workdir. Data: "sft:stdlib" (the
instruction tasks of the embedded corpus), tokenized with the checkpoint's own
tokenizer.json; override data.dataset for your own (any dataset works: the
tokenizer never depends on it; "chat:FILE.jsonl" trains on conversations in
the checkpoint's chat template, loss on the assistant turns). The model block
is the imported run's, so train.init_from reads every parameter by name;
train.frozen, dropout and the router losses are set as for any run (the loss
weights come from config.json: router_aux_loss_coef, router_z_loss_coef).
"""

import os

from sparse_lm import checkpoint as ckptlib
from sparse_lm import config as cfglib


def get_config(arg: str = ""):
  if not arg:
    raise cfglib.ConfigError(
      "configs/finetune/imported.py needs the imported run's workdir: "
      "--config=configs/finetune/imported.py:runs/<name>"
    )
  c = ckptlib.read_config(os.path.abspath(os.path.expanduser(arg)))
  c.data.dataset, c.data.tokenizer_dataset = "sft:stdlib", ""
  c.data.seq_len = min(c.data.seq_len, 256)
  t = c.train
  t.init_from = os.path.abspath(os.path.expanduser(arg))
  t.learning_rate, t.schedule, t.warmup_steps = 1e-4, "constant", 20
  t.num_steps, t.cooldown_steps = 300, 100
  t.eval_every, t.checkpoint_every = 50, 100
  return c
