"""kforcing_jax: K-Forcing (push-forward k-token decoding) in JAX/Flax NNX."""
