"""The one precision policy, the same on every layout (one process, TP, EP, PP, FSDP/HSDP).

trainer.precision bf16 (the default on a GPU) means, wherever the model runs:

- parameters, their gradients' reduction, gradient clipping and the optimizer stay fp32;
- every parameter enters the forward as a bf16 copy: where FSDP shards the model it all-gathers
  bf16 copies (`MixedPrecisionPolicy`, half the traffic); elsewhere autocast rounds the weights
  of its matrix products, and RMSNorm and the router round theirs (`model.layers.as_computed`).
  So each layout computes the same numbers but for reduction order (as Megatron's bf16
  parameters and torchtitan's FSDP do; a norm weight near 1.0 moves in the forward in bf16 steps
  of 2^-7 while its fp32 master accumulates every update);
- matrix products run in bf16 (autocast);
- the residual stream is bf16: `Transformer` casts the embedding's output to the autocast
  dtype, which is what FSDP's bf16 embedding gives, so hidden states, pipeline stage
  boundaries and activation memory do not depend on the layout;
- RMSNorm, rotary embeddings and the router do their math in fp32 (each up-casts its input
  and its bf16 weight); the MoE combine weighs in fp32; attention and experts compute in bf16;
- the head's logits come out bf16 and the loss is computed in fp32 (`cross_entropy`).

fp32 (the default on a CPU) runs everything in fp32, no autocast.

Before this policy, one process ran autocast with an fp32 residual stream while FSDP layouts
ran a bf16 one, and the pipeline typed its stage buffers from a parameter (the fp32 shard)
while the stages sent bf16: torch does not check a receive buffer's dtype, so activations
arrived as garbage. Stage buffers now take `activation_dtype` from here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy

from sparsetron.model.config import ConfigError


@dataclass(frozen=True)
class Precision:
    """What the forward computes in; see the module docstring."""

    compute_dtype: torch.dtype
    """torch.bfloat16 (mixed precision) or torch.float32."""

    @classmethod
    def from_config(cls, choice: str, device: torch.device) -> Precision:
        """trainer.precision ("auto", "bf16" or "fp32") on `device`: auto is bf16 on CUDA, else fp32."""
        if choice == "auto":
            choice = "bf16" if device.type == "cuda" else "fp32"
        if choice not in ("bf16", "fp32"):
            raise ConfigError(f"trainer.precision: expected auto, bf16 or fp32, got {choice!r}")
        return cls(torch.bfloat16 if choice == "bf16" else torch.float32)

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != torch.float32

    @property
    def activation_dtype(self) -> torch.dtype:
        """Hidden states between blocks and stages, and the logits."""
        return self.compute_dtype

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The forward's autocast region (none in fp32); backward runs outside it."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    def fsdp_policy(self) -> MixedPrecisionPolicy:
        """FSDP all-gathers parameters in the compute dtype; gradients are reduced in fp32."""
        return MixedPrecisionPolicy(param_dtype=self.compute_dtype if self.mixed else None, reduce_dtype=torch.float32)


FP32 = Precision(torch.float32)


def cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """The training loss: mean cross-entropy over tokens, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
