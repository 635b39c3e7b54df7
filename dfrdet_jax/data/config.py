"""Data configs: ``default_data_config(name)`` and the meaning of every field.

Fields of ``config.data`` (an ml_collections.ConfigDict):
  name         'synthetic' | 'aitod' | 'tinyperson' | 'dota2'
  root         data set folder (the user's download; synthetic: the cache folder)
  image_size   H = W of the batch after aspect-preserving resize (longer side) and padding
  max_boxes    N, rows per image in the batch; an image with more boxes raises an error
  flip_prob    probability of a horizontal flip (training only)
  lenient      False: bad records raise DataError; True: they are counted, reported, skipped
  degenerate   'expand' | 'error': zero-width/height boxes grown to 1 px (counted) or rejected
  source       'raw' (the files under root) | 'tfds' (a build of dfrdet_jax.data.tfds, which
               carries the images, class table, load report and evaluation ground truth:
               build_dataset does not read root; DOTA: the build of the config's tiling)
  tfds_dir     tfds data_dir for source='tfds'
  splits       {split name -> file-name split}, e.g. AI-TOD 'val' -> 'val'
  ann_pattern  COCO json path under root, '{split}' replaced (aitod, tinyperson)
  image_pattern image folder under root, '{split}' replaced (aitod, tinyperson)
  synthetic.*  generation parameters of sources/synthetic.ensure_synthetic
  tile_size, tile_overlap, min_visible   DOTA tiling (sources/dota.py)
  cache_dir    DOTA, source='raw': where the full-image ground-truth json is written
"""

import ml_collections

NAMES = ("synthetic", "aitod", "tinyperson", "dota2")


def default_data_config(name: str) -> ml_collections.ConfigDict:
    """Sensible defaults for each data set (see the module docstring for the fields)."""
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; expected one of {NAMES}")
    c = ml_collections.ConfigDict()
    c.name = name
    c.flip_prob = 0.5
    c.lenient = False
    c.degenerate = "expand"
    c.source = "raw"
    c.tfds_dir = ""
    if name == "synthetic":
        c.root = "~/.cache/dfrdet_jax"
        c.image_size = 128
        c.max_boxes = 256
        c.synthetic = ml_collections.ConfigDict(
            {
                "num_train": 256,
                "num_val": 64,
                "seed": 0,
                "min_size": 2,
                "max_size": 64,
                "min_objects": 3,
                "max_objects": 200,
                "max_distractors": 30,
            }
        )
    elif name == "aitod":
        c.root = "data/aitod"
        c.image_size = 800
        c.max_boxes = 1500  # AI-TOD has images with over 1,000 objects
        c.ann_pattern = "annotations/aitod_{split}_v1.json"
        c.image_pattern = "images/{split}"
    elif name == "tinyperson":
        c.root = "data/tiny_set"
        c.image_size = 1024
        c.max_boxes = 512
        c.ann_pattern = "annotations/tiny_set_{split}.json"
        c.image_pattern = "{split}"
    else:
        c.root = "data/dota2"
        c.image_size = 1024
        c.max_boxes = 1500
        c.tile_size = 1024
        c.tile_overlap = 200
        c.min_visible = 0.5
        c.cache_dir = "~/.cache/dfrdet_jax/dota2"  # full-image GT json (source='raw')
    c.splits = ml_collections.ConfigDict(
        {"train": "train", "val": "val", "test": "test", "trainval": "trainval"}
    )
    return c
