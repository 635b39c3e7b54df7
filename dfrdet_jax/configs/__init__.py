"""The config files of the detectors, installed with the package: each module has
``get_config(arg)`` (``'<dataset>,<variant>[,demo][,smoke]'``), e.g.
``dfrdet_jax.configs.fcos_r18.get_config('synthetic,dfr,demo')``. The command line takes them by
path, ``--config configs/fcos_r18.py:synthetic,dfr`` in a checkout (``configs/`` there points
here) or ``--config $(python -c 'import dfrdet_jax.configs as c; print(c.path("fcos_r18"))')``.
"""

import os

NAMES = ("fcos_r18", "retinanet_r18", "faster_rcnn_r18")


def path(name: str) -> str:
    """The file of config ``name`` (one of NAMES), for ``--config PATH:ARG``."""
    if name not in NAMES:
        raise ValueError(f"unknown config {name!r}; the package has {list(NAMES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
