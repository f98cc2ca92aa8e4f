"""Tensor names and layouts: Hugging Face per-expert matrices <-> sparsetron's stacked experts.

HF stores one [H, D] gate/up and [D, H] down matrix per expert (nn.Linear, out x in);
sparsetron stacks them input-major, w13[e] = [gate.T | up.T] of [D, 2H] and w2[e] = down.T.

Shape legend: D model dim, H expert hidden, E experts.
"""

from __future__ import annotations

import torch

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.hf.config import config_error


class HFFormatError(ValueError):
    """A Hugging Face checkpoint folder is missing files or holds tensors its config does not describe."""


def _linear_names(family: str, i: int, model: ModelConfig, attention: AttentionConfig, moe: MoEConfig):
    """(sparsetron name, HF name) of every plain (non-expert) tensor of layer i, in order."""
    p, q = f"layers.{i}.", f"model.layers.{i}."
    pairs = [(p + "attention_norm.weight", q + "input_layernorm.weight")]
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        pairs.append((f"{p}attention.{ours}.weight", f"{q}self_attn.{theirs}.weight"))
        if attention.qkv_bias and ours != "wo":
            pairs.append((f"{p}attention.{ours}.bias", f"{q}self_attn.{theirs}.bias"))
    if attention.qk_norm:
        pairs += [(p + "attention.q_norm.weight", q + "self_attn.q_norm.weight")]
        pairs += [(p + "attention.k_norm.weight", q + "self_attn.k_norm.weight")]
    pairs.append((p + "ffn_norm.weight", q + "post_attention_layernorm.weight"))
    ffn = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    if not (moe.enabled and i >= moe.first_k_dense):
        pairs += [(f"{p}feed_forward.{ours}.weight", f"{q}mlp.{theirs}.weight") for ours, theirs in ffn]
    elif family == "mixtral":
        pairs.append((p + "feed_forward.router.gate.weight", q + "block_sparse_moe.gate.weight"))
    else:
        pairs.append((p + "feed_forward.router.gate.weight", q + "mlp.gate.weight"))
        if moe.n_shared_experts:
            pairs += [
                (f"{p}feed_forward.shared_experts.{o}.weight", f"{q}mlp.shared_expert.{t}.weight") for o, t in ffn
            ]
            pairs.append((p + "feed_forward.shared_gate.weight", q + "mlp.shared_expert_gate.weight"))
    return pairs


def _expert_names(family: str, i: int, e: int) -> tuple[str, str, str]:
    """HF names of expert e's (gate, up, down) matrices in layer i."""
    if family == "mixtral":
        base = f"model.layers.{i}.block_sparse_moe.experts.{e}."
        return base + "w1.weight", base + "w3.weight", base + "w2.weight"
    base = f"model.layers.{i}.mlp.experts.{e}."
    return base + "gate_proj.weight", base + "up_proj.weight", base + "down_proj.weight"


def _global_names(model: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    return pairs + ([] if model.tie_embeddings else [("output.weight", "lm_head.weight")])


def state_dict_from_hf(
    hf: dict[str, torch.Tensor], family: str, model: ModelConfig, attention: AttentionConfig, moe: MoEConfig
) -> dict[str, torch.Tensor]:
    """sparsetron state dict of HF tensors `hf`; HFFormatError naming any tensor missing or left over."""
    left = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # derived buffers of old exports

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise HFFormatError(f"tensor {name} is missing from the checkpoint (its config.json needs it)")
        return left.pop(name)

    out = {ours: take(theirs) for ours, theirs in _global_names(model)}
    if model.tie_embeddings:
        head = left.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, out["tok_embeddings.weight"]):
            raise config_error("tie_word_embeddings", True, "but lm_head.weight differs from model.embed_tokens.weight")
        out["output.weight"] = out["tok_embeddings.weight"]
    for i in range(model.n_layers):
        out.update({ours: take(theirs) for ours, theirs in _linear_names(family, i, model, attention, moe)})
        if moe.enabled and i >= moe.first_k_dense:
            gates, ups, downs = zip(
                *(map(take, _expert_names(family, i, e)) for e in range(moe.routed_experts)), strict=True
            )
            w1_EHD, w3_EHD, w2_EDH = torch.stack(gates), torch.stack(ups), torch.stack(downs)
            out[f"layers.{i}.feed_forward.experts.w13"] = (
                torch.cat([w1_EHD, w3_EHD], dim=1).transpose(1, 2).contiguous()
            )
            out[f"layers.{i}.feed_forward.experts.w2"] = w2_EDH.transpose(1, 2).contiguous()
            out[f"layers.{i}.feed_forward.router.expert_bias"] = torch.zeros(moe.routed_experts, dtype=torch.float32)
    if left:
        names = sorted(left)
        raise HFFormatError(
            f"the checkpoint holds {len(names)} tensors its config.json does not describe, e.g. {names[:4]}"
        )
    return out


def state_dict_to_hf(
    sd: dict[str, torch.Tensor], family: str, model: ModelConfig, attention: AttentionConfig, moe: MoEConfig
) -> dict[str, torch.Tensor]:
    """HF tensors of a sparsetron state dict (the inverse of `state_dict_from_hf`)."""
    out = {theirs: sd[ours] for ours, theirs in _global_names(model)}
    for i in range(model.n_layers):
        out.update({theirs: sd[ours] for ours, theirs in _linear_names(family, i, model, attention, moe)})
        if moe.enabled and i >= moe.first_k_dense:
            bias = sd.get(f"layers.{i}.feed_forward.router.expert_bias")
            if bias is not None and bool(bias.any()):
                raise ConfigError(
                    f"layers.{i}.feed_forward.router.expert_bias is not zero (moe.bias_update_rate balancing): "
                    "no Hugging Face family has a selection bias"
                )
            w13_EDH2, w2_EHD = sd[f"layers.{i}.feed_forward.experts.w13"], sd[f"layers.{i}.feed_forward.experts.w2"]
            w1_EDH, w3_EDH = w13_EDH2.chunk(2, dim=-1)
            for e in range(moe.routed_experts):
                gate, up, down = _expert_names(family, i, e)
                out[gate], out[up], out[down] = w1_EDH[e].t(), w3_EDH[e].t(), w2_EHD[e].t()
    return out
