"""dfrdet_jax: 1-bit tiny-object detectors in JAX/Flax with Discriminative Feature Refinement.

Subpackages:
  layers      importable 1-bit building blocks (quantizers, BinaryConv/BinaryDense, RSign, RPReLU)
              and the k-bit LSQConv/LSQDense
  ops         box math, NMS, anchors and target assignment as pure jnp functions
  losses      focal, IoU-family and DFR losses
  models      ResNet backbones, FPN, detection heads and the DFR decoder
  data        synthetic default data set, AI-TOD / TinyPerson / DOTA sources, grain pipeline
  evaluation  AI-TOD, TinyPerson and DOTA metrics: COCOeval on arrays, pycocotools selectable
"""

__version__ = "0.1.0"
