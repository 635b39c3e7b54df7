"""See the package docstring of dfrdet_jax."""
