"""Command-line entry points (`python -m kforcing_jax.main.<name>`). Leaves: nothing imports
this package; each main parses flags and calls one library function."""
