"""The config files of the detectors, installed with the package: each module has
``get_config(arg)`` (``'<dataset>,<variant>[,demo][,smoke]'``), e.g.
``dfrdet_jax.configs.fcos_r18.get_config('synthetic,dfr,demo')``. The command line takes them by
path, ``--config configs/fcos_r18.py:synthetic,dfr`` in a checkout (``configs/`` there points
here) or ``--config $(python -c 'import dfrdet_jax.configs as c; print(c.path("fcos_r18"))')``.
"""

import importlib
import os
from typing import Any

import ml_collections

from dfrdet_jax.choices import check_choice

NAMES = ("fcos_r18", "retinanet_r18", "faster_rcnn_r18")


def path(name: str) -> str:
    """The file of config ``name`` (one of NAMES), for ``--config PATH:ARG``."""
    check_choice("config", name, NAMES)
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")


def get_config(name: str, arg: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of config ``name`` (one of NAMES), e.g. ('fcos_r18', 'synthetic,bnn')."""
    path(name)  # a clear error for an unknown name
    return importlib.import_module(f"{__name__}.{name}").get_config(arg)


def defaults_of(stored: dict[str, Any]) -> ml_collections.ConfigDict | None:
    """Today's defaults for the family, dataset and variant of a stored config (a run's
    ``config.json``, as a dict): ``get_config('<data.name>,<variant>')`` of its family's
    config. None when the stored config names none of them (a hand-written config)."""
    name = f"{stored.get('model', {}).get('name')}_r18"
    data_name, variant = stored.get("data", {}).get("name"), stored.get("variant")
    if name not in NAMES:
        return None
    try:
        return get_config(name, f"{data_name},{variant}")
    except ValueError:  # a dataset or variant this version does not know
        return None
