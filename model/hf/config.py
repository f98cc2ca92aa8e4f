"""config.json <-> the model, attention and moe sections: what each family means, what is refused."""

from __future__ import annotations

from typing import Any

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# transformers' default rope_theta per family, for a config.json that names none.
DEFAULT_THETA = {"llama": 10000.0, "qwen2": 10000.0, "mixtral": 1e6, "qwen2_moe": 10000.0, "qwen3_moe": 10000.0}


def config_error(key: str, value: Any, why: str) -> ConfigError:
    """The error for config.json's `key` holding `value`."""
    return ConfigError(f"config.json {key}={value!r}: {why}")


def _require(cfg: dict, key: str, allowed: Any, default: Any, why: str) -> None:
    value = cfg.get(key, default)
    if value != allowed:
        raise config_error(key, value, why)


def _int(cfg: dict, key: str, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:  # absent, or null (what transformers writes for "derive it")
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise config_error(key, value, "expected an integer")
    return value


def _rope_theta(cfg: dict, family: str) -> float:
    """rope_theta from transformers 5's rope_parameters or the older top-level keys; only plain RoPE."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise config_error("rope_parameters", params, "expected a mapping")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise config_error("rope_parameters.rope_type", kind, "sparsetron has plain rotary positions only")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise config_error(
                f"rope_parameters.{extra[0]}", params[extra[0]], "sparsetron has plain rotary positions only"
            )
        theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA[family]))
    else:
        theta = cfg.get("rope_theta", DEFAULT_THETA[family])
    scaling = cfg.get("rope_scaling")
    if scaling is not None and (
        not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        raise config_error("rope_scaling", scaling, "sparsetron has no rotary scaling (plain RoPE only)")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise config_error("rope_theta", theta, "expected a number")
    return float(theta)


def _check_full_attention(cfg: dict, family: str) -> None:
    if family in ("qwen2", "qwen2_moe"):
        _require(cfg, "use_sliding_window", False, False, "sparsetron has no sliding-window attention")
        layer_types = cfg.get("layer_types") or []
        sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
        if sliding:
            raise config_error(
                f"layer_types[{sliding[0]}]", layer_types[sliding[0]], "only full_attention is supported"
            )
    elif family in ("mixtral", "qwen3_moe"):
        # transformers applies the window whenever it is set (use_sliding_window is not read).
        _require(cfg, "sliding_window", None, None, "sparsetron has no sliding-window attention; must be null")


def _dense_prefix(cfg: dict, n_layers: int) -> int:
    """first_k_dense of a Qwen MoE stack; refuses a dense/MoE pattern that is not a prefix."""
    step = _int(cfg, "decoder_sparse_step", 1)
    only = cfg.get("mlp_only_layers") or []
    if step < 1:
        raise config_error("decoder_sparse_step", step, "must be >= 1")
    dense = [i for i in range(n_layers) if i in only or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        key, value = ("decoder_sparse_step", step) if step != 1 else ("mlp_only_layers", only)
        raise config_error(
            key, value, f"dense layers {dense} are not a prefix 0..k-1 (sparsetron has moe.first_k_dense)"
        )
    return len(dense)


def config_from_hf(cfg: dict) -> tuple[str, ModelConfig, AttentionConfig, MoEConfig]:
    """(family, model, attention, moe) configs equivalent to a config.json mapping; ConfigError
    naming the key when sparsetron cannot represent it exactly."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise config_error("model_type", family, f"supported families are {', '.join(FAMILIES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise config_error("hidden_act", act, "sparsetron's FFN is SwiGLU (silu)")
    dropout = cfg.get("attention_dropout", 0.0)
    if dropout:
        raise config_error("attention_dropout", dropout, "sparsetron has no attention dropout")
    _check_full_attention(cfg, family)

    dim, n_layers = _int(cfg, "hidden_size"), _int(cfg, "num_hidden_layers")
    n_heads = _int(cfg, "num_attention_heads")
    n_kv = _int(cfg, "num_key_value_heads", n_heads)
    head_dim = _int(cfg, "head_dim", dim // n_heads)
    model = ModelConfig(
        vocab_size=_int(cfg, "vocab_size"),
        dim=dim,
        n_layers=n_layers,
        ffn_hidden=_int(cfg, "intermediate_size"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5 if family == "mixtral" else 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=float(cfg.get("initializer_range", 0.02)),
        max_seq_len=_int(cfg, "max_position_embeddings", 4096),
    )
    attention = AttentionConfig(
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=0 if head_dim * n_heads == dim else head_dim,
        rope_theta=_rope_theta(cfg, family),
        qk_norm=family == "qwen3_moe",
        qkv_bias=family == "qwen2" or (family == "qwen2_moe" and bool(cfg.get("qkv_bias", True))),
    )
    if family in ("llama", "qwen3_moe"):
        _require(cfg, "attention_bias", False, False, "sparsetron has no output-projection bias")
    if family == "llama":
        _require(cfg, "mlp_bias", False, False, "sparsetron's FFN has no biases")

    moe = MoEConfig()
    if family == "mixtral":
        _require(cfg, "router_jitter_noise", 0.0, 0.0, "sparsetron's router has no jitter")
        moe = MoEConfig(
            num_experts=_int(cfg, "num_local_experts", 8),
            top_k=_int(cfg, "num_experts_per_tok", 2),
            expert_hidden=model.ffn_hidden,
            norm_topk_prob=True,
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if not isinstance(experts, int) or experts <= 0:
            raise config_error("num_experts", experts, "a MoE family needs a positive number of experts")
        hidden = _int(cfg, "moe_intermediate_size")
        moe = MoEConfig(
            num_experts=experts,
            top_k=_int(cfg, "num_experts_per_tok"),
            expert_hidden=hidden,
            first_k_dense=_dense_prefix(cfg, n_layers),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        )
        if family == "qwen2_moe":
            # One gated shared expert of any width (moe.shared_expert_hidden).
            shared = _int(cfg, "shared_expert_intermediate_size")
            if shared <= 0:
                raise config_error("shared_expert_intermediate_size", shared, "qwen2_moe's shared expert needs a width")
            moe.n_shared_experts, moe.shared_expert_hidden, moe.shared_expert_gate = 1, shared, True
    model.validate()
    attention.validate(model)
    moe.validate(model)
    return family, model, attention, moe


def export_family(model: ModelConfig, attention: AttentionConfig, moe: MoEConfig) -> str:
    """The Hugging Face family that represents this sparsetron model exactly; ConfigError naming the option otherwise."""

    def refuse(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{key}={value!r}: {why}; no Hugging Face family represents it exactly")

    if model.sigma_reparam:
        raise refuse("model.sigma_reparam", True, "transformers computes with plain weights, not W * gamma / sigma(W)")
    if attention.backend != "sdpa":
        raise refuse("attention.backend", attention.backend, "transformers runs full attention")
    if moe.dispatch_dim:
        raise refuse("moe.dispatch_dim", moe.dispatch_dim, "no transformers MoE projects tokens before its experts")
    if model.mtp_depth:
        raise refuse(
            "model.mtp_depth", model.mtp_depth, "the supported families have no multi-token prediction modules"
        )
    if moe.router_input != "ffn_input":
        raise refuse("moe.router_input", moe.router_input, "every transformers MoE routes on the FFN's input")
    if not moe.enabled:
        if attention.qk_norm:
            raise refuse("attention.qk_norm", True, "a dense model with q/k norm (qwen3) is not supported")
        return "qwen2" if attention.qkv_bias else "llama"
    checks = [
        ("moe.score_func", moe.score_func, "softmax"),
        ("moe.route_scale", moe.route_scale, 1.0),
        ("moe.n_groups", moe.n_groups, 1),
        ("moe.capacity_factor", moe.capacity_factor, 0.0),
    ]
    for key, value, allowed in checks:
        if value != allowed:
            raise refuse(key, value, f"the supported families need {allowed!r}")
    if moe.n_shared_experts:
        if not moe.shared_expert_gate:
            raise refuse("moe.shared_expert_gate", False, "qwen2_moe gates its shared expert")
        if attention.qk_norm:
            raise refuse("attention.qk_norm", True, "qwen2_moe has no q/k norm")
        return "qwen2_moe"
    if attention.qk_norm:
        if attention.qkv_bias:
            raise refuse("attention.qkv_bias", True, "qwen3_moe has no q/k/v biases")
        return "qwen3_moe"
    if attention.qkv_bias:
        raise refuse("attention.qkv_bias", True, "a MoE with q/k/v biases needs shared experts (qwen2_moe)")
    if moe.first_k_dense:
        raise refuse("moe.first_k_dense", moe.first_k_dense, "mixtral has no dense layers")
    if not (moe.norm_topk_prob or moe.route_order == "topk_then_softmax"):
        raise refuse("moe.norm_topk_prob", False, "mixtral renormalises the selected weights")
    return "mixtral"


def config_to_hf(model: ModelConfig, attention: AttentionConfig, moe: MoEConfig, dtype: str = "float32") -> dict:
    """A config.json mapping that transformers reads as this model."""
    family = export_family(model, attention, moe)
    cfg: dict[str, Any] = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "intermediate_size": model.ffn_hidden,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.kv_heads(),
        "head_dim": attention.head_size(model.dim),
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tie_embeddings,
        "rope_theta": attention.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": attention.rope_theta},
        "attention_dropout": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if family in ("llama", "qwen3_moe"):
        cfg["attention_bias"] = False
    if family == "llama":
        cfg["mlp_bias"] = False
    if family in ("qwen2", "qwen2_moe"):
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
    if family in ("mixtral", "qwen3_moe"):
        cfg["sliding_window"] = None
    if moe.enabled:
        hidden = moe.hidden_size(model)
        cfg["num_experts_per_tok"] = moe.experts_per_token
        if family == "mixtral":
            # Mixtral's experts are intermediate_size wide and it has no dense layers.
            cfg["intermediate_size"] = hidden
            cfg["num_local_experts"] = moe.routed_experts
            cfg["router_jitter_noise"] = 0.0
        else:
            cfg["num_experts"] = moe.routed_experts
            cfg["moe_intermediate_size"] = hidden
            cfg["norm_topk_prob"] = moe.norm_topk_prob or moe.route_order == "topk_then_softmax"
            cfg["decoder_sparse_step"] = 1
            cfg["mlp_only_layers"] = list(range(moe.first_k_dense))
        if family == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = moe.shared_hidden_size(model)
            cfg["qkv_bias"] = attention.qkv_bias
    return cfg
