"""One row against another, paired by seed, in every results file of ``dfrdet_jax.experiments``
that holds both, and pooled over all of them: how much 1-bit + DFR gains over its decoder asked
for a blank image (``dfr.mode=zero``) across every setting where that control was run.

    python benchmarks/paired_differences.py benchmarks/results/*/results_ablation*.json \\
        --rows dfr_lr16x,dfr_zero_lr16x

Each file's runs of a seed share that seed's start, so each seed gives one difference (AP %,
test split). Per file: the mean difference and its standard error over the seeds both rows have.
Pooled: every seed's difference of every file counted once, mean and standard error over all of
them; the settings differ, so the spread between files is part of that error, which makes it
conservative for a common effect. Files that lack a row are listed, not silently left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from dfrdet_jax import experiments

METRICS = ("AP", "AP_vt", "AP_t")


def compare(paths: list[str], a: str, b: str) -> dict:
    """{'files': [{'path', 'seeds', metric: (mean, se)}], 'pooled': {'pairs', metric: (mean,
    se)}, 'missing': [(path, the rows it lacks)]}."""
    files, missing, pooled = [], [], {m: [] for m in METRICS}
    for path in paths:
        with open(path) as f:
            runs = json.load(f)["runs"]
        summary = experiments.summarize(
            {row: {int(seed): m for seed, m in by_seed.items()} for row, by_seed in runs.items()}
        )
        lacking = [row for row in (a, b) if row not in summary]
        if lacking:
            missing.append((path, lacking))
            continue
        entry = {"path": path}
        for metric in METRICS:
            diffs = experiments.seed_differences(summary, a, b, metric)
            entry["seeds"] = len(diffs)
            entry[metric] = (
                experiments.mean_and_standard_error(diffs) if diffs else (math.nan, math.nan)
            )
            pooled[metric] += diffs
        files.append(entry)
    total = {"pairs": len(pooled["AP"])}
    total.update({m: experiments.mean_and_standard_error(v) for m, v in pooled.items() if v})
    return {"files": files, "pooled": total, "missing": missing}


def markdown(result: dict, a: str, b: str) -> str:
    """The per-file rows, the pooled row and the files left out."""
    head = f"| {a} - {b} | seeds | " + " | ".join(f"{m} (SE)" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]

    def cells(entry):
        return " | ".join(f"{entry[m][0]:+.2f} ({entry[m][1]:.2f})" for m in METRICS)

    for entry in result["files"]:
        name = os.path.relpath(entry["path"])
        lines.append(f"| {name} | {entry['seeds']} | {cells(entry)} |")
    pooled = result["pooled"]
    if pooled["pairs"]:
        lines.append(f"| **pooled, every seed once** | {pooled['pairs']} | {cells(pooled)} |")
    if result["missing"]:
        lines += ["", "Left out, for want of a row:"]
        lines += [
            f"- {os.path.relpath(path)}: no {', '.join(rows)}" for path, rows in result["missing"]
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files of experiments.py")
    parser.add_argument("--rows", required=True, help="'A,B': the table shows A - B")
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    if len(rows) != 2:
        parser.error(f"--rows takes two row names, 'A,B'; got {args.rows!r}")
    result = compare(args.results, *rows)
    print(markdown(result, *rows))
    return result


if __name__ == "__main__":
    main()
