"""sigmaReparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse"): a linear layer computes with W_hat = (gamma / sigma(W)) W, model.sigma_reparam.

sigma(W) is W's spectral norm, estimated as u^T W v from vectors u, v that one step of power
iteration per training step moves towards W's top singular vectors. u and v are persistent
buffers (checkpoints carry them, so a resumed run computes the same sigma); gradients flow
through W in u^T W v with u, v constants, as the paper does. gamma is a learned scalar per
matrix, initialised to sigma(W), so that the model at initialisation computes what it computes
without the reparametrization.

When u and v move. Once per optimizer step, before its first forward (`power_iteration_step`,
which the step runner calls under no_grad): every forward of the step (micro-batches, pipeline
stages, an activation checkpoint's recomputation) then sees the same sigma. Evaluation never
moves them. The walk over the model takes `gather` and `store` functions so that the parallel
package can hand it whole matrices of sharded weights (parallel/sigma_reparam.py); this module
stays plain PyTorch.

What is reparametrized: every `nn.Linear` the model builds through `linear` (attention q, k, v,
o; dense and shared-expert FFNs; the router gate, the shared-expert gate, the dispatch_dim
projections; the output head) and each routed expert's three matrices (`ExpertsReparam`). Not
the input embedding: it is a lookup, not a product, and the paper leaves it plain; the norms'
gains and biases are vectors, not matrices.

Precision: sigma and the power iteration run in fp32 with autocast off. The forward computes
sigma from the weight as it computes with it (`as_computed`: bf16-rounded under autocast, as
FSDP's mixed precision gathers it), and rounds W_hat back to that dtype, so every layout
computes the same numbers.

Shape legend: m rows (outputs of a linear), n columns; `...` leading dimensions (one matrix per
expert, and per gate/up half of w13).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.model.computed import as_computed

INIT_ITERATIONS = 200
"""Most power-iteration steps at initialisation, so that gamma starts near sigma(W): the relative
error falls as (sigma_2 / sigma_1)^(2 steps), fp32's resolution for most matrices. A Gaussian
square matrix's top two singular values can be within 1% (tiny's 128 x 128 experts), and those
would need thousands; 200 bounds the cost (a second on tiny's CPU init) and leaves such gammas
within ~1e-3 of sigma, which training moves far more. A matrix stops early after a round of
INIT_ROUND steps that moved its estimate by less than fp32's resolution."""
INIT_ROUND = 25
START_SEED = 0
"""Seed of the power iteration's starting vectors: a private generator, so that turning the
reparametrization on draws nothing from the global stream (the weights are the same)."""


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def spectral_norm_estimate(W_mn: torch.Tensor, u_m: torch.Tensor, v_n: torch.Tensor) -> torch.Tensor:
    """u^T W v per matrix, in fp32 (autocast off), differentiable in W: sigma [...]."""
    with torch.autocast(W_mn.device.type, enabled=False):
        W = W_mn.float()
        return (u_m.float().unsqueeze(-2) @ W @ v_n.float().unsqueeze(-1)).squeeze(-1).squeeze(-1)


@torch.no_grad()
def power_iteration(
    W_mn: torch.Tensor, u_m: torch.Tensor, v_n: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` steps of power iteration from (u, v), in fp32: v <- W^T u / |W^T u|, u <- W v / |W v|."""
    with torch.autocast(W_mn.device.type, enabled=False):
        W, u = W_mn.float(), u_m.float()
        v = v_n.float()
        for _ in range(steps):
            v = F.normalize((u.unsqueeze(-2) @ W).squeeze(-2), dim=-1)
            u = F.normalize((W @ v.unsqueeze(-1)).squeeze(-1), dim=-1)
    return u, v


@dataclass(frozen=True)
class Reparametrized:
    """One reparametrized weight of a module: the names of its weight, gamma, u and v attributes,
    how the weight reads as a stack of matrices [..., m, n], and how a scale per matrix [...]
    broadcasts against the weight."""

    weight: str
    gamma: str
    u: str
    v: str
    matrices: Callable[[torch.Tensor], torch.Tensor] = identity
    broadcast: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda scale, weight: scale


def scaled_weight(
    weight: torch.Tensor, gamma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, spec: Reparametrized
) -> torch.Tensor:
    """W_hat = gamma / sigma(W) * W as the forward computes with it (see the module docstring)."""
    W = as_computed(weight)
    sigma = spectral_norm_estimate(spec.matrices(W), u, v)
    scale = gamma.float().reshape(sigma.shape) / sigma
    return (W.float() * spec.broadcast(scale, W)).to(W.dtype)


class ReparamLinear(nn.Linear):
    """nn.Linear computing with W_hat = gamma / sigma(W) * W (the bias is added as it is).

    gamma is kept as a one-element vector (not a 0-d scalar), which FSDP can shard and the
    optimizer does not decay (train/optim.py decays matrices only). Tensor parallelism splits
    weight and bias and replicates gamma, u and v (parallel/tensor_parallel.py).
    """

    sigma_specs = (Reparametrized("weight", "sigma_gamma", "sigma_u", "sigma_v"),)

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.sigma_gamma = nn.Parameter(torch.ones(1))
        self.register_buffer("sigma_u", torch.zeros(out_features))
        self.register_buffer("sigma_v", torch.zeros(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.computed_weight(), self.bias)

    def computed_weight(self) -> torch.Tensor:
        return scaled_weight(self.weight, self.sigma_gamma, self.sigma_u, self.sigma_v, self.sigma_specs[0])


def linear(in_features: int, out_features: int, bias: bool = False, sigma_reparam: bool = False) -> nn.Linear:
    """The model's linear layers: plain, or reparametrized (model.sigma_reparam)."""
    cls = ReparamLinear if sigma_reparam else nn.Linear
    return cls(in_features, out_features, bias=bias)


def linear_weight(layer: nn.Linear) -> torch.Tensor:
    """The weight `layer` computes with, for callers that do the product themselves (the router)."""
    return layer.computed_weight() if isinstance(layer, ReparamLinear) else as_computed(layer.weight)


def reparametrized(model: nn.Module) -> Iterator[tuple[nn.Module, Reparametrized]]:
    """Every reparametrized weight of `model`, with its module, in module order."""
    for module in model.modules():
        for spec in getattr(module, "sigma_specs", ()):
            yield module, spec


Gather = Callable[[torch.Tensor], torch.Tensor]
Store = Callable[[torch.Tensor, torch.Tensor], None]


def _copy(target: torch.Tensor, whole: torch.Tensor) -> None:
    target.copy_(whole)


@torch.no_grad()
def power_iteration_step(model: nn.Module, steps: int = 1, gather: Gather = identity, store: Store = _copy) -> None:
    """Move every reparametrized weight's u and v by `steps` power-iteration steps; once per
    training step, before its first forward. `gather` gives a tensor whole, `store(target, whole)`
    writes a whole tensor into one (parallel/sigma_reparam.py passes sharding-aware ones)."""
    for module, spec in reparametrized(model):
        W = spec.matrices(gather(getattr(module, spec.weight)))
        u, v = power_iteration(W, gather(getattr(module, spec.u)), gather(getattr(module, spec.v)), steps)
        store(getattr(module, spec.u), u)
        store(getattr(module, spec.v), v)


@torch.no_grad()
def init_sigma_reparam(model: nn.Module, gather: Gather = identity, store: Store = _copy) -> None:
    """After `init_weights`: u, v from INIT_ITERATIONS steps from fixed random vectors, and
    gamma = sigma(W), so that W_hat = W at initialisation (exactly, in one process)."""
    for module, spec in reparametrized(model):
        W = spec.matrices(gather(getattr(module, spec.weight)))
        # A fresh generator per matrix: the start depends on the shape alone, not on which other
        # matrices this rank holds (a pipeline stage), so every layout starts where one process does.
        generator = torch.Generator().manual_seed(START_SEED)
        u0 = torch.randn(W.shape[:-1], generator=generator).to(W.device)
        v0 = torch.randn((*W.shape[:-2], W.shape[-1]), generator=generator).to(W.device)
        u, v, sigma = u0, v0, None
        for _ in range(INIT_ITERATIONS // INIT_ROUND):
            u, v = power_iteration(W, u, v, INIT_ROUND)
            previous, sigma = sigma, spectral_norm_estimate(W, u, v)
            if previous is not None and ((sigma - previous).abs() <= torch.finfo(sigma.dtype).eps * sigma).all():
                break
        store(getattr(module, spec.u), u)
        store(getattr(module, spec.v), v)
        gamma = getattr(module, spec.gamma)
        store(gamma, sigma.reshape(gamma.shape).to(gamma.dtype))
