"""AdamW weight-decay groups and gradient clipping."""

import pytest
import torch
from torch import nn

from sparsetron.parallel.clipping import clip_grad_norm
from sparsetron.train.config import OptimizerConfig
from sparsetron.train.optim import build_optimizer, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 5)
        self.norm_weight = nn.Parameter(torch.ones(5))
        self.experts = nn.Parameter(torch.randn(3, 5, 4))


def test_decay_goes_to_matrices_and_experts_only():
    model = Toy()
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert decayed == {id(model.proj.weight), id(model.experts)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.embed.weight),
        id(model.proj.bias),
        id(model.norm_weight),
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_weight_decay_shrinks_only_decayed_params():
    torch.manual_seed(0)
    model = Toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is zero, so only decay moves a parameter.
    opt.step()
    for name, p in model.named_parameters():
        if name in ("proj.weight", "experts"):
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
        else:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("max_norm", [0.0, 0.3])
def test_clip_reports_the_global_norm(max_norm):
    model = Toy()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    norm = clip_grad_norm(model, max_norm)
    torch.testing.assert_close(norm, expected)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    torch.testing.assert_close(after, expected if max_norm == 0 else torch.tensor(max_norm), rtol=1e-4, atol=1e-6)
