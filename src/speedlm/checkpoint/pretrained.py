"""Loading a checkpoint for inference (eval, generate, benchmarks, export): the config, the
weights and the tokenizer, nothing of the training state (optimizer, RNG)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from speedlm.checkpoint.files import (
    STATE_FILE,
    full_state_dict,
    load_weights_into,
    read_config,
    read_json,
    read_weights,
    resolve_checkpoint,
)


@dataclass
class Pretrained:
    model: torch.nn.Module  # in eval mode
    tokenizer: object | None
    trainer_state: dict  # step, train config, data spec, metrics of the run that saved it
    path: Path  # the step folder


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer: bool = True) -> Pretrained:
    """A model built by `build_model` from the checkpoint's config (so its objective picks the
    model class), with the saved weights, on `device`; and its tokenizer, checked against the
    model's vocabulary. `path` is a run folder (follows `latest`) or a step folder."""
    from speedlm.models import build_model

    folder = resolve_checkpoint(path)
    state = read_json(folder / STATE_FILE)
    config = read_config(folder)
    model = build_model(config)
    load_weights_into(model, full_state_dict(*read_weights(folder)), folder)
    tok = None
    if tokenizer:
        from speedlm.data import load_tokenizer

        tok = load_tokenizer(state.get("tokenizer"), folder)
        config.check_vocab(tok.vocab_size, "checkpoint's tokenizer")
    return Pretrained(model.to(device).eval(), tok, state, folder)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, trainer_state) from a checkpoint; trainer_state gains
    "checkpoint_path", the step folder (where the tokenizer files are)."""
    p = load_pretrained(path, device, tokenizer=False)
    return p.model, {**p.trainer_state, "checkpoint_path": str(p.path)}
