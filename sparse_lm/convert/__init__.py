r"""Hugging Face MoE checkpoints in and out: Mixtral, DBRX, Qwen2-MoE, Qwen3-MoE, OLMoE,
GPT-OSS, DeepSeek-V3, and the encoder-decoder SwitchTransformers (model.arch="encoder_decoder").

  python -m sparse_lm.convert import --hf_dir=~/hf/Mixtral-8x7B-v0.1 --workdir=runs/mixtral
  python -m sparse_lm.generate --workdir=runs/mixtral --prompt="def fib(n):"
  python -m sparse_lm.main --config=configs/finetune/imported.py:runs/mixtral \
      --workdir=runs/mixtral_ft
  python -m sparse_lm.convert export --workdir=runs/mixtral_ft --hf_dir=/tmp/mixtral_ft

`import` reads a checkpoint folder as the hub holds it (config.json, one or
more *.safetensors with model.safetensors.index.json, tokenizer.json and
tokenizer_config.json) and writes a run workdir: config.json (this code base's
config, with the family's conventions set: model.rope_layout, qk_norm,
qkv_bias, clip_qkv, norm_bias, moe.router / normalize_gates, moe.router_dtype,
tie_embeddings, norm_eps), an Orbax checkpoint at step 0 (the parameters and a
fresh optimizer state), and hf/ (the tokenizer files and the source
config.json). `main` resumes or fine-tunes it, and `generate`, `evaluate` and
`inspect` read it, like any run. `export` writes config.json and safetensors
shards (model-0000i-of-0000n.safetensors + model.safetensors.index.json) in
the hub layout that transformers' from_pretrained loads.

The package:
  describe.py        what a family is: `Rule` (our parameters <-> its tensors),
                     `Key` (a config.json key <-> our config keys, and what
                     each side refuses), `Family`
  families/<name>.py one family each, its whole description: FAMILY = Family(
                     name, architecture, keys, rules); shared.py holds what
                     several share (the Llama-style keys and rules)
  families/__init__  FAMILIES: every module there that defines FAMILY
  importer.py        config.json -> our config (the keys, in order), tensor
                     checks, shard-by-shard loading, import_checkpoint
  exporter.py        check_exportable, our config -> config.json, the tensors
                     back, export_checkpoint
  safetensors_io.py  the safetensors reader (memory maps) and shard writer
  __main__.py        the command line

One description serves both directions: import reads each Key's config.json
value (its default where absent, refusing what `refuse` or `values` rules
out) into our config; export checks every Key against the run's config
(`fixed` values, `values` tables: one line naming the first key the family
cannot hold) and writes the config.json keys in the Keys' order, on top of the
source's config.json where the run came from an import. Where transformers
4.x and 5 spell a fact differently (RoPE theta, the dtype) export writes both
and import reads either; router_aux_loss_coef becomes a per-layer
load_balance_weight at the model card's scale (families/shared.py,
balance_weight: what differs from transformers' pooled loss).
The released config.json files of each family (tests/fixtures/released) map
at full size to the model cards' parameter counts. A family is data
plus a few small functions; the drivers have no branch on a family's name.
Adding one is one new module in families/ (and its fixtures in
tests/fixtures/hf, made by tests/fixtures/hf/make_fixtures.py).

Experts are read in the per-expert hub layout (`experts.{j}.w1`,
`experts.{j}.gate_proj`, ...) or in the fused layout transformers 5 keeps in
memory and writes for newer models (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); DBRX's are fused its own way ([E * F, H]).
Export writes the per-expert layout (DBRX: its own).

Tensors are read through memory maps and placed on the target sharding shard
by shard (jax.make_array_from_callback): a host holds one parameter's shard
at a time, plus the page cache, never the whole model twice. Export gathers
one parameter at a time and writes each shard (at most --shard_mb) as soon as
it is full.

Bad input (a missing file, an unknown architecture, a config value we cannot
represent, a tensor whose shape disagrees with config.json, a missing expert)
is one line naming the file or tensor, exit 1, and nothing written.
"""

from sparse_lm.convert.describe import Family
from sparse_lm.convert.describe import Key
from sparse_lm.convert.describe import Rule
from sparse_lm.convert.exporter import check_exportable
from sparse_lm.convert.exporter import export_checkpoint
from sparse_lm.convert.exporter import hf_config
from sparse_lm.convert.exporter import hf_folder_of
from sparse_lm.convert.families import FAMILIES
from sparse_lm.convert.families import FAMILIES_BY_ARCH
from sparse_lm.convert.families import family_of
from sparse_lm.convert.importer import check_tensors
from sparse_lm.convert.importer import config_of
from sparse_lm.convert.importer import hf_to_config
from sparse_lm.convert.importer import import_checkpoint
from sparse_lm.convert.importer import read_hf_config
from sparse_lm.convert.importer import source_dtype
from sparse_lm.convert.safetensors_io import Tensors

__all__ = [
  "FAMILIES",
  "FAMILIES_BY_ARCH",
  "Family",
  "Key",
  "Rule",
  "Tensors",
  "check_exportable",
  "check_tensors",
  "config_of",
  "export_checkpoint",
  "family_of",
  "hf_config",
  "hf_folder_of",
  "hf_to_config",
  "import_checkpoint",
  "read_hf_config",
  "source_dtype",
]
