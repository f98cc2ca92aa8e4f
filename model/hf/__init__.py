"""Hugging Face interop: a local `transformers` checkpoint folder (config.json + safetensors,
sharded or not) to a sparsetron config and state dict, and back.

    ckpt = load_hf("path/to/Qwen2-0.5B")      # configs + sparsetron state dict; no hub access
    model = ckpt.build()                        # a Transformer holding the weights (fp32)
    save_hf("out/", ckpt.model, ckpt.attention, ckpt.moe, model.state_dict())

Families: llama, qwen2 (dense, q/k/v biases), mixtral, qwen2_moe (shared expert with a sigmoid
gate), qwen3_moe (q/k norm). A checkpoint whose architecture or options sparsetron cannot
represent exactly is refused with a ConfigError naming the config.json key and its value; a
sparsetron model that no family represents exactly is refused on export, naming the option.
Training-only knobs that change the training forward (dropout, router jitter) are refused too;
loss coefficients (router_aux_loss_coef) are not the model's and are not carried over.

Rotary positions use the same half-split layout as transformers (`layers.rope_tables`), so the
q/k projections are copied without permutation. Experts: HF stores one [H, D] gate/up and
[D, H] down matrix per expert; sparsetron stacks them input-major, w13[e] = [gate.T | up.T].

Layout: `config.py` maps config.json to the config sections and back, `weights.py` the tensor
names and layouts, `io.py` reads and writes the folders.
"""

from sparsetron.model.hf.config import FAMILIES, config_from_hf, config_to_hf, export_family
from sparsetron.model.hf.io import (
    CONFIG_FILE,
    DTYPES,
    HFCheckpoint,
    load_hf,
    read_hf_config,
    require_empty_folder,
    save_hf,
)
from sparsetron.model.hf.weights import HFFormatError, state_dict_from_hf, state_dict_to_hf

__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "FAMILIES",
    "HFCheckpoint",
    "HFFormatError",
    "config_from_hf",
    "config_to_hf",
    "export_family",
    "load_hf",
    "read_hf_config",
    "require_empty_folder",
    "save_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
