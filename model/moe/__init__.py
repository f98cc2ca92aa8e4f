"""Fine-grained Mixture of Experts: router, dispatch, grouped experts, balancing."""

from sparsetron.model.moe.layer import MoE, MoEStats

__all__ = ["MoE", "MoEStats"]
