"""Test-only parts and helpers (importable as `support` from any test)."""
