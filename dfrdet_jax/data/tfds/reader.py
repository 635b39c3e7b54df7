"""Records of a tfds build (see builders.py) for the grain pipeline, decoded lazily.

``tfds_records(config, split)`` gives load_records everything from the build alone (the manual
folder is not read): the records, the class table, the path of the split's COCO ground truth
stored in the build (builders.gt_path; DOTA: full images) for DetectionDataset.annotation_file,
and the loader's report recorded at build time (boxes clipped, expanded, or dropped from a tile
below min_visible), so nothing the build skipped or repaired goes unreported.

Which build is read: the builder class the data set's catalog entry names, made from the data
config by its ``from_data_config`` (DOTA: the build tiled with ``config.tile_size /
tile_overlap / min_visible``; when the data dir holds only builds of other tilings, DataError
names the values that differ and how to build the asked tiling).
"""

import numpy as np

from dfrdet_jax.data import catalog
from dfrdet_jax.data.errors import DataError, SkipReport
from dfrdet_jax.data.tfds import builders


class TfdsRecords:
    """Sequence of pipeline records backed by ``builder.as_data_source()[split]``.

    Records are those of sources/coco.py with the decoded ``image`` (DOTA: the tile, already cut)
    besides ``path`` (the file name), and, for DOTA, ``tile_offset`` (x, y).
    """

    def __init__(self, source, full_name: str, split: str):
        self._source = source
        self.cache_key = f"tfds:{full_name}:{split}:{len(source)}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        objects = example["objects"]
        name = example["file_name"]
        record = {
            "path": name.decode() if isinstance(name, bytes) else str(name),
            "image": example["image"],
            "image_id": int(example["image_id"]),
            "hw": tuple(example["image"].shape[:2]),
            "boxes": np.asarray(objects["bbox"], np.float32).reshape(-1, 4),
            "labels": np.asarray(objects["label"], np.int32).reshape(-1),
            "ignore": np.asarray(objects["ignore"], bool).reshape(-1),
        }
        if "tile_offset" in example:
            record["tile_offset"] = tuple(int(v) for v in example["tile_offset"])
        return record


def tfds_builder(config):
    """The build of ``config.name`` in ``config.tfds_dir`` (DOTA: of the config's tiling).

    DataError when it is not built (DOTA: naming the tilings that are built instead).
    """
    source = catalog.get_source(config.name)
    if source.tfds_builder is None:
        raise ValueError(f"no tfds builder for {config.name!r}; use source='raw'")
    builder = getattr(builders, source.tfds_builder).from_data_config(
        config, data_dir=config.tfds_dir, file_format="array_record"
    )
    if not builder.is_prepared():
        raise builder.not_built_error(config.tfds_dir)
    return builder


def _stored_class_table(builder) -> catalog.DatasetInfo:
    meta = builder.info.metadata
    names = list(meta["class_names"])
    return catalog.DatasetInfo(len(names), names, list(meta["category_ids"]))


def class_table(config) -> catalog.DatasetInfo:
    """The class table stored in the build."""
    return _stored_class_table(tfds_builder(config))


def tfds_records(config, split: str) -> catalog.SplitRecords:
    """The records, class table, ground-truth json and report of ``split`` of the build."""
    builder = tfds_builder(config)
    tfds_split = config.splits.get(split, split)
    if tfds_split not in builder.info.splits:
        raise DataError(
            f"{builder.data_dir}: no split {tfds_split!r} in this build "
            f"(built: {sorted(builder.info.splits)})"
        )
    source = builder.as_data_source(split=tfds_split)
    meta = builder.info.metadata
    report = SkipReport(lenient=False)  # builds are strict: only repairs can be in it
    stored = meta["reports"][tfds_split]
    report.counts.update(stored["counts"])
    report.examples.update(stored["examples"])
    report.log(f"{builder.data_dir} ({tfds_split})")
    return catalog.SplitRecords(
        TfdsRecords(source, builder.info.full_name, split),
        _stored_class_table(builder),
        builders.gt_path(builder.data_dir, tfds_split),
        report,
    )
