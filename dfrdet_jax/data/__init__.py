"""Input data for dfrdet_jax: the data-source catalog, the grain pipeline and the standard batch.

Standard batch (dict of fixed-shape numpy arrays, B images, N = config.max_boxes; a training
batch of one process: the smallest bucket that holds its boxes, see box_slots):
  image      uint8   [B, H, W, 3]  padded image (H = W = config.image_size)
  boxes      float32 [B, N, 4]     (x1, y1, x2, y2) pixels of the padded/resized image; 0 pad
  labels     int32   [B, N]        class index in [0, num_classes), -1 for padding
  box_valid  bool    [B, N]        real rows (ground truth and ignore regions)
  ignore     bool    [B, N]        TinyPerson ignore regions / DOTA difficult: not ground truth
  image_id   int64   [B]           COCO image id; -1 for pad images of a final eval batch
  image_hw   int32   [B, 2]        (h, w) of the valid region before padding
  scale      float32 [B]           resize factor: resized = original * scale
  tile_offset float32 [B, 2]       DOTA only: (x, y) of the tile in the full image

Modules: catalog (data sets by name: config defaults, records, class tables, evaluation
protocol), loader (grain pipeline), transforms (per-image decode/resize/flip/pad), box_slots
(training batches' box arrays cut to a bucket), sources/
(file formats and the synthetic generator), tfds/ (tfds builds), errors, fixtures (tests).

Entry points: default_data_config, build_dataset, dataset_info, list_images,
load_records, max_boxes_per_image, ensure_synthetic; the catalog: get_source, source_names,
register_source.
"""

from dfrdet_jax.data.catalog import (
    DatasetInfo,
    DataSource,
    SplitRecords,
    dataset_info,
    default_data_config,
    get_source,
    load_records,
    max_boxes_per_image,
    register_source,
    source_names,
)
from dfrdet_jax.data.errors import DataError
from dfrdet_jax.data.loader import DetectionDataset, build_dataset, list_images
from dfrdet_jax.data.sources.synthetic import ensure_synthetic

__all__ = [
    "DataError",
    "DataSource",
    "DatasetInfo",
    "DetectionDataset",
    "SplitRecords",
    "build_dataset",
    "dataset_info",
    "default_data_config",
    "ensure_synthetic",
    "get_source",
    "list_images",
    "load_records",
    "max_boxes_per_image",
    "register_source",
    "source_names",
]
