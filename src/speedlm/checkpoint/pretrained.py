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
    _load_weights(model, folder)
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


def spec_config(spec, **overrides):
    """The ModelConfig of a model spec that may be a checkpoint folder (its saved config) as well
    as a preset name, config, dict or config JSON (models.resolve_config); `overrides` replace
    fields."""
    from speedlm.models import ModelConfig, resolve_config
    from speedlm.models.build import is_checkpoint

    if not is_checkpoint(spec):
        return resolve_config(spec, **overrides)
    fields = read_config(resolve_checkpoint(spec)).to_dict()
    return ModelConfig.from_dict({**fields, **overrides})


def build_spec(spec, **overrides):
    """The model of a spec (as `spec_config`): a checkpoint folder's holds its saved weights (what
    benchmarks and compare measure of an imported or trained model), any other a fresh init
    from the current random state."""
    from speedlm.models import build_model
    from speedlm.models.build import is_checkpoint

    model = build_model(spec_config(spec, **overrides))
    if is_checkpoint(spec):
        _load_weights(model, resolve_checkpoint(spec))
    return model


def _load_weights(model, folder: Path) -> None:
    """The saved weights of step folder `folder` into `model` (built from its config)."""
    load_weights_into(model, full_state_dict(*read_weights(folder)), folder)
