"""What every Hugging Face converter ends with: a speedlm model built from the converted config,
with the converted weights loaded strictly (a missing or extra name is a bug in the mapping)."""

from __future__ import annotations

import torch

from speedlm.models.config import ModelConfig


def build_with_weights(config: ModelConfig, state: dict[str, torch.Tensor]):
    """A speedlm `CausalLM` of `config` holding `state`, in eval mode."""
    from speedlm.models import build_model

    config.validate()
    model = build_model(config)
    model.load_state_dict(state)
    return model.eval()


__all__ = ["build_with_weights"]
