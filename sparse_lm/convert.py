r"""Hugging Face MoE checkpoints in and out: Mixtral, DBRX, Qwen2-MoE, Qwen3-MoE, OLMoE.

  python -m sparse_lm.convert import --hf_dir=~/hf/Mixtral-8x7B-v0.1 --workdir=runs/mixtral
  python -m sparse_lm.generate --workdir=runs/mixtral --prompt="def fib(n):"
  python -m sparse_lm.main --config=configs/finetune/from_import.py --workdir=runs/mixtral_ft \
      --config.train.init_from=runs/mixtral
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

Each family is one table (FAMILIES): how its config.json maps to our config
and which of its tensors make each of our parameters (and back). Experts are
read in the per-expert hub layout (`experts.{j}.w1`, `experts.{j}.gate_proj`,
...) or in the fused layout transformers 5 keeps in memory and writes for newer
models (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]);
DBRX's are fused its own way ([E * F, H]). Export writes the per-expert layout
(DBRX: its own).

Tensors are read through memory maps (safetensors is a JSON header followed by
raw little-endian arrays) and placed on the target sharding shard by shard
(jax.make_array_from_callback): a host holds one parameter's shard at a time,
plus the page cache, never the whole model twice. Export gathers one parameter
at a time and writes shards of at most --shard_mb.

Bad input (a missing file, an unknown architecture, a config value we cannot
represent, a tensor whose shape disagrees with config.json, a missing expert)
is one line naming the file or tensor, exit 1, and nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable
import uuid

from absl import flags
from flax import nnx
import jax
import ml_dtypes
import numpy as np

from sparse_lm import checkpoint as ckptlib
from sparse_lm import cli
from sparse_lm import config as cfglib
from sparse_lm import params as paramslib
from sparse_lm import state as statelib
from sparse_lm.data import tokenizer as toklib
from sparse_lm.errors import ConfigError
from sparse_lm.errors import ConvertError
from sparse_lm.errors import RunError
from sparse_lm.errors import UserError

Array = np.ndarray


# ------------------------------------------------------------ safetensors


_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class Tensors:
  """The tensors of a checkpoint folder, by name, as read-only memory maps.

  Reads model.safetensors.index.json's weight_map when there is one, else
  model.safetensors. `get(name)` is a numpy view of the file (no copy)."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
      files = ["model.safetensors"]
    else:
      raise ConvertError(
        f"{hf_dir}: no model.safetensors and no model.safetensors.index.json (only safetensors "
        "checkpoints are read)"
      )
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.exists(path):
        raise ConvertError(f"{path}: named in model.safetensors.index.json but missing")
      with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
          header = json.loads(f.read(n))
        except ValueError as e:
          raise ConvertError(f"{path}: not a safetensors file ({e})") from None
      header.pop("__metadata__", None)
      for k, info in header.items():
        self._where[k] = (path, info, 8 + n)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    return sorted(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def get(self, name: str) -> Array:
    if name not in self._where:
      raise ConvertError(f"{self.dir}: the checkpoint has no tensor {name!r}")
    path, info, base = self._where[name]
    if info["dtype"] not in _DTYPES:
      raise ConvertError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not a float type")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == start:
      return np.zeros(shape, _DTYPES[info["dtype"]])
    return np.memmap(path, _DTYPES[info["dtype"]], "r", base + start, shape)


# ------------------------------------------------------------------ rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our parameters `ours` made of the checkpoint's tensors `hf` (and back).

  `to_ours(*hf arrays) -> tuple of our arrays`, `to_hf(*our arrays) -> tuple
  of hf arrays`. With `per_expert`, the hf names hold "{j}" and both functions
  map one expert j; our arrays are stacked over experts on axis 0."""

  ours: tuple[str, ...]
  hf: tuple[str, ...]
  to_ours: Callable[..., tuple]
  to_hf: Callable[..., tuple]
  per_expert: bool = False


def _same(ours: str, hf: str) -> Rule:
  return Rule((ours,), (hf,), lambda w: (w,), lambda a: (a,))


def _linear(ours: str, hf: str) -> Rule:
  """torch Linear [out, in] -> ours [in, out]."""
  return Rule((ours,), (hf,), lambda w: (w.T,), lambda a: (a.T,))


def _heads_in(ours: str, hf: str, n: int, z: int) -> Rule:
  """q / k / v projection [n * Z, D] -> ours [D, n, Z]."""
  return Rule(
    (ours,), (hf,), lambda w: (w.T.reshape(-1, n, z),), lambda a: (a.reshape(a.shape[0], -1).T,)
  )


def _heads_out(ours: str, hf: str, h: int, z: int) -> Rule:
  """Output projection [D, H * Z] -> ours [H, Z, D]."""
  return Rule(
    (ours,), (hf,), lambda w: (w.T.reshape(h, z, -1),), lambda a: (a.reshape(h * z, -1).T,)
  )


def _bias(ours: str, hf: str, n: int, z: int) -> Rule:
  return Rule((ours,), (hf,), lambda b: (b.reshape(n, z),), lambda a: (a.reshape(-1),))


def _experts_linear(ours: str, hf: str) -> Rule:
  """Expert j's Linear [out, in] (hf name with {j}) -> ours[j] [in, out]."""
  return Rule((ours,), (hf,), lambda w: (w.T,), lambda a: (a.T,), per_expert=True)


def _fused_experts(p: str, hf: str, F: int) -> list[Rule]:
  """transformers 5's fused experts: gate_up_proj [E, 2F, D] (gate rows
  first), down_proj [E, D, F]."""
  t = lambda a: np.swapaxes(a, 1, 2)
  return [
    Rule(
      (f"{p}.wg", f"{p}.wi"),
      (f"{hf}.gate_up_proj",),
      lambda gu: (t(gu[:, :F]), t(gu[:, F:])),
      lambda wg, wi: (np.concatenate([t(wg), t(wi)], 1),),
    ),
    Rule((f"{p}.wo",), (f"{hf}.down_proj",), lambda d: (t(d),), lambda wo: (t(wo),)),
  ]


# ---------------------------------------------------------------- families


def _rope_theta(hf: dict, default: float = 10_000.0) -> float:
  rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind != "default":
    raise ConvertError(
      f"config.json rope type {kind!r}: only unscaled RoPE ('default') is supported"
    )
  return float(rp.get("rope_theta", hf.get("rope_theta", default)))


def _need(hf: dict, key: str, *alts: str):
  for k in (key,) + alts:
    if hf.get(k) is not None:
      return hf[k]
  raise ConvertError(f"config.json has no {key!r}")


def _refuse(hf: dict, key: str, ok: Callable, why: str):
  if key in hf and not ok(hf[key]):
    raise ConvertError(f"config.json {key}={hf[key]!r}: {why}")


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face architecture: config.json <-> our config, and the
  tensor rules for a spec (`rules(spec, fused)`)."""

  name: str
  architecture: str  # config.json's "architectures" entry
  model_type: str
  to_config: Callable[[dict], object]
  to_hf_config: Callable[[object, dict], dict]
  rules: Callable[..., list[Rule]]


def _llama_like(hf: dict, *, d_ff_dense: int, moe_ff: int, experts: int, top_k: int, renorm: bool):
  """Our config for the Llama-style families (Mixtral, Qwen-MoE, OLMoE)."""
  _refuse(hf, "hidden_act", lambda v: v == "silu", "only SwiGLU experts (hidden_act 'silu')")
  # Qwen's configs carry a sliding_window that use_sliding_window=false turns
  # off (the released Qwen1.5-MoE's says 32768): only a window in use is refused.
  if hf.get("use_sliding_window", True):
    _refuse(hf, "sliding_window", lambda v: not v, "sliding-window attention is not supported")
  _refuse(hf, "use_sliding_window", lambda v: not v, "sliding-window attention is not supported")
  _refuse(hf, "attention_bias", lambda v: not v, "attention biases on o_proj are not supported")
  _refuse(
    hf, "router_jitter_noise", lambda v: not v, "router jitter on the expert input is not supported"
  )
  c = cfglib.base_config()
  m, moe = c.model, c.model.moe
  m.d_model, m.num_layers = _need(hf, "hidden_size"), _need(hf, "num_hidden_layers")
  m.num_heads = _need(hf, "num_attention_heads")
  m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
  m.head_dim = hf.get("head_dim") or m.d_model // m.num_heads
  m.d_ff, m.activation = d_ff_dense, "swiglu"
  m.norm, m.norm_eps = "rms", float(_need(hf, "rms_norm_eps"))
  m.position, m.rope_theta, m.rope_layout = "rope", _rope_theta(hf), "half"
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  moe.num_experts, moe.top_k, moe.d_ff = experts, top_k, moe_ff
  moe.every, moe.offset = 1, 0
  moe.router = "mixtral" if renorm else "topk"
  if not renorm:
    moe.normalize_gates = False
  moe.dispatch, moe.router_dtype = "dropless", "compute"
  moe.load_balance_weight = float(hf.get("router_aux_loss_coef") or 0.0)
  moe.z_loss_weight = float(hf.get("router_z_loss_coef") or 0.0)
  c.data.vocab_size = _need(hf, "vocab_size")
  c.data.seq_len = min(int(hf.get("max_position_embeddings") or 2048), 2048)
  return c


def _sparse_layers(hf: dict, n: int) -> int:
  """Qwen-MoE's decoder_sparse_step / mlp_only_layers as first_dense_layers
  (the only pattern of dense layers we represent: a prefix)."""
  step = hf.get("decoder_sparse_step", 1) or 1
  if step != 1:
    raise ConvertError(f"config.json decoder_sparse_step={step}: only 1 (every layer) is supported")
  dense = sorted(hf.get("mlp_only_layers") or [])
  if dense != list(range(len(dense))):
    raise ConvertError(
      f"config.json mlp_only_layers={dense}: only a prefix (0, 1, ...) is supported"
    )
  if len(dense) >= n:
    raise ConvertError(f"config.json mlp_only_layers={dense} leaves no MoE layer")
  return len(dense)


def _mixtral_config(hf):
  c = _llama_like(
    hf,
    d_ff_dense=_need(hf, "intermediate_size"),
    moe_ff=_need(hf, "intermediate_size"),
    experts=_need(hf, "num_local_experts"),
    top_k=_need(hf, "num_experts_per_tok"),
    renorm=True,
  )
  return c


def _qwen_config(hf, qk_norm: str):
  renorm = bool(hf.get("norm_topk_prob", False))
  c = _llama_like(
    hf,
    d_ff_dense=_need(hf, "intermediate_size"),
    moe_ff=_need(hf, "moe_intermediate_size"),
    experts=_need(hf, "num_experts", "num_local_experts"),
    top_k=_need(hf, "num_experts_per_tok"),
    renorm=renorm,
  )
  c.model.moe.first_dense_layers = _sparse_layers(hf, c.model.num_layers)
  c.model.qk_norm = qk_norm
  c.model.qkv_bias = bool(hf.get("qkv_bias", qk_norm == "none"))  # Qwen2: biases by default
  shared = hf.get("shared_expert_intermediate_size") or 0
  if shared:
    F = c.model.moe.d_ff
    if shared % F:
      raise ConvertError(
        f"config.json shared_expert_intermediate_size={shared} is not a multiple of "
        f"moe_intermediate_size={F} (model.moe.num_shared_experts x d_ff)"
      )
    c.model.moe.num_shared_experts, c.model.moe.shared_expert_gate = shared // F, True
  return c


def _olmoe_config(hf):
  c = _llama_like(
    hf,
    d_ff_dense=_need(hf, "intermediate_size"),
    moe_ff=_need(hf, "intermediate_size"),
    experts=_need(hf, "num_experts"),
    top_k=_need(hf, "num_experts_per_tok"),
    renorm=bool(hf.get("norm_topk_prob", False)),
  )
  c.model.qk_norm = "full"
  c.model.clip_qkv = float(hf.get("clip_qkv") or 0.0)
  return c


def _dbrx_config(hf):
  attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
  act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name")
  if act != "silu":
    raise ConvertError(
      f"config.json ffn_config.ffn_act_fn={act!r}: only 'silu' (SwiGLU) is supported"
    )
  p = ffn.get("moe_normalize_expert_weights", 1.0)
  if p not in (None, 1, 1.0):
    raise ConvertError(
      f"config.json ffn_config.moe_normalize_expert_weights={p}: only 1 (gates sum to 1) or null"
    )
  if ffn.get("moe_jitter_eps"):
    raise ConvertError("config.json ffn_config.moe_jitter_eps: router jitter is not supported")
  c = cfglib.base_config()
  m, moe = c.model, c.model.moe
  m.d_model, m.num_layers, m.num_heads = (
    _need(hf, "d_model"),
    _need(hf, "n_layers"),
    _need(hf, "n_heads"),
  )
  m.num_kv_heads = attn.get("kv_n_heads") or m.num_heads
  m.head_dim = m.d_model // m.num_heads
  m.d_ff, m.activation = _need(ffn, "ffn_hidden_size"), "swiglu"
  m.norm, m.norm_eps, m.norm_bias = "layer", 1e-5, False  # torch LayerNorm(bias=False)
  m.position, m.rope_layout = "rope", "half"
  m.rope_theta = _rope_theta(hf, attn.get("rope_theta") or 10_000.0)
  m.clip_qkv = float(attn.get("clip_qkv") or 0.0)
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  moe.num_experts, moe.top_k = _need(ffn, "moe_num_experts"), _need(ffn, "moe_top_k")
  moe.every, moe.offset, moe.d_ff = 1, 0, m.d_ff
  moe.router = "mixtral" if p else "topk"
  if not p:
    moe.normalize_gates = False
  moe.dispatch, moe.router_dtype = "dropless", "compute"
  moe.load_balance_weight = float(ffn.get("moe_loss_weight") or 0.0)
  moe.z_loss_weight = 0.0
  c.data.vocab_size = _need(hf, "vocab_size")
  c.data.seq_len = min(int(hf.get("max_seq_len") or 2048), 2048)
  return c


def _llama_attention(m, i: int, pre: str) -> list[Rule]:
  H, J, Z = m.num_heads, m.num_kv_heads, m.head_dim
  a, s = f"blocks.{i}.attn", f"{pre}.self_attn"
  out = [
    _heads_in(f"{a}.wq", f"{s}.q_proj.weight", H, Z),
    _heads_in(f"{a}.wk", f"{s}.k_proj.weight", J, Z),
    _heads_in(f"{a}.wv", f"{s}.v_proj.weight", J, Z),
    _heads_out(f"{a}.wo", f"{s}.o_proj.weight", H, Z),
    _same(f"blocks.{i}.attn_norm.scale", f"{pre}.input_layernorm.weight"),
    _same(f"blocks.{i}.ffn_norm.scale", f"{pre}.post_attention_layernorm.weight"),
  ]
  if m.qkv_bias:
    out += [
      _bias(f"{a}.bq", f"{s}.q_proj.bias", H, Z),
      _bias(f"{a}.bk", f"{s}.k_proj.bias", J, Z),
      _bias(f"{a}.bv", f"{s}.v_proj.bias", J, Z),
    ]
  if m.qk_norm != "none":
    out += [
      _same(f"{a}.q_norm.scale", f"{s}.q_norm.weight"),
      _same(f"{a}.k_norm.scale", f"{s}.k_norm.weight"),
    ]
  return out


def _ends(m, prefix: str = "model") -> list[Rule]:
  out = [
    _same("embed.embedding", f"{prefix}.embed_tokens.weight"),
    _same("final_norm.scale", f"{prefix}.norm.weight"),
  ]
  if not m.tie_embeddings:
    out.append(_linear("unembed", "lm_head.weight"))
  return out


def _llama_rules(moe_name: str, expert_names: tuple[str, str, str]):
  """Rules of a Llama-style family: its MoE module's name in the hub layout
  (Mixtral "block_sparse_moe", others "mlp") and its expert Linear names
  (gate, up, down)."""
  gate, up, down = expert_names

  def rules(m, fused: bool) -> list[Rule]:
    out = _ends(m)
    for i in range(m.num_layers):
      pre, f = f"model.layers.{i}", f"blocks.{i}.ffn"
      out += _llama_attention(m, i, pre)
      if not m.moe_layer(i):
        out += [
          _linear(f"{f}.wg", f"{pre}.mlp.gate_proj.weight"),
          _linear(f"{f}.wi", f"{pre}.mlp.up_proj.weight"),
          _linear(f"{f}.wo", f"{pre}.mlp.down_proj.weight"),
        ]
        continue
      mod = f"{pre}.mlp" if fused else f"{pre}.{moe_name}"
      out.append(_linear(f"{f}.router", f"{mod}.gate.weight"))
      if fused:
        out += _fused_experts(f, f"{mod}.experts", m.moe.d_ff)
      else:
        out += [
          _experts_linear(f"{f}.wg", f"{mod}.experts.{{j}}.{gate}.weight"),
          _experts_linear(f"{f}.wi", f"{mod}.experts.{{j}}.{up}.weight"),
          _experts_linear(f"{f}.wo", f"{mod}.experts.{{j}}.{down}.weight"),
        ]
      if m.moe.num_shared_experts:
        out += [
          _linear(f"{f}.shared_wg", f"{mod}.shared_expert.gate_proj.weight"),
          _linear(f"{f}.shared_wi", f"{mod}.shared_expert.up_proj.weight"),
          _linear(f"{f}.shared_wo", f"{mod}.shared_expert.down_proj.weight"),
          _linear(f"{f}.shared_gate", f"{mod}.shared_expert_gate.weight"),
        ]
    return out

  return rules


def _dbrx_rules(m, fused: bool) -> list[Rule]:
  del fused  # DBRX has one layout of its own
  H, J, Z, D = m.num_heads, m.num_kv_heads, m.head_dim, m.d_model
  E, F = m.moe.num_experts, m.moe.d_ff
  t = lambda a: np.swapaxes(a, 1, 2)
  out = [
    _same("embed.embedding", "transformer.wte.weight"),
    _same("final_norm.scale", "transformer.norm_f.weight"),
  ]
  if not m.tie_embeddings:
    out.append(_linear("unembed", "lm_head.weight"))
  for i in range(m.num_layers):
    b, a, f = f"transformer.blocks.{i}", f"blocks.{i}.attn", f"blocks.{i}.ffn"
    qkv = lambda w: (
      w[: H * Z].T.reshape(D, H, Z),
      w[H * Z : (H + J) * Z].T.reshape(D, J, Z),
      w[(H + J) * Z :].T.reshape(D, J, Z),
    )
    out += [
      Rule(
        (f"{a}.wq", f"{a}.wk", f"{a}.wv"),
        (f"{b}.norm_attn_norm.attn.Wqkv.weight",),
        qkv,
        lambda q, k, v: (np.concatenate([x.reshape(D, -1).T for x in (q, k, v)], 0),),
      ),
      _heads_out(f"{a}.wo", f"{b}.norm_attn_norm.attn.out_proj.weight", H, Z),
      _same(f"blocks.{i}.attn_norm.scale", f"{b}.norm_attn_norm.norm_1.weight"),
      _same(f"blocks.{i}.ffn_norm.scale", f"{b}.norm_attn_norm.norm_2.weight"),
      _linear(f"{f}.router", f"{b}.ffn.router.layer.weight"),
      # w1 (gate) and v1 (up) [E * F, D] are used as x @ w[e].T, w2 [E * F, D] as h @ w2[e].
      Rule(
        (f"{f}.wg",),
        (f"{b}.ffn.experts.mlp.w1",),
        lambda w: (t(w.reshape(E, F, D)),),
        lambda a: (t(a).reshape(E * F, D),),
      ),
      Rule(
        (f"{f}.wi",),
        (f"{b}.ffn.experts.mlp.v1",),
        lambda w: (t(w.reshape(E, F, D)),),
        lambda a: (t(a).reshape(E * F, D),),
      ),
      Rule(
        (f"{f}.wo",),
        (f"{b}.ffn.experts.mlp.w2",),
        lambda w: (w.reshape(E, F, D),),
        lambda a: (a.reshape(E * F, D),),
      ),
    ]
  return out


def _llama_hf_config(c, base: dict, family: str) -> dict:
  m, moe = c.model, c.model.moe
  spec = cfglib.model_spec(c)
  hf = dict(base)
  hf.update(
    hidden_size=m.d_model,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    num_key_value_heads=spec.num_kv_heads,
    hidden_act="silu",
    rms_norm_eps=m.norm_eps,
    tie_word_embeddings=bool(m.tie_embeddings),
    num_experts_per_tok=moe.top_k,
    vocab_size=c.data.vocab_size,
    router_aux_loss_coef=moe.load_balance_weight,
  )
  if base.get("head_dim") is not None or spec.head_dim != m.d_model // m.num_heads:
    hf["head_dim"] = spec.head_dim  # else transformers' default (hidden_size / heads)
  rp = dict(hf.get("rope_parameters") or {"rope_type": "default"})
  rp["rope_theta"] = m.rope_theta
  hf["rope_parameters"] = rp
  hf.pop("rope_theta", None)
  if family == "mixtral":
    hf.update(intermediate_size=spec.moe.d_ff, num_local_experts=moe.num_experts)
  elif family == "olmoe":
    hf.update(
      intermediate_size=spec.moe.d_ff,
      num_experts=moe.num_experts,
      norm_topk_prob=moe.router == "mixtral",
      clip_qkv=m.clip_qkv or None,
    )
  else:
    # The hub's configs say num_experts; transformers 5 writes Qwen3-MoE's
    # as num_local_experts (an alias): keep the source's spelling.
    key = "num_local_experts" if "num_local_experts" in base else "num_experts"
    hf.update(
      intermediate_size=m.d_ff,
      moe_intermediate_size=spec.moe.d_ff,
      norm_topk_prob=moe.router == "mixtral",
      decoder_sparse_step=1,
      mlp_only_layers=list(range(moe.first_dense_layers)),
    )
    hf[key] = moe.num_experts
    if family == "qwen2_moe":
      hf.update(
        qkv_bias=bool(m.qkv_bias),
        shared_expert_intermediate_size=moe.num_shared_experts * spec.moe.d_ff,
      )
  return hf


def _dbrx_hf_config(c, base: dict) -> dict:
  m, moe = c.model, c.model.moe
  spec = cfglib.model_spec(c)
  hf = dict(base)
  attn = dict(hf.get("attn_config") or {})
  attn.update(kv_n_heads=spec.num_kv_heads, clip_qkv=m.clip_qkv or None, rope_theta=m.rope_theta)
  ffn = dict(hf.get("ffn_config") or {})
  ffn.update(
    ffn_hidden_size=spec.moe.d_ff,
    moe_num_experts=moe.num_experts,
    moe_top_k=moe.top_k,
    moe_normalize_expert_weights=1.0 if moe.router == "mixtral" else None,
    moe_loss_weight=moe.load_balance_weight,
    ffn_act_fn={"name": "silu"},
  )
  rp = dict(hf.get("rope_parameters") or {"rope_type": "default"})
  rp["rope_theta"] = m.rope_theta
  hf.update(
    d_model=m.d_model,
    n_layers=m.num_layers,
    n_heads=m.num_heads,
    vocab_size=c.data.vocab_size,
    tie_word_embeddings=bool(m.tie_embeddings),
    attn_config=attn,
    ffn_config=ffn,
    rope_parameters=rp,
  )
  return hf


def _llama_family(name: str, arch: str, to_config, moe_name: str = "mlp") -> Family:
  """A Llama-style family; Mixtral's experts are w1 / w3 / w2 under
  block_sparse_moe, the others' gate_proj / up_proj / down_proj under mlp."""
  experts = ("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj", "down_proj")
  return Family(
    name,
    arch,
    name,
    to_config,
    lambda c, base: _llama_hf_config(c, base, name),
    _llama_rules(moe_name, experts),
  )


FAMILIES = {
  f.name: f
  for f in (
    _llama_family("mixtral", "MixtralForCausalLM", _mixtral_config, "block_sparse_moe"),
    _llama_family("qwen2_moe", "Qwen2MoeForCausalLM", lambda hf: _qwen_config(hf, "none")),
    _llama_family("qwen3_moe", "Qwen3MoeForCausalLM", lambda hf: _qwen_config(hf, "head")),
    _llama_family("olmoe", "OlmoeForCausalLM", _olmoe_config),
    Family("dbrx", "DbrxForCausalLM", "dbrx", _dbrx_config, _dbrx_hf_config, _dbrx_rules),
  )
}


def family_of(hf: dict, path: str) -> Family:
  archs = hf.get("architectures") or []
  for f in FAMILIES.values():
    if f.architecture in archs:
      return f
  known = ", ".join(f.architecture for f in FAMILIES.values())
  raise ConvertError(f"{path}: architectures {archs} is not one of {known}")


# ------------------------------------------------------------------ import


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir}: no such folder")
  if not os.path.exists(path):
    raise ConvertError(f"{path}: no such file (a Hugging Face checkpoint folder has config.json)")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ConvertError(f"{path}: not JSON ({e})") from None


def hf_to_config(hf_dir: str):
  """(family, our config) of a checkpoint folder's config.json, validated."""
  hf = read_hf_config(hf_dir)
  fam = family_of(hf, os.path.join(hf_dir, "config.json"))
  c = fam.to_config(hf)
  c.data.tokenizer, c.data.tokenizer_file = "huggingface", os.path.join(hf_dir, "tokenizer.json")
  try:
    cfglib.validate(c)
  except ConfigError as e:
    raise ConvertError(f"{hf_dir}/config.json gives an invalid config: {e}") from None
  return fam, c


def _layout(t: Tensors) -> bool:
  """True for the fused expert layout (experts.gate_up_proj)."""
  return any(n.endswith("experts.gate_up_proj") for n in t.names())


def _hf_names(rule: Rule, E: int) -> list[str]:
  if not rule.per_expert:
    return list(rule.hf)
  return [n.format(j=j) for n in rule.hf for j in range(E)]


def check_tensors(rules: list[Rule], t: Tensors, spec, shapes: dict[str, tuple]):
  """Every tensor the rules read is there with the shape the config implies,
  and no tensor is left unread: one line naming the first that is not."""
  E = spec.moe.num_experts
  wanted: set[str] = set()
  for r in rules:
    names = _hf_names(r, E)
    for n in names:
      if n not in t:
        what = "an expert's weight" if r.per_expert else "a tensor"
        raise ConvertError(f"{t.dir}: {what} {n!r} is missing from the checkpoint")
    wanted.update(names)
    # The expected hf shapes: our (abstract) parameters mapped back.
    ours = [shapes[o.replace(".", "/")] for o in r.ours]
    zeros = [np.zeros(sh[1:] if r.per_expert else sh, np.float32) for sh in ours]
    for n, want in zip(r.hf, r.to_hf(*zeros)):
      for name in [n.format(j=j) for j in range(E)] if r.per_expert else [n]:
        if t.shape(name) != want.shape:
          raise ConvertError(
            f"{t.dir}: tensor {name!r} has shape {list(t.shape(name))}, config.json implies "
            f"{list(want.shape)}"
          )
  extra = [n for n in t.names() if n not in wanted and not n.endswith("rotary_emb.inv_freq")]
  if extra:
    raise ConvertError(
      f"{t.dir}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not used by the "
      f"{spec.moe.num_experts}-expert config of config.json; a mapping is missing"
    )


def _param_source(rules: list[Rule]) -> dict[str, tuple[Rule, int]]:
  """{our parameter path ("blocks/0/attn/wq"): (its rule, its index in rule.ours)}."""
  return {o.replace(".", "/"): (r, k) for r in rules for k, o in enumerate(r.ours)}


def _read(t: Tensors, rule: Rule, k: int, index, E: int) -> Array:
  """Our parameter rule.ours[k], the part `index` (a tuple of slices) of it."""
  if not rule.per_expert:
    full = rule.to_ours(*(t.get(n) for n in rule.hf))[k]
    return np.ascontiguousarray(full[index], np.float32)
  experts = range(E)[index[0]] if index else range(E)
  rest = index[1:] if index else ()
  parts = [rule.to_ours(*(t.get(n.format(j=j)) for n in rule.hf))[k][rest] for j in experts]
  return np.ascontiguousarray(np.stack(parts), np.float32)


def load_params(t: Tensors, rules: list[Rule], spec, abs_params: dict, shardings: dict) -> dict:
  """Our parameters {path: jax.Array} read shard by shard onto `shardings`."""
  src = _param_source(rules)
  missing = sorted(set(abs_params) - set(src))
  if missing:
    raise ConvertError(f"no mapping makes our parameter {missing[0]!r} ({len(missing)} in all)")
  out = {}
  for path, a in abs_params.items():
    rule, k = src[path]
    cb = lambda index, rule=rule, k=k: _read(t, rule, k, index, spec.moe.num_experts)
    shd = shardings[path]
    shd = shd.get_value() if isinstance(shd, nnx.Variable) else shd
    a = a.get_value() if isinstance(a, nnx.Variable) else a
    out[path] = jax.make_array_from_callback(a.shape, shd, cb)
  return out


def import_checkpoint(hf_dir: str, workdir: str, mesh_spec=None, say=print) -> dict:
  """Writes `workdir` from the checkpoint folder `hf_dir`; returns a summary."""
  from sparse_lm import sharding  # pylint: disable=g-import-not-at-top

  hf_dir, workdir = (
    os.path.abspath(os.path.expanduser(hf_dir)),
    os.path.abspath(os.path.expanduser(workdir)),
  )
  fam, c = hf_to_config(hf_dir)
  if mesh_spec is not None:
    c.mesh = mesh_spec
    cfglib.validate(c)
  if not os.path.exists(c.data.tokenizer_file):
    raise ConvertError(
      f"{c.data.tokenizer_file}: no such file (the run needs the checkpoint's tokenizer)"
    )
  c.data.tokenizer_file = os.path.join(workdir, "hf", "tokenizer.json")
  if os.path.exists(os.path.join(workdir, "config.json")) or os.path.isdir(
    os.path.join(workdir, "checkpoints")
  ):
    raise ConvertError(f"--workdir={workdir} already holds a run; import into a new folder")
  t = Tensors(hf_dir)
  spec = cfglib.model_spec(c)
  fused = _layout(t)
  rules = fam.rules(spec, fused)
  V = c.data.vocab_size

  mesh = sharding.make_mesh(c)
  with sharding.use(mesh, c):
    graphdef, abs_state, shd = statelib.abstract_state(c, V, mesh)
    abs_params = paramslib.params_of(abs_state)
    shapes = {p: a.get_value().shape for p, a in abs_params.items()}
    check_tensors(rules, t, spec, shapes)
    flat_shd = paramslib.params_of(shd)
    params = load_params(t, rules, spec, abs_params, flat_shd)

    def with_params(params):
      # The train state (fresh optimizer state) holding `params`. Inside one
      # jit the fresh init of the parameters is dead code (the optimizer's
      # zeros do not read it), and the loaded buffers are donated: the
      # devices hold the model once.
      state = nnx.state(statelib.create(c, V))
      leaves = paramslib.model_leaves(state)
      by_kp = {leaves[p][0]: v for p, v in params.items()}
      return jax.tree_util.tree_map_with_path(lambda kp, x: by_kp.get(kp, x), state)

    state = jax.jit(with_params, out_shardings=shd, donate_argnums=0)(params)

    # Nothing was written before this point: every check above is on input.
    staging = f"{workdir}.importing-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(staging, "hf"))
    try:
      for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
      ):
        if os.path.exists(os.path.join(hf_dir, name)):
          shutil.copy(os.path.join(hf_dir, name), os.path.join(staging, "hf", name))
      _ensure_eos(staging, hf_dir)
      tok = toklib.HuggingFaceTokenizer(os.path.join(staging, "hf", "tokenizer.json"), V)
      tok_fp = dict(tok.fingerprint, path=c.data.tokenizer_file)
      ckpt = ckptlib.Checkpointer(staging, keep=None, say=say)
      try:
        ckpt.save(0, state, {"batches": 0})
      finally:
        ckpt.close()
      ckptlib.save_config(c, staging, {"tokenizer": tok_fp, "imported_from": hf_dir})
      with open(os.path.join(staging, "hf", "import.json"), "w") as f:
        json.dump(
          {"family": fam.name, "layout": "fused" if fused else "per_expert", "from": hf_dir}, f
        )
      os.makedirs(os.path.dirname(workdir) or ".", exist_ok=True)
      if os.path.isdir(workdir) and not os.listdir(workdir):
        os.rmdir(workdir)
      os.rename(staging, workdir)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  n = sum(int(np.prod(s)) for s in shapes.values())
  return {"family": fam.name, "layout": "fused" if fused else "per_expert", "params": n}


def _ensure_eos(staging: str, hf_dir: str):
  """tokenizer_config.json names eos_token (from config.json's eos_token_id
  when the checkpoint's does not)."""
  tc = os.path.join(staging, "hf", "tokenizer_config.json")
  tj = os.path.join(staging, "hf", "tokenizer.json")
  if not os.path.exists(tj):
    return
  cfg = {}
  if os.path.exists(tc):
    with open(tc) as f:
      cfg = json.load(f)
  if cfg.get("eos_token"):
    return
  eos = read_hf_config(hf_dir).get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  import tokenizers  # pylint: disable=g-import-not-at-top

  token = tokenizers.Tokenizer.from_file(tj).id_to_token(eos) if eos is not None else None
  if token is None:
    raise ConvertError(
      f"{hf_dir}: neither tokenizer_config.json nor config.json names an eos token"
    )
  cfg["eos_token"] = token
  with open(tc, "w") as f:
    json.dump(cfg, f, indent=1)


# ------------------------------------------------------------------ export


def export_checkpoint(
  workdir: str, hf_dir: str, step=None, family=None, dtype=None, shard_mb=2000, say=print
) -> dict:
  """Writes `hf_dir` (config.json, safetensors shards and their index, the
  run's tokenizer files) from a run's checkpoint."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  workdir, hf_dir = (
    os.path.abspath(os.path.expanduser(workdir)),
    os.path.abspath(os.path.expanduser(hf_dir)),
  )
  c = ckptlib.read_config(workdir)
  src_hf = hf_folder_of(workdir)
  base = {}
  if src_hf:
    with open(os.path.join(src_hf, "config.json")) as f:
      base = json.load(f)
  if family is None:
    family = FAMILIES_BY_ARCH.get((base.get("architectures") or [""])[0], None)
    family = family.name if family else "mixtral"
  if family not in FAMILIES:
    raise ConvertError(f"--family={family!r}: one of {', '.join(FAMILIES)}")
  fam = FAMILIES[family]
  if base and (base.get("architectures") or [""])[0] != fam.architecture:
    base = {}
  check_exportable(c, fam)
  if os.path.exists(hf_dir) and os.listdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir} is not empty; export into a new folder")
  spec = cfglib.model_spec(c)
  rules = fam.rules(spec, False)
  model, c, tok = statelib.load_model(workdir, step)
  params = {
    paramslib.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  src = _param_source(rules)
  missing = sorted(set(params) - set(src))
  if missing:
    raise ConvertError(f"{fam.name} has no tensor for our parameter {missing[0]!r}")
  out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype or np.float32)
  E = spec.moe.num_experts

  staging = f"{hf_dir}.exporting-{uuid.uuid4().hex[:8]}"
  os.makedirs(staging)
  try:
    shards, cur, size = [], {}, 0
    for r in rules:
      ours = [np.asarray(jax.device_get(params[o.replace(".", "/")])) for o in r.ours]
      if r.per_expert:
        tensors = {}
        for j in range(E):
          for n, v in zip(r.hf, r.to_hf(*(a[j] for a in ours))):
            tensors[n.format(j=j)] = v
      else:
        tensors = dict(zip(r.hf, r.to_hf(*ours)))
      for n, v in tensors.items():
        v = np.ascontiguousarray(v).astype(out_dtype)
        if cur and size + v.nbytes > shard_mb * 2**20:
          shards.append(cur)
          cur, size = {}, 0
        cur[n], size = v, size + v.nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, sh in enumerate(shards):
      name = (
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if len(shards) > 1
        else "model.safetensors"
      )
      save_file(sh, os.path.join(staging, name), metadata={"format": "pt"})
      for n, v in sh.items():
        weight_map[n] = name
        total += v.nbytes
    if len(shards) > 1:
      with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    hf = fam.to_hf_config(
      c, base or {"architectures": [fam.architecture], "model_type": fam.model_type}
    )
    hf["architectures"], hf["model_type"] = [fam.architecture], fam.model_type
    hf["dtype"] = "bfloat16" if dtype == "bfloat16" else str(out_dtype)
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
      if src_hf and os.path.exists(os.path.join(src_hf, name)):
        shutil.copy(os.path.join(src_hf, name), os.path.join(staging, name))
    if not os.path.exists(os.path.join(staging, "tokenizer.json")):
      say(
        f"{workdir}'s tokenizer is data.tokenizer={c.data.tokenizer!r}, not a tokenizer.json: "
        "the export holds the weights and config.json only"
      )
    if os.path.isdir(hf_dir):
      os.rmdir(hf_dir)
    os.makedirs(os.path.dirname(hf_dir) or ".", exist_ok=True)
    os.rename(staging, hf_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return {"family": fam.name, "tensors": len(weight_map), "shards": len(shards), "bytes": total}


def hf_folder_of(workdir: str) -> str:
  """The hf/ folder of an imported run, or of the run its weights came from
  (train.init_from, followed back): its config.json and tokenizer files are
  what an export starts from. "" when there is none (a run trained here)."""
  for _ in range(16):
    if os.path.exists(os.path.join(workdir, "hf", "config.json")):
      return os.path.join(workdir, "hf")
    try:
      source = ckptlib.read_config(workdir).train.init_from
    except RunError:
      return ""
    if not source:
      return ""
    workdir = ckptlib.parse_source(source)[0]
  return ""


FAMILIES_BY_ARCH = {f.architecture: f for f in FAMILIES.values()}


def check_exportable(c, fam: Family):
  """One line naming the first config key the family cannot represent."""
  m, moe = c.model, c.model.moe
  spec = cfglib.model_spec(c)
  llama = fam.name != "dbrx"
  want = [
    ("model.moe.num_experts", spec.is_moe, "a dense model has no MoE family"),
    ("model.activation", m.activation == "swiglu", "must be 'swiglu'"),
    ("model.moe.activation", spec.moe.activation == "swiglu", "must be 'swiglu'"),
    ("model.position", m.position == "rope", "must be 'rope'"),
    ("model.rope_layout", m.rope_layout == "half", "must be 'half'"),
    (
      "model.norm",
      m.norm == ("rms" if llama else "layer"),
      f"must be {'rms' if llama else 'layer'!r}",
    ),
    ("model.moe.every", moe.every == 1, "must be 1 (every layer MoE)"),
    ("model.moe.router", moe.router in ("mixtral", "topk"), "must be 'mixtral' or 'topk'"),
    ("model.moe.num_groups", not moe.num_groups, "must be 0"),
  ]
  if moe.router == "topk":
    want.append(
      (
        "model.moe.normalize_gates",
        not moe.normalize_gates,
        "use router 'mixtral' for renormalised gates",
      )
    )
  if fam.name == "mixtral":
    want += [
      ("model.moe.router", moe.router == "mixtral", "Mixtral renormalises its gates: 'mixtral'")
    ]
  if fam.name != "qwen2_moe":
    want += [
      (
        "model.moe.num_shared_experts",
        not moe.num_shared_experts,
        f"{fam.name} has no shared experts",
      ),
      ("model.qkv_bias", not m.qkv_bias, f"{fam.name} has no q/k/v biases"),
    ]
  else:
    want.append(
      (
        "model.moe.shared_expert_gate",
        moe.shared_expert_gate or not moe.num_shared_experts,
        "Qwen2-MoE gates its shared expert",
      )
    )
  if fam.name in ("mixtral", "dbrx", "olmoe"):
    want.append(
      (
        "model.moe.first_dense_layers",
        not moe.first_dense_layers,
        f"{fam.name} has no dense layers",
      )
    )
  qk = {"qwen3_moe": "head", "olmoe": "full"}.get(fam.name, "none")
  want.append(("model.qk_norm", m.qk_norm == qk, f"{fam.name} needs {qk!r}"))
  if fam.name not in ("dbrx", "olmoe"):
    want.append(("model.clip_qkv", not m.clip_qkv, f"{fam.name} has no clip_qkv"))
  if fam.name == "dbrx":
    want += [
      ("model.norm_bias", not m.norm_bias, "DBRX's LayerNorm has no bias"),
      ("model.norm_eps", m.norm_eps == 1e-5, "DBRX's LayerNorm eps is 1e-5"),
      ("model.head_dim", spec.head_dim * m.num_heads == m.d_model, "must be d_model / num_heads"),
    ]
  for key, ok, why in want:
    if not ok:
      raise ConvertError(
        f"config.{key}={cfglib._get(c, key)!r} cannot be exported as {fam.architecture}: {why}"
      )


# -------------------------------------------------------------------- main


def _define_flags():
  """Only when run as a program: tests import this module beside others that
  define --workdir."""
  flags.DEFINE_string("hf_dir", None, "The Hugging Face checkpoint folder (read or written).")
  flags.DEFINE_string("workdir", None, "The run folder (written by import, read by export).")
  flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
  flags.DEFINE_string(
    "family",
    None,
    "export: " + " | ".join(FAMILIES) + " (default: the imported one, else mixtral).",
  )
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: the tensors' dtype.")
  flags.DEFINE_integer("shard_mb", 2000, "export: the largest shard file, in MiB.")
  flags.DEFINE_string(
    "mesh", None, "import: place the parameters on this mesh (config.mesh syntax)."
  )


def main(argv):
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    raise UserError("usage: python -m sparse_lm.convert import|export --hf_dir=DIR --workdir=W")
  F = flags.FLAGS
  for name in ("hf_dir", "workdir"):
    if not F[name].value:
      raise UserError(f"--{name} is required")
  if argv[1] == "import":
    import ast  # pylint: disable=g-import-not-at-top

    mesh = ast.literal_eval(F.mesh) if F.mesh else None
    out = import_checkpoint(F.hf_dir, F.workdir, mesh)
    print(
      f"imported {out['family']} ({out['layout']} experts, {out['params']:,} parameters) "
      f"from {F.hf_dir} into {F.workdir}"
    )
  else:
    out = export_checkpoint(F.workdir, F.hf_dir, F.step, F.family, F.dtype, F.shard_mb)
    print(
      f"exported {out['tensors']} tensors ({out['bytes'] / 2**20:.1f} MiB, {out['shards']} "
      f"shard(s)) as {out['family']} into {F.hf_dir}"
    )


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "sparse_lm.convert", config_flags=())
