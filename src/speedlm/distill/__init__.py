"""Distillation: turn a trained transformer into an efficient hybrid by replacing chosen attention
layers with other mixers initialised from the attention weights, then training in stages
(layers.py: which layers, the `--replace` syntax; shapes.py and student.py: the student's config
and model; init_from_attention.py: the weight mappings; objectives.py: the training losses)."""
