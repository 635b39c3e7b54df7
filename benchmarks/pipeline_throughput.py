"""Images per second of the grain input pipeline (decode, resize, flip, pad, batch) on this host.

Generates the synthetic data set (cached) and times training batches after a warm-up; with
``--dota_px`` it instead writes ``--num_images`` DOTA images of that side (random pixels, PNG)
and times one evaluation pass over their tiles (tiles/s; tiles of one image come in order).

  python benchmarks/pipeline_throughput.py --image_size 256 --batch_size 16 --num_workers 2
  python benchmarks/pipeline_throughput.py --dota_px 4000 --num_images 2 --image_size 1024
"""

import argparse
import os
import sys
import tempfile
import time

from absl import flags

from dfrdet_jax import data
from dfrdet_jax.data.fixtures import write_dota_fixture


def time_dota_evaluation(args) -> None:
    """One evaluation pass over the tiles of ``args.num_images`` generated DOTA images."""
    root = os.path.join(args.cache_dir, f"dota_{args.dota_px}px_{args.num_images}")
    if not os.path.isdir(root):
        side = args.dota_px
        write_dota_fixture(root, "val", {f"P{i}": (side, side, []) for i in range(args.num_images)})
    config = data.default_data_config("dota2")
    config.root, config.cache_dir = root, os.path.join(root, "cache")
    config.image_size, config.tile_size = args.image_size, args.image_size
    ds = data.build_dataset(
        config, "val", train=False, batch_size=args.batch_size, seed=0, num_workers=args.num_workers
    )
    start = time.perf_counter()
    batches = sum(1 for _ in ds.loader)
    seconds = time.perf_counter() - start
    print(
        f"{ds.num_images / seconds:.2f} tiles/s: {ds.num_images} tiles of {args.num_images} "
        f"{args.dota_px} px images in {batches} batches, {seconds:.1f} s "
        f"({args.image_size} px tiles, batch {args.batch_size}, {args.num_workers} workers)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--num_batches", type=int, default=40)
    parser.add_argument("--cache_dir", default=tempfile.gettempdir() + "/dfrdet_jax_bench")
    parser.add_argument("--dota_px", type=int, default=0, help="time DOTA tiles of this side")
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])  # absl defaults: grain reads its flags when it starts workers
    if args.dota_px:
        time_dota_evaluation(args)
        return

    config = data.default_data_config("synthetic")
    config.root, config.image_size = args.cache_dir, args.image_size
    config.synthetic.num_train, config.synthetic.num_val = args.num_images, 1
    start = time.perf_counter()
    ds = data.build_dataset(
        config,
        "train",
        train=True,
        batch_size=args.batch_size,
        seed=0,
        num_workers=args.num_workers,
    )
    print(f"data ready in {time.perf_counter() - start:.1f} s ({ds.num_images} images)")
    iterator = iter(ds.loader)
    for _ in range(3):  # warm-up: worker start, first decodes
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.num_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    print(
        f"{args.num_batches * args.batch_size / seconds:.1f} images/s "
        f"({args.image_size} px, batch {args.batch_size}, {args.num_workers} workers)"
    )


if __name__ == "__main__":
    main()
