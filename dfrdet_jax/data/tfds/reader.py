"""Records of a tfds build (see builders.py) for the grain pipeline, decoded lazily.

``tfds_records(config, split)`` gives load_records everything from the build alone (the manual
folder is not read): the records, the class table, the path of the split's COCO ground truth
stored in the build (builders.gt_path; DOTA: full images) for DetectionDataset.annotation_file,
and the loader's report recorded at build time (boxes clipped, expanded, or dropped from a tile
below min_visible), so nothing the build skipped or repaired goes unreported.

DOTA: the build read is the one tiled with ``config.tile_size / tile_overlap / min_visible``;
when the data dir holds only builds of other tilings, DataError names the values that differ
and how to build the asked tiling.
"""

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dfrdet_jax.data.errors import DataError, SkipReport
from dfrdet_jax.data.tfds import builders

BUILDERS = {
    "aitod": builders.AitodBuilder,
    "tinyperson": builders.TinyPersonBuilder,
    "dota2": builders.Dota2Builder,
}
# DOTA tiling: Dota2Config field -> data config field.
_TILING_FIELDS = {"tile_size": "tile_size", "overlap": "tile_overlap", "min_visible": "min_visible"}


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


def _other_tilings_error(tfds_dir: str, tiling: dict) -> DataError | None:
    """DataError naming how each dota2 build in ``tfds_dir`` differs from ``tiling``, if any."""
    differences = []
    for meta_file in sorted(epath.Path(tfds_dir, "dota2").glob("*/*/metadata.json")):
        meta = tfds.core.MetadataDict()
        meta.load_metadata(meta_file.parent)
        built = meta.get("tiling")
        if built is None:
            continue
        differences.append(
            ", ".join(
                f"{key}={built[key]} (config data.{field}={tiling[key]})"
                for key, field in _TILING_FIELDS.items()
                if built[key] != tiling[key]
            )
            + f" in {meta_file.parent}"
        )
    if not differences:
        return None
    asked = ", ".join(f"{key}={value!r}" for key, value in tiling.items())
    return DataError(
        f"{tfds_dir}: no dota2 build with the config's tiling; the builds there differ: "
        + "; ".join(differences)
        + ". Set data.tile_size/tile_overlap/min_visible to a built tiling, or build this one: "
        f"Dota2Builder(data_dir={tfds_dir!r}, config=dota2_config({asked}), "
        "file_format='array_record').download_and_prepare(download_config="
        "tfds.download.DownloadConfig(manual_dir=<DOTA folder>))"
    )


def tfds_builder(config):
    """The build of ``config.name`` in ``config.tfds_dir`` (DOTA: of the config's tiling).

    DataError when it is not built (DOTA: naming the tilings that are built instead).
    """
    if config.name not in BUILDERS:
        raise ValueError(f"no tfds builder for {config.name!r}; use source='raw'")
    kwargs = {"data_dir": config.tfds_dir, "file_format": "array_record"}
    if config.name == "dota2":
        tiling = {key: config[field] for key, field in _TILING_FIELDS.items()}
        builder = builders.Dota2Builder(config=builders.dota2_config(**tiling), **kwargs)
    else:
        builder = BUILDERS[config.name](**kwargs)
    if not builder.is_prepared():
        if config.name == "dota2" and (error := _other_tilings_error(config.tfds_dir, tiling)):
            raise error
        raise DataError(
            f"{builder.data_dir}: not built; build it first (see dfrdet_jax.data.tfds.builders)"
        )
    return builder


def tfds_records(config, split: str):
    """(records, category ids, class names, GT json, report) of ``split`` of the build."""
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
    return (
        TfdsRecords(source, builder.info.full_name, split),
        list(meta["category_ids"]),
        list(meta["class_names"]),
        builders.gt_path(builder.data_dir, tfds_split),
        report,
    )
