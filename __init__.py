"""sparsetron: fine-grained MoE and long-context training on torch.distributed."""

__version__ = "0.1.0"
