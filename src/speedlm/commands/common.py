"""Pieces shared by the CLI commands."""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError


def load_trained(checkpoint: str, device: torch.device):
    """(model, tokenizer, trainer_state) from a run or step folder."""
    from speedlm.data import load_tokenizer
    from speedlm.train import load_model

    model, state = load_model(checkpoint, device)
    tokenizer = load_tokenizer(state.get("tokenizer"), state["checkpoint_path"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise SpeedlmError(
            f"mismatched vocabulary: the checkpoint's tokenizer has {tokenizer.vocab_size} tokens, "
            f"its model expects {model.config.vocab_size}"
        )
    return model, tokenizer, state
