"""Model configuration: the `model`, `attention` and `moe` sections of a job.

Each field carries its documentation as the string literal below it; `sparsetron
config --doc` prints them and a test checks that none is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what is allowed."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError about `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer."""

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "dim",
        "n_layers",
        "ffn_hidden",
        "tie_embeddings",
        "mtp_depth",
    )

    vocab_size: int = 0
    """Embedding rows. 0 = the tokenizer's vocabulary, rounded up to a multiple of 64."""
    dim: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    ffn_hidden: int = 768
    """Hidden size of a dense SwiGLU FFN (and the base an expert's size is cut from)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are scaled by 1/sqrt(2 n_layers)."""
    max_seq_len: int = 4096
    """Longest sequence the rotary tables are built for."""
    mtp_depth: int = 0
    """Multi-token prediction (DeepSeek-V3, Ling 2.0): this many sequential modules after the last block, module k predicting the token k + 1 positions ahead (norms of the previous depth's hidden state and of the next token's embedding, a 2D -> D projection of both, one transformer block like the model's last, its own final norm and the shared output head). Training adds their loss; the next-token loss, eval and generation are unchanged. 0 = off."""
    mtp_loss_weight: float = 0.3
    """Multi-token prediction: the training loss adds mtp_loss_weight / mtp_depth x the sum of the depths' losses (DeepSeek-V3: 0.3, later 0.1)."""
    sigma_reparam: bool = False
    """sigmaReparam (Zhai et al. 2023): every linear layer (attention, FFN, shared and routed experts, router, output head; not the embedding, a lookup) computes with W * gamma / sigma(W), sigma its spectral norm from one power-iteration step per training step and gamma a learned scalar per matrix, initialised to sigma(W) so the model starts unchanged. Prevents attention-entropy collapse at high learning rates. Not exportable to Hugging Face, not upcyclable."""

    def validate(self, prefix: str = "model") -> None:
        check(self.vocab_size >= 0, f"{prefix}.vocab_size", f"must be >= 0 (0 = from tokenizer), got {self.vocab_size}")
        for name in ("dim", "n_layers", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            check(value > 0, f"{prefix}.{name}", f"must be a positive integer, got {value}")
        check(self.norm_eps > 0, f"{prefix}.norm_eps", f"must be > 0, got {self.norm_eps}")
        check(self.init_std > 0, f"{prefix}.init_std", f"must be > 0, got {self.init_std}")
        check(self.mtp_depth >= 0, f"{prefix}.mtp_depth", f"must be >= 0 (0 = off), got {self.mtp_depth}")
        check(self.mtp_loss_weight >= 0, f"{prefix}.mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")


@dataclass
class AttentionConfig:
    """Grouped-query attention with rotary positions."""

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("n_heads", "n_kv_heads", "head_dim", "qk_norm", "qkv_bias")

    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention). 0 = n_heads; must divide n_heads."""
    head_dim: int = 0
    """Width of one head. 0 = model.dim // n_heads."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies."""
    qk_norm: bool = False
    """RMSNorm on queries and keys per head before rotary (as in Qwen3)."""
    qkv_bias: bool = False
    """Add a learned bias to the query, key and value projections (as in Qwen2); the output projection has none."""
    document_masking: bool = True
    """When several documents are packed into one sequence, positions restart at each and no token attends across documents."""
    backend: Literal["sdpa", "moba"] = "sdpa"
    """sdpa: full causal attention through torch scaled_dot_product_attention. moba: Mixture of Block Attention (../shared/specs/moba.md) in every layer but the moba_full_* ones."""
    moba_block_size: int = 512
    """MoBA: tokens per key block, cut from the first token of each document (the paper: 512 at 8K, 2048 at 32K, 4096 at 1M)."""
    moba_topk: int = 3
    """MoBA: blocks each query reads, counting its own (current) block; the rest are the best fully past blocks by q . mean(k). A sequence of at most moba_topk x moba_block_size tokens gets exactly full attention."""
    moba_full_layers: list[int] = field(default_factory=list)
    """MoBA hybrid: indices (0-based, < model.n_layers) of layers that keep full attention. Give this or moba_full_last, not both."""
    moba_full_last: int = 0
    """MoBA hybrid: the last this many layers keep full attention (the paper: the last 3 of 32). Give this or moba_full_layers, not both."""
    moba_full_after: float = 1.0
    """MoBA schedule: fraction of trainer.steps trained with MoBA; the steps after it run every layer with full attention (the paper: 0.9). 1.0 = MoBA to the end."""

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def head_size(self, dim: int) -> int:
        return self.head_dim or dim // self.n_heads

    def full_attention_layers(self, n_layers: int) -> list[int]:
        """Indices of the layers that use full attention even when backend is moba (all of them under sdpa)."""
        if self.backend != "moba":
            return list(range(n_layers))
        if self.moba_full_last:
            return list(range(n_layers - self.moba_full_last, n_layers))
        return sorted(self.moba_full_layers)

    def uses_moba(self, layer_id: int, n_layers: int) -> bool:
        """Whether layer `layer_id` of `n_layers` runs MoBA (before the moba_full_after switch)."""
        return layer_id not in self.full_attention_layers(n_layers)

    def attended_keys(self, n_layers: int, seq_len: int, moba: bool = True, extra_layers: int = 0) -> list[float]:
        """Per layer, the mean number of keys a query of a causal sequence of `seq_len` tokens
        attends: seq_len / 2 under full attention (the FLOP-count convention), and for a MoBA layer
        (unless `moba` is False: after the switch) its current block's keys up to the query plus
        topk - 1 whole past blocks where it has them, never more than seq_len / 2. `extra_layers`
        appends the layers numbered n_layers and up (multi-token prediction blocks)."""
        full = seq_len / 2
        if not moba or self.backend != "moba":
            return [full] * (n_layers + extra_layers)
        B, K = self.moba_block_size, self.moba_topk
        total = 0
        for start in range(0, seq_len, B):
            size = min(B, seq_len - start)
            # Query i of block b reads i + 1 keys of its own block and min(K - 1, b) past blocks.
            total += size * (size + 1) // 2 + size * min(K - 1, start // B) * B
        sparse = min(full, total / seq_len)
        return [sparse if self.uses_moba(i, n_layers) else full for i in range(n_layers + extra_layers)]

    def moba_switch_step(self, steps: int) -> int | None:
        """The first (0-based) optimizer step of `steps` at which MoBA layers run full attention,
        or None when they never do (backend sdpa, or moba_full_after = 1)."""
        if self.backend != "moba":
            return None
        # The fewest steps that cover the fraction; the epsilon absorbs float noise (0.7 * 10 = 7.000000000000001).
        switch = math.ceil(self.moba_full_after * steps - 1e-9)
        return switch if switch < steps else None

    def validate(self, model: ModelConfig, prefix: str = "attention") -> None:
        check(self.n_heads > 0, f"{prefix}.n_heads", f"must be positive, got {self.n_heads}")
        check(self.n_kv_heads >= 0, f"{prefix}.n_kv_heads", f"must be >= 0, got {self.n_kv_heads}")
        if self.head_dim == 0:
            check(
                model.dim % self.n_heads == 0,
                f"{prefix}.n_heads",
                f"{self.n_heads} must divide model.dim={model.dim} (or set attention.head_dim)",
            )
        check(
            self.n_heads % self.kv_heads() == 0,
            f"{prefix}.n_kv_heads",
            f"{self.kv_heads()} must divide n_heads={self.n_heads}",
        )
        head = self.head_size(model.dim)
        check(
            head > 0 and head % 2 == 0, f"{prefix}.head_dim", f"must be a positive even number for rotary, got {head}"
        )
        check(self.rope_theta > 0, f"{prefix}.rope_theta", f"must be > 0, got {self.rope_theta}")
        # The MoBA keys are checked under sdpa too, so that flipping backend alone never makes a config invalid.
        check(self.moba_block_size >= 1, f"{prefix}.moba_block_size", f"must be >= 1, got {self.moba_block_size}")
        check(
            self.moba_topk >= 1,
            f"{prefix}.moba_topk",
            f"must be >= 1 (it counts the current block), got {self.moba_topk}",
        )
        n = model.n_layers
        bad = [i for i in self.moba_full_layers if not 0 <= i < n]
        check(
            not bad,
            f"{prefix}.moba_full_layers",
            f"layer indices must be in [0, model.n_layers={n}), got {bad}",
        )
        repeated = sorted({i for i in self.moba_full_layers if self.moba_full_layers.count(i) > 1})
        check(not repeated, f"{prefix}.moba_full_layers", f"lists layers {repeated} more than once")
        check(
            0 <= self.moba_full_last <= n,
            f"{prefix}.moba_full_last",
            f"must be in [0, model.n_layers={n}], got {self.moba_full_last}",
        )
        check(
            not (self.moba_full_layers and self.moba_full_last),
            f"{prefix}.moba_full_last",
            f"give either moba_full_layers={self.moba_full_layers} or moba_full_last={self.moba_full_last}, not both",
        )
        check(
            0.0 <= self.moba_full_after <= 1.0,
            f"{prefix}.moba_full_after",
            f"must be in [0, 1] (a fraction of trainer.steps), got {self.moba_full_after}",
        )


@dataclass
class MoEConfig:
    """Fine-grained Mixture of Experts (see shared/specs/moe.md).

    `num_experts` and `top_k` are given at granularity 1; granularity G multiplies both
    and divides the expert's hidden size, so active compute stays the same.
    """

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_experts",
        "granularity",
        "expert_hidden",
        "n_shared_experts",
        "shared_expert_hidden",
        "shared_expert_gate",
        "first_k_dense",
        "dispatch_dim",
    )

    num_experts: int = 0
    """Routed experts at granularity 1. 0 = a dense model (every layer a SwiGLU FFN)."""
    top_k: int = 2
    """Experts each token is sent to, at granularity 1."""
    granularity: int = 1
    """G: experts and top_k are multiplied by G, the expert hidden size divided by G."""
    expert_hidden: int = 0
    """Hidden size of one routed expert. 0 = model.ffn_hidden // granularity."""
    n_shared_experts: int = 0
    """Always-active shared experts, computed together as one SwiGLU (of n_shared x the routed expert's hidden size unless shared_expert_hidden says otherwise)."""
    shared_expert_hidden: int = 0
    """Hidden size of the shared experts' one SwiGLU, all of them together (Megatron's moe_shared_expert_intermediate_size; any width, e.g. a Qwen2-MoE shared_expert_intermediate_size that is no multiple of moe_intermediate_size). 0 = n_shared_experts x the routed expert's hidden size. Needs n_shared_experts >= 1."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned per-token sigmoid gate (Qwen2-MoE)."""
    first_k_dense: int = 0
    """The first k blocks use a dense FFN instead of MoE."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function."""
    route_order: Literal["softmax_then_topk", "topk_then_softmax"] = "softmax_then_topk"
    """softmax_then_topk: scores over all experts, then select. topk_then_softmax: select on logits, softmax over the selected."""
    norm_topk_prob: bool = False
    """Renormalise the selected weights to sum to 1 (required for sigmoid scores)."""
    route_scale: float = 1.0
    """Multiply the routing weights by this constant."""
    n_groups: int = 1
    """Group-limited routing: experts split into n groups (1 = off)."""
    topk_groups: int = 1
    """Tokens choose experts only from their best m groups (a group's score is the sum of its top-2 expert scores)."""
    aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss E * sum_i f_i P_i (0 = off)."""
    aux_loss_level: Literal["micro_batch", "sequence", "global"] = "micro_batch"
    """Where f and P are counted: over the micro-batch, per sequence (averaged), or over the data-parallel group."""
    z_loss_coeff: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2) (0 = off)."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing: after each optimizer step, bias_i += rate * sign(mean load - load_i) (0 = off)."""
    capacity_factor: float = 0.0
    """Each expert takes at most ceil(factor * tokens * top_k / experts) tokens; the rest are dropped. 0 = dropless."""
    drop_policy: Literal["probability", "position"] = "probability"
    """Over capacity, keep the highest-weight assignments (probability) or the earliest tokens (position)."""
    dispatcher: Literal["auto", "local", "all_to_all", "overlapped"] = "auto"
    """How tokens reach experts: local = sort-based permute on this device (parallel.expert=1);
    all_to_all = exchanged with the expert ranks holding them (parallel.expert > 1); overlapped = the
    same exchange in moe.overlap_chunks chunks, in flight while other chunks' experts and the shared
    experts compute (parallel.expert > 1); auto = local at parallel.expert=1, all_to_all above. A
    layout choice: a checkpoint resumes under another one."""
    overlap_chunks: int = 4
    """Chunks the overlapped dispatcher splits each rank's tokens into (moe.dispatcher=overlapped)."""
    expert_backend: Literal["auto", "grouped_mm", "loop"] = "auto"
    """Expert GEMMs: torch grouped_mm, a per-expert loop, or auto (grouped_mm on CUDA GPUs with compute capability >= 9.0)."""
    dispatch_dim: int = 0
    """r: low-dimension dispatch (BigMac's descend-communicate-communicate-ascend). Each MoE layer projects its tokens D -> r before dispatch and r -> D after combine, so the dispatcher moves r numbers per token instead of D; routed experts take and return r-dim rows (hidden size unchanged). The router and shared experts keep the D-dim input. 0 = off; else 1 <= r <= model.dim. No dense model or Hugging Face family has it: upcycling and HF conversion refuse it."""

    router_input: Literal["ffn_input", "pre_attention"] = "ffn_input"
    """What each MoE layer routes on. ffn_input: the FFN's normalised input, after attention (the usual MoE). pre_attention (SmallThinker): the block's normalised input, the tensor attention reads, so the routing is known before attention runs and an inference engine can fetch the chosen experts' weights meanwhile; the experts still compute on the FFN input, and the balancing losses and statistics come from this routing as usual. No Hugging Face family has it: HF conversion refuses it."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def routed_experts(self) -> int:
        return self.num_experts * self.granularity

    @property
    def experts_per_token(self) -> int:
        return self.top_k * self.granularity

    def hidden_size(self, model: ModelConfig) -> int:
        return self.expert_hidden or model.ffn_hidden // self.granularity

    def shared_hidden_size(self, model: ModelConfig) -> int:
        """Hidden size of the shared experts' one SwiGLU (0 without shared experts)."""
        if not self.n_shared_experts:
            return 0
        return self.shared_expert_hidden or self.n_shared_experts * self.hidden_size(model)

    def expert_dim(self, model: ModelConfig) -> int:
        """Width of the rows routed experts take and return: dispatch_dim, or model.dim when it is off."""
        return self.dispatch_dim or model.dim

    def dispatcher_for(self, expert: int, prefix: str = "moe") -> Literal["local", "all_to_all", "overlapped"]:
        """The dispatcher that runs at parallel.expert=`expert`; refuses one that cannot run there.

        all_to_all or overlapped at parallel.expert=1 is refused rather than run as an exchange with oneself:
        a rank would send every row to itself, the same numbers as local at the cost of copies
        and a host sync, and a single process has no process group to run it on.
        """
        if self.dispatcher == "auto":
            return "local" if expert == 1 else "all_to_all"
        check(
            self.dispatcher != "local" or expert == 1,
            f"{prefix}.dispatcher",
            f"local keeps every expert on this rank, but parallel.expert={expert} splits them over {expert} ranks; "
            "use all_to_all, overlapped or auto",
        )
        check(
            self.dispatcher not in ("all_to_all", "overlapped") or expert > 1,
            f"{prefix}.dispatcher",
            f"{self.dispatcher} exchanges tokens between expert ranks, but parallel.expert=1 leaves none to exchange "
            "with; use local or auto",
        )
        return self.dispatcher

    def validate(self, model: ModelConfig, prefix: str = "moe") -> None:
        check(self.num_experts >= 0, f"{prefix}.num_experts", f"must be >= 0, got {self.num_experts}")
        # Checked before the dense return: a projection that no layer would build must not pass silently.
        check(
            self.dispatch_dim == 0 or (self.enabled and 1 <= self.dispatch_dim <= model.dim),
            f"{prefix}.dispatch_dim",
            f"must be 0 (off) or in [1, model.dim={model.dim}] with MoE layers (num_experts={self.num_experts}), "
            f"got {self.dispatch_dim}",
        )
        check(
            self.router_input == "ffn_input" or self.enabled,
            f"{prefix}.router_input",
            f"{self.router_input} routes MoE layers, but num_experts={self.num_experts} builds none",
        )
        if not self.enabled:
            return
        check(self.granularity >= 1, f"{prefix}.granularity", f"must be >= 1, got {self.granularity}")
        check(self.top_k >= 1, f"{prefix}.top_k", f"must be >= 1, got {self.top_k}")
        experts, k = self.routed_experts, self.experts_per_token
        check(
            k <= experts,
            f"{prefix}.top_k",
            f"top_k x granularity = {k} exceeds num_experts x granularity = {experts}",
        )
        check(
            self.hidden_size(model) > 0,
            f"{prefix}.expert_hidden",
            f"model.ffn_hidden={model.ffn_hidden} // granularity={self.granularity} leaves no hidden units",
        )
        check(self.n_shared_experts >= 0, f"{prefix}.n_shared_experts", "must be >= 0")
        check(
            self.shared_expert_hidden >= 0 and (self.shared_expert_hidden == 0 or self.n_shared_experts >= 1),
            f"{prefix}.shared_expert_hidden",
            f"must be 0 (n_shared_experts x the expert hidden size) or a positive width with n_shared_experts >= 1 "
            f"(n_shared_experts={self.n_shared_experts}), got {self.shared_expert_hidden}",
        )
        check(
            0 <= self.first_k_dense <= model.n_layers,
            f"{prefix}.first_k_dense",
            f"must be in [0, model.n_layers={model.n_layers}], got {self.first_k_dense}",
        )
        check(
            self.score_func != "sigmoid" or self.norm_topk_prob,
            f"{prefix}.norm_topk_prob",
            "must be true when score_func is sigmoid (sigmoid scores do not sum to 1)",
        )
        check(self.route_scale > 0, f"{prefix}.route_scale", f"must be > 0, got {self.route_scale}")
        check(self.overlap_chunks >= 1, f"{prefix}.overlap_chunks", f"must be >= 1, got {self.overlap_chunks}")
        check(
            self.n_groups >= 1 and experts % self.n_groups == 0,
            f"{prefix}.n_groups",
            f"{self.n_groups} must be >= 1 and divide the {experts} routed experts",
        )
        check(
            1 <= self.topk_groups <= self.n_groups,
            f"{prefix}.topk_groups",
            f"must be in [1, n_groups={self.n_groups}], got {self.topk_groups}",
        )
        if self.n_groups > 1:
            reachable = self.topk_groups * (experts // self.n_groups)
            check(
                k <= reachable,
                f"{prefix}.topk_groups",
                f"the best {self.topk_groups} groups hold {reachable} experts, fewer than top_k x granularity = {k}",
            )
            check(
                experts // self.n_groups >= 2,
                f"{prefix}.n_groups",
                "each group needs at least 2 experts (a group is scored by its top-2)",
            )
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate", "capacity_factor"):
            value = getattr(self, name)
            check(value >= 0, f"{prefix}.{name}", f"must be >= 0, got {value}")
