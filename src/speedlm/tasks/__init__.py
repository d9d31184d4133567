"""Non-text classification tasks on data that runs offline, for the encoder (models/encoder.py):
each task gives fixed train/test tensors of (examples, tokens, features) and labels."""

from speedlm.tasks.base import TASKS, TaskData, load_task

__all__ = ["TASKS", "TaskData", "load_task"]
