"""Images per second of the grain input pipeline (decode, resize, flip, pad, batch) on this host.

Generates the synthetic data set (cached) and times training batches after a warm-up.

  python benchmarks/pipeline_throughput.py --image_size 256 --batch_size 16 --num_workers 2
"""

import argparse
import sys
import tempfile
import time

from absl import flags

from dfrdet_jax import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--num_batches", type=int, default=40)
    parser.add_argument("--cache_dir", default=tempfile.gettempdir() + "/dfrdet_jax_bench")
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])  # absl defaults: grain reads its flags when it starts workers

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
