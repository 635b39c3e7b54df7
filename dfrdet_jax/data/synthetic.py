"""dfrdet_jax.data.synthetic: alias of dfrdet_jax.data.sources.synthetic."""

from dfrdet_jax.data.sources.synthetic import CLASS_NAMES, ensure_synthetic, generate_scene

__all__ = ["CLASS_NAMES", "ensure_synthetic", "generate_scene"]
