"""Records of a tfds build (see builders.py) for the grain pipeline, decoded lazily."""

import numpy as np

from dfrdet_jax.data.tfds import builders

BUILDERS = {"aitod": builders.AitodBuilder, "tinyperson": builders.TinyPersonBuilder}


class TfdsRecords:
    """Sequence of pipeline records backed by ``builder.as_data_source()[split]``."""

    def __init__(self, source, name: str, split: str):
        self._source = source
        self.cache_key = f"tfds:{name}:{split}:{len(source)}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        objects = example["objects"]
        name = example["file_name"]
        return {
            "path": name.decode() if isinstance(name, bytes) else str(name),
            "image": example["image"],
            "image_id": int(example["image_id"]),
            "boxes": np.asarray(objects["bbox"], np.float32).reshape(-1, 4),
            "labels": np.asarray(objects["label"], np.int32).reshape(-1),
            "ignore": np.asarray(objects["ignore"], bool).reshape(-1),
        }


def tfds_records(config, split: str):
    """(records, category ids, class names) of ``split`` of the build in ``config.tfds_dir``."""
    if config.name not in BUILDERS:
        raise ValueError(f"no tfds builder for {config.name!r}; use source='raw'")
    builder = BUILDERS[config.name](data_dir=config.tfds_dir, file_format="array_record")
    source = builder.as_data_source()[config.splits.get(split, split)]
    meta = builder.info.metadata
    return (
        TfdsRecords(source, config.name, split),
        list(meta["category_ids"]),
        list(meta["class_names"]),
    )
