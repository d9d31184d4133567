"""nn.Modules: one mixer family per file, plus norms, RoPE and MLPs."""
