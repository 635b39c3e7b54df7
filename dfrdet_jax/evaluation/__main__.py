"""CLI: ``python -m dfrdet_jax.evaluation --gt ann.json --dt results.json [--protocol aitod]
[--backend numpy] [--out metrics.json]``: prints the table, writes the metrics JSON."""

from __future__ import annotations

import argparse
import json
import sys

from dfrdet_jax.evaluation import api, coco_tiny, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfrdet_jax.evaluation", description=__doc__)
    parser.add_argument("--gt", required=True, help="COCO-format ground-truth JSON")
    parser.add_argument("--dt", required=True, help="COCO results JSON (list of detections)")
    parser.add_argument("--protocol", default="aitod", choices=api.PROTOCOLS)
    parser.add_argument(
        "--backend",
        choices=coco_tiny.BACKENDS,
        help="COCOeval backend (default: the protocol's, api.DEFAULT_BACKENDS)",
    )
    parser.add_argument(
        "--out", help="where to write the metrics JSON (default: <dt>.metrics.json)"
    )
    args = parser.parse_args(argv)
    try:
        metrics = api.evaluate(args.gt, args.dt, protocol=args.protocol, backend=args.backend)
    except (results.EvaluationInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(api.format_table(metrics))
    out = args.out or f"{args.dt}.metrics.json"
    with open(out, "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
