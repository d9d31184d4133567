"""Pure tensor functions: each op family has a naive float64-friendly reference and fast forms."""
