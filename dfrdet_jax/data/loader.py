"""The grain input pipeline: records -> decode -> resize -> flip -> pad -> batch (-> cut box
slots, training).

Batch format: see dfrdet_jax.data.transforms. Records come from dfrdet_jax.data.catalog.
Training iterators repeat forever with a per-epoch reshuffle fixed by the seed; evaluation
iterators go once over every image in a deterministic order, the last partial batch padded with
image_id -1 images (never dropped).

Box slots: training batches of one process (one shard) have their box arrays cut to a bucket of
``box_slots`` (config.min_box_slots * 2^k, up to max_boxes), so the train step compiles once per
bucket and its target assignment costs what the batch's boxes cost. Sharded (multi-process)
training keeps max_boxes slots: every process must feed the global batch the same shapes, and
one cannot know the others' box counts without a sync. Evaluation batches keep max_boxes slots
too (the predict step reads no boxes; one shape, one compile).

Iterator state (for exact resume): ``state = dataset.get_iterator_state(it)`` is a JSON-able
dict; ``dataset.set_iterator_state(it, state)`` on a fresh ``it = iter(dataset.loader)``
makes ``it`` yield exactly the batches the saved iterator would have yielded next (same
seed, batch size, sharding and records). Underneath: grain's ``it.get_state()`` /
``it.set_state()``.

Worker processes (``num_workers > 0``): grain reads its own absl flags (``--grain_*``) in this
process when it starts them, so absl flags must be parsed by then. An absl app (such as
``python -m dfrdet_jax.main``) has parsed them; any other program parses them once at its
start, e.g. ``absl.flags.FLAGS(sys.argv[:1])``. This module never changes them: it raises an
error saying so instead.
"""

import dataclasses
import hashlib
import os

import grain.python as grain
import ml_collections
import numpy as np
from absl import flags, logging

from dfrdet_jax.data import box_slots, catalog, transforms
from dfrdet_jax.data.errors import DataError, SkipReport
from dfrdet_jax.data.sources import dota


@dataclasses.dataclass
class DetectionDataset:
    """A built pipeline. ``loader`` is a grain.DataLoader; iterate with ``iter(loader)``.

    num_images: records of the whole split over all shards (tiles for DOTA), before padding.
    annotation_file: COCO ground-truth json for evaluation (DOTA: full images).
    report: counts of everything skipped or repaired while loading.
    """

    loader: grain.DataLoader
    num_images: int
    num_classes: int
    class_names: list[str]
    category_ids: list[int]
    annotation_file: str
    report: SkipReport

    @staticmethod
    def get_iterator_state(iterator) -> dict[str, str]:
        """JSON-able state of an iterator of ``loader``."""
        state = iterator.get_state()
        return {"grain": state.decode() if isinstance(state, bytes) else state}

    @staticmethod
    def set_iterator_state(iterator, state: dict[str, str]) -> None:
        """Restore a state from get_iterator_state into a fresh iterator of ``loader``."""
        iterator.set_state(state["grain"].encode())


class _RecordSource(grain.RandomAccessDataSource):
    """Records (a list, or a lazy sequence such as a tfds build) plus ``num_pad`` pad images."""

    def __init__(self, records, num_pad: int = 0):
        self._records, self._num_pad = records, num_pad
        # Pad images must have the structure of real ones to batch with them (DOTA: a tile).
        self._pad = {"path": None, "image_id": -1}
        if num_pad and len(records) and "tile_offset" in records[0]:
            self._pad["tile_offset"] = (0, 0)
        # grain checks repr(source) on set_state: make it stable across runs and content-keyed.
        key = getattr(records, "cache_key", None) or repr(
            [(r["path"], r["image_id"], r.get("tile_offset")) for r in records]
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self._repr = f"_RecordSource(n={len(records)}, pad={num_pad}, sha1={digest})"

    def __len__(self) -> int:
        return len(self._records) + self._num_pad

    def __getitem__(self, index: int) -> dict:
        if index >= len(self._records):
            return dict(self._pad)  # pad image of a final partial eval batch
        return self._records[index]

    def __repr__(self) -> str:
        return self._repr


class _ToExample(grain.RandomMapTransform):
    """Decode, resize, random flip (with probability flip_prob) and pad one record. With
    ``keep_last_image`` (evaluation, read in order) the last decoded file is kept, so the tiles
    of one DOTA image decode it once; training shuffles, where keeping it would only hold memory.
    """

    def __init__(self, image_size: int, max_boxes: int, flip_prob: float, keep_last_image: bool):
        self.image_size, self.max_boxes, self.flip_prob = image_size, max_boxes, flip_prob
        self.decode = transforms.LastImageDecoder() if keep_last_image else transforms.decode_image

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        flip = self.flip_prob > 0 and rng.random() < self.flip_prob
        return transforms.example_from_record(
            element, self.image_size, self.max_boxes, flip, self.decode
        )


class _ExampleMap(grain.MapTransform):
    """A function (example) -> example run on every example (in the workers, when there are)."""

    def __init__(self, function):
        self.function = function

    def map(self, element: dict) -> dict:
        return self.function(element)


class _TrimBoxSlots(grain.MapTransform):
    """Cut a batch's box arrays to the smallest of ``buckets`` that holds them (box_slots)."""

    def __init__(self, buckets: tuple[int, ...]):
        self.buckets = buckets

    def map(self, element: dict) -> dict:
        return box_slots.trim_box_slots(element, self.buckets)


def _check_flags_parsed(num_workers: int) -> None:
    """RuntimeError unless absl flags are parsed, which grain needs to start worker processes."""
    if num_workers > 0 and not flags.FLAGS.is_parsed():
        raise RuntimeError(
            f"num_workers={num_workers}: grain reads its absl flags (--grain_*) when it starts "
            "worker processes, and absl flags are not parsed in this process. Run inside an "
            "absl app (as python -m dfrdet_jax.main does), parse them once at the start of the "
            "program (absl.flags.FLAGS(sys.argv[:1])), or use num_workers=0."
        )


def make_loader(
    records,
    config: ml_collections.ConfigDict,
    *,
    train: bool,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shard_index=None,
    shard_count=None,
    example_map=None,
) -> grain.DataLoader:
    """A grain.DataLoader of standard batches of ``batch_size`` examples of ``records``.

    Reads config.image_size, max_boxes, flip_prob and min_box_slots (train only) and name (in
    messages). train: sharded, shuffled per epoch from ``seed``, endless, whole batches only,
    box slots bucketed when there is one shard (module docstring). Otherwise one pass in order,
    padded with image_id -1 pad images to whole batches on every shard and worker, max_boxes
    slots. shard_index/shard_count: this process's shard; None = one shard. example_map: None
    or a picklable function (example) -> example run on every training example after it is
    decoded, flipped and padded (``models.registry.pipeline_targets``: targets made in the
    workers); evaluation examples do not get it.
    """
    _check_flags_parsed(num_workers)
    if shard_index is None or shard_count is None:
        shard_index, shard_count = 0, 1
    if train:
        if len(records) < batch_size * shard_count:
            raise DataError(
                f"{config.name}: {len(records)} training images are fewer than "
                f"one global batch ({batch_size} x {shard_count} processes)"
            )
        source = _RecordSource(records)
        # Shards may differ by one record: every process still yields one batch per step (the
        # stream is endless), and no record is left out of every shard as drop_remainder would.
        shard = grain.ShardOptions(shard_index, shard_count, drop_remainder=False)
        sampler = grain.IndexSampler(len(records), shard, shuffle=True, num_epochs=None, seed=seed)
    else:
        # Pad to whole batches on every shard and worker (each grain worker batches its own
        # records) so no image is dropped, no batch is partial and shards stay in step.
        per_step = batch_size * shard_count * max(num_workers, 1)
        source = _RecordSource(records, num_pad=-len(records) % per_step)
        shard = grain.ShardOptions(shard_index, shard_count, drop_remainder=False)
        sampler = grain.IndexSampler(len(source), shard, shuffle=False, num_epochs=1, seed=seed)
    flip_prob = config.flip_prob if train else 0.0
    operations = [
        _ToExample(config.image_size, config.max_boxes, flip_prob, keep_last_image=not train)
    ]
    if train and example_map is not None:
        operations.append(_ExampleMap(example_map))
    operations.append(grain.Batch(batch_size, drop_remainder=train))
    if train and shard_count == 1:
        buckets = box_slots.slot_buckets(config.max_boxes, config.min_box_slots)
        operations.append(_TrimBoxSlots(buckets))
        logging.info("%s training batches: box slots cut to one of %s", config.name, buckets)
    elif train:
        logging.info(
            "%s training batches: %d box slots (max_boxes; %d shards keep one shape)",
            config.name,
            config.max_boxes,
            shard_count,
        )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=num_workers,
        shard_options=shard,
    )


def build_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    train: bool,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shard_index=None,
    shard_count=None,
    example_map=None,
) -> DetectionDataset:
    """The input pipeline of ``split`` yielding standard batches of ``batch_size`` images.

    shard_index/shard_count: this process's shard (multi-host: jax.process_index() and
    jax.process_count()); None = one shard. num_workers > 0 decodes in worker processes
    (absl flags must be parsed: see the module docstring). example_map: see ``make_loader``.
    """
    records, info, annotation_file, report = catalog.load_records(config, split)
    loader = make_loader(
        records,
        config,
        train=train,
        batch_size=batch_size,
        seed=seed,
        num_workers=num_workers,
        shard_index=shard_index,
        shard_count=shard_count,
        example_map=example_map,
    )
    return DetectionDataset(
        loader,
        len(records),
        info.num_classes,
        info.class_names,
        info.category_ids,
        annotation_file,
        report,
    )


def list_images(path: str) -> tuple[list[str], list[str]]:
    """(image files, other files) of a folder, sorted, or ([path], []) for one image file;
    images are known by their extension (``dota.IMAGE_EXTENSIONS``). DataError when the folder
    holds no image."""
    if not os.path.isdir(path):
        return [path], []
    files, skipped = [], []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.lower().endswith(dota.IMAGE_EXTENSIONS):
            files.append(full)
        elif os.path.isfile(full):
            skipped.append(full)
    if not files:
        raise DataError(
            f"{path}: no images ({', '.join(dota.IMAGE_EXTENSIONS)}); "
            f"{len(skipped)} other files there"
        )
    return files, skipped
