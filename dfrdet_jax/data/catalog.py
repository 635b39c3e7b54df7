"""The data-source catalog: every data set by name, with everything the package knows about it.

A ``DataSource`` carries one data set's default config fields, how its records and class table
are read from the files under ``config.root``, its tfds builder, and the evaluation protocol and
headline metric it is scored with. Code that needs a data set's particulars asks
``get_source(config.data.name)``; nothing else branches on data set names. Built in, in this
order: synthetic, aitod, tinyperson, dota2; ``register_source`` adds one.

Fields of ``config.data`` that every source has (``default_data_config``; a source's own
defaults give root, image_size and max_boxes):
  name          a registered data set name (source_names())
  root          data set folder (the user's download; synthetic: the cache folder)
  image_size    H = W of the batch in px, after aspect-preserving resize (longer side) and padding
  max_boxes     N, rows per image in the batch; an image with more boxes raises an error
  min_box_slots training batches of one process have their box arrays cut to the smallest of
                min_box_slots * 2^k (k >= 0) and max_boxes that holds their boxes: target
                assignment then costs what the real boxes cost, and the train step compiles
                once per size met (at most log2(max_boxes / min_box_slots) + 2 sizes);
                >= max_boxes: always max_boxes slots (data/box_slots.py; multi-process runs
                and evaluation always have max_boxes slots)
  flip_prob     probability of a horizontal flip (training only)
  lenient       False: bad records raise DataError; True: they are counted, reported, skipped
  verify_images False: image files are checked by their header before training (readable, the
                annotated size); True: every image is decoded too, which finds truncated files
                up front (skipped and counted when lenient) instead of when their batch comes
  degenerate    'expand' | 'error': zero-width/height boxes grown to 1 px (counted) or rejected
  source        'raw' (the files under root) | 'tfds' (a build of dfrdet_jax.data.tfds, which
                carries the images, class table, load report and evaluation ground truth:
                build_dataset does not read root; DOTA: the build of the config's tiling)
  tfds_dir      tfds data_dir for source='tfds'
  splits        {split name -> file-name split}, e.g. AI-TOD 'val' -> 'val'
Each source adds its own fields, documented where its defaults are set below.

Records (one per image, DOTA: per tile) are the plain dicts of sources/coco.py; a split loads as
``SplitRecords(records, info, annotation_file, report)``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
from absl import logging

from dfrdet_jax.choices import check_choice
from dfrdet_jax.data.errors import SkipReport
from dfrdet_jax.data.sources import coco, dota, synthetic


@dataclasses.dataclass
class DatasetInfo:
    """Class table of a data set: class index i <-> COCO category id category_ids[i]."""

    num_classes: int
    class_names: list[str]
    category_ids: list[int]

    @classmethod
    def numbered(cls, class_names: Sequence[str]) -> DatasetInfo:
        """The table of ``class_names`` in order, with category ids 1..K."""
        return cls(len(class_names), list(class_names), list(range(1, len(class_names) + 1)))


class SplitRecords(NamedTuple):
    """One split of a data set, loaded.

    records: list (or lazy sequence) of record dicts, see sources/coco.py (DOTA: tiles).
    info: its class table.
    annotation_file: COCO ground-truth json for evaluation (DOTA: of the full images).
    report: counts of everything skipped or repaired while loading.
    """

    records: Sequence[dict]
    info: DatasetInfo
    annotation_file: str
    report: SkipReport


# The common fields whose defaults differ between data sets.
_SOURCE_FIELDS = ("root", "image_size", "max_boxes")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One data set, known by ``name`` in configs and on the command line.

    Attributes:
      name: the registered name, e.g. 'aitod'.
      config: its fields of ``config.data`` and their defaults: root, image_size, max_boxes and
        its own (nested dicts become ConfigDicts); every config gets a copy.
      load_records: (data config, split) -> SplitRecords read from the files under
        ``config.root`` (source='raw'; tfds builds are read by dfrdet_jax.data.tfds.reader).
      class_table: data config -> DatasetInfo, without loading images: fixed by the data set,
        or read from where ``config.source`` says its annotations are.
      protocol: the dfrdet_jax.evaluation protocol it is scored with.
      best_metric: the metric of that protocol whose highest value picks the best checkpoint.
      tfds_builder: class name of its builder in dfrdet_jax.data.tfds.builders (imported only
        for source='tfds': it needs tensorflow_datasets), or None when it has none.
    """

    name: str
    config: Mapping[str, Any]
    load_records: Callable[[ml_collections.ConfigDict, str], SplitRecords]
    class_table: Callable[[ml_collections.ConfigDict], DatasetInfo]
    protocol: str
    best_metric: str
    tfds_builder: str | None = None

    def __post_init__(self):
        missing = [f for f in _SOURCE_FIELDS if f not in self.config]
        if missing:
            raise ValueError(f"data set {self.name!r}: its config lacks {missing}")
        object.__setattr__(self, "config", types.MappingProxyType(dict(self.config)))


_SOURCES: dict[str, DataSource] = {}


def register_source(source: DataSource) -> DataSource:
    """Adds ``source`` to the catalog; ValueError if its name is taken."""
    if source.name in _SOURCES:
        raise ValueError(f"data set {source.name!r} is already registered")
    _SOURCES[source.name] = source
    return source


def source_names() -> tuple[str, ...]:
    """Names of the registered data sets, in registration order."""
    return tuple(_SOURCES)


def get_source(name: str) -> DataSource:
    """The data set registered as ``name``; ValueError listing the valid names otherwise."""
    check_choice("data set", name, source_names())
    return _SOURCES[name]


def default_data_config(name: str) -> ml_collections.ConfigDict:
    """``config.data`` defaults of data set ``name`` (fields: see the module docstring)."""
    source = get_source(name)
    c = ml_collections.ConfigDict()
    c.name = name
    c.flip_prob = 0.5
    c.min_box_slots = 16
    c.lenient = False
    c.verify_images = False
    c.degenerate = "expand"
    c.source = "raw"
    c.tfds_dir = ""
    for field, value in source.config.items():
        c[field] = value  # nested dicts are copied into new ConfigDicts
    c.splits = ml_collections.ConfigDict(
        {"train": "train", "val": "val", "test": "test", "trainval": "trainval"}
    )
    return c


def load_records(config: ml_collections.ConfigDict, split: str) -> SplitRecords:
    """Records, class table, ground-truth json and report of ``split`` of ``config.name``."""
    if config.get("source", "raw") == "tfds":
        from dfrdet_jax.data.tfds import reader  # pylint: disable=g-import-not-at-top

        return reader.tfds_records(config, split)
    return get_source(config.name).load_records(config, split)


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Class table of the data set, without loading images."""
    return get_source(config.name).class_table(config)


def max_boxes_per_image(config: ml_collections.ConfigDict, split: str) -> int:
    """Largest number of boxes (ground truth + ignore regions) of one image (DOTA: one tile).

    Set ``config.max_boxes`` to at least this. Logs which image has it.
    """
    records = load_records(config, split).records
    if not records:
        return 0
    worst = max(records, key=lambda r: len(r["boxes"]))
    logging.info(
        "max boxes per image of %s/%s: %d (%s)",
        config.name,
        split,
        len(worst["boxes"]),
        worst["path"],
    )
    return len(worst["boxes"])


def _expand(path: str) -> str:
    return os.path.expanduser(path)


def _coco_split(config, ann_file: str, image_dir: str) -> SplitRecords:
    """The records of a COCO json and its image folder."""
    records, category_ids, names, report = coco.coco_records(
        ann_file,
        image_dir,
        lenient=config.lenient,
        degenerate=config.degenerate,
        decode_images=config.verify_images,
    )
    return SplitRecords(records, DatasetInfo(len(names), names, category_ids), ann_file, report)


# --- synthetic: generated on first use (sources/synthetic.py), COCO format ---------------------


def _synthetic_records(config, split: str) -> SplitRecords:
    s = config.synthetic
    paths = synthetic.ensure_synthetic(
        _expand(config.root),
        num_train=s.num_train,
        num_val=s.num_val,
        num_test=s.num_test,
        image_size=config.image_size,
        seed=s.seed,
        min_size=s.min_size,
        max_size=s.max_size,
        min_objects=s.min_objects,
        max_objects=s.max_objects,
        max_distractors=s.max_distractors,
    )
    if split not in paths:
        raise ValueError(f"synthetic data has splits {sorted(paths)}, not {split!r}")
    return _coco_split(config, *paths[split])


register_source(
    DataSource(
        name="synthetic",
        config={
            "root": "~/.cache/dfrdet_jax",  # cache folder of the generated data
            "image_size": 128,
            "max_boxes": 256,
            # Generation parameters of sources/synthetic.ensure_synthetic (sizes in px).
            "synthetic": {
                "num_train": 256,
                "num_val": 64,
                "num_test": 256,
                "seed": 0,
                "min_size": 2,
                "max_size": 64,
                "min_objects": 3,
                "max_objects": 200,
                "max_distractors": 30,
            },
        },
        load_records=_synthetic_records,
        class_table=lambda config: DatasetInfo.numbered(synthetic.CLASS_NAMES),
        protocol="aitod",
        best_metric="AP",
    )
)


# --- AI-TOD and TinyPerson: a COCO json and an image folder per split under root -------------


def _pattern_paths(config, split: str) -> tuple[str, str]:
    """(COCO json, image folder) of ``split``: config.ann_pattern / image_pattern under root."""
    file_split = config.splits.get(split, split)
    root = _expand(config.root)
    return (
        os.path.join(root, config.ann_pattern.format(split=file_split)),
        os.path.join(root, config.image_pattern.format(split=file_split)),
    )


def _pattern_records(config, split: str) -> SplitRecords:
    return _coco_split(config, *_pattern_paths(config, split))


def _annotated_class_table(config) -> DatasetInfo:
    """The categories of the train split's COCO json, or of the tfds build (source='tfds')."""
    if config.get("source", "raw") == "tfds":
        from dfrdet_jax.data.tfds import reader  # pylint: disable=g-import-not-at-top

        return reader.class_table(config)
    ann_file, _ = _pattern_paths(config, "train")
    category_ids, names = coco.category_table(coco.load_coco_json(ann_file))
    return DatasetInfo(len(names), names, category_ids)


register_source(
    DataSource(
        name="aitod",
        config={
            "root": "data/aitod",
            "image_size": 800,
            "max_boxes": 1500,  # AI-TOD has images with over 1,000 objects
            # The COCO json and the image folder of a split under root, '{split}' replaced.
            "ann_pattern": "annotations/aitod_{split}_v1.json",
            "image_pattern": "images/{split}",
        },
        load_records=_pattern_records,
        class_table=_annotated_class_table,
        protocol="aitod",
        best_metric="AP",
        tfds_builder="AitodBuilder",
    )
)

register_source(
    DataSource(
        name="tinyperson",
        config={
            "root": "data/tiny_set",
            "image_size": 1024,
            "max_boxes": 512,
            # The COCO json and the image folder of a split under root, '{split}' replaced.
            "ann_pattern": "annotations/tiny_set_{split}.json",
            "image_pattern": "{split}",
        },
        load_records=_pattern_records,
        class_table=_annotated_class_table,
        protocol="tinyperson",
        best_metric="AP50_tiny",
        tfds_builder="TinyPersonBuilder",
    )
)


# --- DOTA-v2.0: polygon labels, large images cut into overlapping tiles (sources/dota.py) -----


def _dota_records(config, split: str) -> SplitRecords:
    gt_json = os.path.join(_expand(config.cache_dir), f"{split}_full_gt.json")
    records, _, _, report = dota.dota_records(
        _expand(config.root),
        config.splits.get(split, split),
        tile_size=config.tile_size,
        overlap=config.tile_overlap,
        min_visible=config.min_visible,
        lenient=config.lenient,
        gt_json=gt_json,
    )
    return SplitRecords(records, DatasetInfo.numbered(dota.CLASS_NAMES), gt_json, report)


register_source(
    DataSource(
        name="dota2",
        config={
            "root": "data/dota2",
            "image_size": 1024,
            "max_boxes": 1500,
            # Tiling: square tiles of tile_size px overlapping by tile_overlap px; a box cut by a
            # tile border stays in the tile when at least min_visible of its area shows.
            "tile_size": 1024,
            "tile_overlap": 200,
            "min_visible": 0.5,
            "cache_dir": "~/.cache/dfrdet_jax/dota2",  # source='raw': full-image GT json here
        },
        load_records=_dota_records,
        class_table=lambda config: DatasetInfo.numbered(dota.CLASS_NAMES),
        # VOC mAP50; 'dota_aitod' with best_metric 'AP' gives the paper's Table 3 (AI-TOD metrics).
        protocol="dota",
        best_metric="mAP50",
        tfds_builder="Dota2Builder",
    )
)
