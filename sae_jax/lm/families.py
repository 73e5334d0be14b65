"""The supported model families: a Hugging Face `config.json` -> `Arch`, and a checkpoint's
tensor names -> the params pytree of `sae_jax.lm.transformer`.

Each family is a table of switches (see `transformer`), written from transformers'
modeling code and checked against it by the golden fixtures in `tests/fixtures/causal/`:
* GPT-2: LayerNorm, learned positions, fused qkv stored as (in, out) `Conv1D`, tanh GELU;
* Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3): RMSNorm, RoPE (default, linear or
  llama3 scaling), gated SiLU MLP, grouped-query attention, Qwen2's qkv bias, Qwen3's
  per-head q/k norms, Mistral's sliding window;
* Gemma 2 / Gemma 3: (1 + w) RMSNorm before and after each sub-layer, embeddings scaled by
  sqrt(d), query scale 1/sqrt(query_pre_attn_scalar), local/global layer alternation (Gemma
  3: its own RoPE base locally), attention and final-logit soft-capping (Gemma 2), q/k norms
  (Gemma 3).
"""

from __future__ import annotations

import math

import numpy as np

from sae_jax.errors import UserError
from sae_jax.lm.transformer import ROPE_TYPES, Arch, Rope

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GEMMA = ("gemma2", "gemma3_text", "gemma3")
SUPPORTED = ("gpt2", *LLAMA_LIKE, *GEMMA)
ACTIVATION_NAMES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "gelu": "gelu", "silu": "silu", "swish": "silu",
                    "relu": "relu"}


def text_config(config: dict) -> dict:
    """The language model's config (Gemma 3 multimodal checkpoints nest it)."""
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        return {"model_type": "gemma3_text", **config["text_config"]}
    return config


def _activation(name: str) -> str:
    if name not in ACTIVATION_NAMES:
        raise UserError(f"unsupported activation {name!r}; supported: "
                        f"{', '.join(ACTIVATION_NAMES)}")
    return ACTIVATION_NAMES[name]


def _rope(params: dict | None, theta: float) -> Rope:
    """A `Rope` from a config's `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"unsupported RoPE scaling {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    return Rope(theta=float(params.get("rope_theta", theta)), kind=kind,
                factor=float(params.get("factor", 1.0)),
                low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                original_max_positions=int(params.get("original_max_position_embeddings", 8192)))


def _layer_types(c: dict, n: int, default) -> tuple[str, ...]:
    types = c.get("layer_types")
    if types is None:
        return tuple(default(i) for i in range(n))
    if len(types) != n:
        raise UserError(f"config.json: layer_types has {len(types)} entries for {n} layers")
    return tuple("sliding" if "sliding" in t else "full" for t in types)


def arch_from_config(config: dict) -> Arch:
    """The `Arch` of a Hugging Face `config.json`; unknown `model_type` is a one-line error."""
    c = text_config(config)
    kind = c.get("model_type")
    if kind not in SUPPORTED:
        raise UserError(f"unsupported model_type {kind!r}; supported: {', '.join(SUPPORTED)}")
    try:
        return _gpt2(c) if kind == "gpt2" else _gemma(c) if kind in GEMMA else _llama(c)
    except KeyError as e:
        raise UserError(f"config.json of this {kind} model lacks {e}") from None


def _gpt2(c: dict) -> Arch:
    d, n = c["n_embd"], c["n_layer"]
    return Arch(model_type="gpt2", vocab_size=c["vocab_size"], d_model=d, n_layers=n,
                n_heads=c["n_head"], n_kv_heads=c["n_head"], head_dim=d // c["n_head"],
                d_mlp=c.get("n_inner") or 4 * d, norm="layernorm",
                norm_eps=c.get("layer_norm_epsilon", 1e-5),
                activation=_activation(c.get("activation_function", "gelu_new")),
                gated_mlp=False, tied_embeddings=c.get("tie_word_embeddings", True),
                layer_types=("full",) * n, max_positions=c.get("n_positions", 1024))


def _rope_config(c: dict, layer_type: str = "full_attention"):
    """`(rope_theta, scaling dict)` from either config generation (per layer type in 5)."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict):
        return params.get("rope_theta", c.get("rope_theta", 10000.0)), params
    return c.get("rope_theta", 10000.0), c.get("rope_scaling")


def _llama(c: dict) -> Arch:
    d, n, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    window = c.get("sliding_window") if c["model_type"] == "mistral" else None
    if c["model_type"] in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        window = c.get("sliding_window")
    theta, scaling = _rope_config(c)
    return Arch(model_type=c["model_type"], vocab_size=c["vocab_size"], d_model=d, n_layers=n,
                n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or d // heads, d_mlp=c["intermediate_size"],
                norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
                activation=_activation(c.get("hidden_act", "silu")), gated_mlp=True,
                tied_embeddings=c.get("tie_word_embeddings", False),
                layer_types=_layer_types(c, n, lambda i: "sliding" if window else "full"),
                rope=_rope(scaling, theta), max_positions=c.get("max_position_embeddings", 4096),
                qk_norm=c["model_type"] == "qwen3", sliding_window=window)


def _gemma(c: dict) -> Arch:
    d, n, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    gemma3 = c["model_type"] != "gemma2"
    pattern = c.get("sliding_window_pattern", 6)
    default = ((lambda i: "sliding" if (i + 1) % pattern else "full") if gemma3 else
               (lambda i: "full" if i % 2 else "sliding"))
    theta, scaling = _rope_config(c)
    local = None
    if gemma3:
        local_theta, local_params = _rope_config(c, "sliding_attention")
        local_theta = c.get("rope_local_base_freq", local_theta)
        local = _rope(local_params if c.get("rope_parameters") else None, local_theta)
    return Arch(model_type=c["model_type"], vocab_size=c["vocab_size"], d_model=d, n_layers=n,
                n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or d // heads, d_mlp=c["intermediate_size"],
                norm="rmsnorm_plus_one", norm_eps=c.get("rms_norm_eps", 1e-6),
                activation=_activation(c.get("hidden_activation") or
                                       c.get("hidden_act", "gelu_pytorch_tanh")),
                gated_mlp=True, tied_embeddings=c.get("tie_word_embeddings", True),
                layer_types=_layer_types(c, n, default), rope=_rope(scaling, theta),
                rope_local=local, max_positions=c.get("max_position_embeddings", 8192),
                attn_scale=c.get("query_pre_attn_scalar", d // heads) ** -0.5,
                qk_norm=gemma3, post_norms=True,
                # Gemma 3's attention never reads attn_logit_softcapping (transformers 5.24)
                attn_softcap=None if gemma3 else c.get("attn_logit_softcapping"),
                final_softcap=c.get("final_logit_softcapping"), embed_scale=math.sqrt(d),
                sliding_window=c.get("sliding_window"))


# ---------------------------------------------------------------------------- weights


def _prefix(tensors: dict, suffix: str) -> str:
    """The name prefix under which a checkpoint stores its decoder (`model.`, `transformer.`,
    a multimodal wrapper's `language_model.model.`, or none)."""
    for name in sorted(tensors, key=len):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise UserError(f"the checkpoint has no tensor named *{suffix}: not this model family")


def params_from_weights(arch: Arch, tensors: dict[str, np.ndarray]) -> dict:
    """The params pytree (numpy, linear weights as (in, out)) from a checkpoint's tensors."""
    get = _getter(tensors)
    if arch.model_type == "gpt2":
        return _gpt2_params(arch, tensors, get)
    pre = _prefix(tensors, "embed_tokens.weight")
    gemma = arch.model_type in GEMMA

    def linear(name, bias=False):
        out = {"w": get(f"{name}.weight").T}
        if f"{name}.bias" in tensors:
            out["b"] = get(f"{name}.bias")
        return out

    layers = []
    for i in range(arch.n_layers):
        p = f"{pre}layers.{i}."
        layer = {"attn_norm": {"scale": get(p + "input_layernorm.weight")},
                 **{k: linear(p + f"self_attn.{k}_proj") for k in "qkvo"},
                 **{k: linear(p + f"mlp.{k}_proj") for k in ("gate", "up", "down")}}
        if arch.qk_norm:
            layer["q_norm"] = {"scale": get(p + "self_attn.q_norm.weight")}
            layer["k_norm"] = {"scale": get(p + "self_attn.k_norm.weight")}
        if gemma:
            layer["attn_post_norm"] = {"scale": get(p + "post_attention_layernorm.weight")}
            layer["mlp_norm"] = {"scale": get(p + "pre_feedforward_layernorm.weight")}
            layer["mlp_post_norm"] = {"scale": get(p + "post_feedforward_layernorm.weight")}
        else:
            layer["mlp_norm"] = {"scale": get(p + "post_attention_layernorm.weight")}
        layers.append(layer)
    params = {"embed": get(f"{pre}embed_tokens.weight"), "layers": layers,
              "final_norm": {"scale": get(f"{pre}norm.weight")}}
    if not arch.tied_embeddings:
        params["unembed"] = get("lm_head.weight").T
    return params


def _gpt2_params(arch: Arch, tensors: dict, get) -> dict:
    pre = _prefix(tensors, "wte.weight")
    d = arch.d_model

    def ln(name):
        return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

    def conv(name):  # GPT-2's Conv1D already stores (in, out)
        return {"w": get(f"{name}.weight"), "b": get(f"{name}.bias")}

    layers = []
    for i in range(arch.n_layers):
        p = f"{pre}h.{i}."
        qkv_w, qkv_b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")
        layers.append({
            "attn_norm": ln(p + "ln_1"), "mlp_norm": ln(p + "ln_2"),
            **{k: {"w": qkv_w[:, j * d:(j + 1) * d], "b": qkv_b[j * d:(j + 1) * d]}
               for j, k in enumerate("qkv")},
            "o": conv(p + "attn.c_proj"), "up": conv(p + "mlp.c_fc"),
            "down": conv(p + "mlp.c_proj")})
    params = {"embed": get(f"{pre}wte.weight"), "positions": get(f"{pre}wpe.weight"),
              "layers": layers, "final_norm": ln(f"{pre}ln_f")}
    if not arch.tied_embeddings:
        params["unembed"] = get("lm_head.weight").T
    return params


def _getter(tensors: dict):
    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"the checkpoint lacks tensor {name!r}")
        return tensors[name]
    return get
