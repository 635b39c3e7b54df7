"""RetinaNet with a ResNet-18 + FPN (P2-P6) backbone: real, 1-bit, 1-bit with DFR or LSQ 4-bit.

The file ``--config`` takes in a checkout; the config itself, with its documentation, is
dfrdet_jax/configs/retinanet_r18.py, installed with the package as
``dfrdet_jax.configs.retinanet_r18``.
"""

from dfrdet_jax.configs.retinanet_r18 import get_config  # noqa: F401
