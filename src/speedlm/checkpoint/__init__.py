"""The checkpoint format (files.py) and inference loading (pretrained.py). Saving and resuming
training state lives in speedlm.train.checkpoint."""

from speedlm.checkpoint.files import list_checkpoints, resolve_checkpoint
from speedlm.checkpoint.pretrained import Pretrained, load_model, load_pretrained

__all__ = ["Pretrained", "list_checkpoints", "load_model", "load_pretrained", "resolve_checkpoint"]
