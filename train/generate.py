"""`sparsetron generate`: continue a prompt with a checkpoint's model, to look at what it learned.

    sparsetron generate runs/tiny --prompt "def " --max-new-tokens 200
    sparsetron generate runs/tiny --prompt "import " --temperature 0          # greedy
    sparsetron generate runs/tiny --prompt "class " --top-k 20 --seed 3 --set trainer.device=cuda

The checkpoint is named as for `sparsetron eval` (a step folder, or a checkpoint or run folder:
its newest complete checkpoint) and only its weights are read. The prompt is encoded with the
checkpoint config's tokenizer (data.tokenizer), model/generate.py samples (no KV cache), and the
prompt with its continuation is decoded back to text; generation stops early at the tokenizer's
end-of-document token. The model runs on trainer.device in trainer.precision.
"""

from __future__ import annotations

from pathlib import Path

from sparsetron.model.config import ConfigError
from sparsetron.model.generate import generate
from sparsetron.parallel.precision import Precision
from sparsetron.train.data import build_tokenizer
from sparsetron.train.evaluate import load_model, open_checkpoint

__all__ = ["generate_from_checkpoint"]


def generate_from_checkpoint(
    path: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> str:
    """The prompt and its continuation by the checkpoint `path` names (see the module docstring).
    Bad arguments raise ConfigError before the model is read."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = all tokens), got {top_k}")
    manager, folder, job = open_checkpoint(path, overrides=overrides)
    tokenizer = build_tokenizer(job.data.tokenizer)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ConfigError("--prompt is empty: give at least one character to continue")
    model, _ = load_model(manager, folder, job)
    device = next(model.parameters()).device
    autocast = Precision.from_config(job.trainer.precision, device).autocast(device.type)
    ids = generate(
        model, prompt_ids, max_new_tokens, temperature, top_k, seed, tokenizer.eos_id, autocast, tokenizer.vocab_size
    )
    return tokenizer.decode(ids)
