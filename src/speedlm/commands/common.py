"""Pieces shared by the CLI commands."""

from __future__ import annotations

import torch


def load_trained(checkpoint: str, device: torch.device):
    """(model, tokenizer, trainer_state) from a run or step folder, for inference: reads the
    config, weights and tokenizer only (speedlm.checkpoint), never the optimizer or RNG state."""
    from speedlm.checkpoint import load_pretrained

    p = load_pretrained(checkpoint, device)
    return p.model, p.tokenizer, {**p.trainer_state, "checkpoint_path": str(p.path)}
