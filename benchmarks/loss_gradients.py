"""How hard each loss term pulls on each part of a trained detector: the gradient of every term
of the training loss (L_det, gamma * sum L_R, lambda * L_DFR, each distillation term), per
parameter group (backbone, FPN, head, DFR decoder), and how well each term's gradient agrees in
direction with L_det's on the parts they share.

DFR changes the detector only through the gradient lambda * L_DFR sends into the backbone and
the FPN; this script measures that gradient against the detection loss's, on the batches of a
split, from a run's checkpoint (its config read from its workdir):

    python benchmarks/loss_gradients.py --workdir runs/fcos_demo_v2/dfr_lr16x/seed0
    python benchmarks/loss_gradients.py --workdir WORKDIR --split val --batches 8 --out g.json

Gradients are those of the training step (train mode, batch statistics of the batch), summed
over the batches' losses averaged per batch. Prints a markdown table: for each term and group
the gradient's L2 norm, its ratio to L_det's norm in that group, and the cosine with L_det's
gradient there; ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from dfrdet_jax import checkpointing, distill, evaluate, sharding, steps
from dfrdet_jax import data as data_lib

# Metric name of each loss term -> (its weight's config section and field, the table's label).
TERMS = {
    "loss_det": (None, "L_det"),
    "loss_reconstruction": (("loss", "reconstruction_weight"), "gamma * sum L_R"),
    "loss_dfr": (("loss", "dfr_weight"), "lambda * L_DFR"),
    "loss_distill_features": (("distill", "feature_weight"), "FPN imitation"),
    "loss_distill_logits": (("distill", "logit_weight"), "class-score KL"),
}


def term_weights(config, metrics) -> dict[str, float]:
    """{metric name: its weight in the total loss} of the terms ``metrics`` hold."""
    unknown = [k for k in metrics if k.startswith("loss_distill_") and k not in TERMS]
    if unknown:  # its gradient would be missing from the table, and the terms' sum wrong
        raise KeyError(f"loss terms {unknown} have no weight field in TERMS")
    weights = {}
    for name in metrics.keys() & TERMS.keys():
        field = TERMS[name][0]
        weights[name] = 1.0 if field is None else float(config[field[0]][field[1]])
    return weights


def term_gradients(config, model, params, batch_stats, batches, teacher=None):
    """{term: gradient pytree (like ``params``)} of each weighted loss term, summed over
    ``batches`` (dicts in the batch format of ``dfrdet_jax.data``), plus ``total``, the gradient
    of the whole loss (the training step's); ``teacher``: the run's ``distill.Teacher``, if it
    distils."""
    loss_fn = functools.partial(
        steps.loss_and_metrics,
        model=model,
        config=config,
        teacher_model=teacher.model if teacher else None,
    )

    def parts(p, batch, rng):
        total, (metrics, _) = loss_fn(
            p, batch_stats, batch, rng, teacher.variables if teacher else None
        )
        weights = term_weights(config, metrics)
        return {"total": total, **{k: w * metrics[k] for k, w in weights.items()}}

    grads_of = jax.jit(jax.jacrev(parts))
    summed = None
    for step, batch in enumerate(batches):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        grads = grads_of(params, batch, jax.random.fold_in(jax.random.key(config.seed), step))
        summed = grads if summed is None else jax.tree.map(jnp.add, summed, grads)
    if summed is None:
        raise ValueError("no batches: the split is empty or --batches is 0")
    return summed


def _flat(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return np.zeros(0, np.float64)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def gradient_table(gradients) -> list[dict]:
    """Rows {term, group, norm, ratio_to_det, cosine_with_det}: per top-level parameter group
    and loss term (``total`` last), L2 norms, and norm ratio and cosine against L_det's
    gradient in that group (None where L_det's gradient there is zero)."""
    terms = [t for t in gradients if t != "total"] + ["total"]
    rows = []
    for group in gradients["total"]:
        det = _flat(gradients["loss_det"][group])
        det_norm = float(np.linalg.norm(det))
        for term in terms:
            g = _flat(gradients[term][group])
            norm = float(np.linalg.norm(g))
            compared = det_norm > 0 and term != "loss_det"
            rows.append(
                {
                    "term": term,
                    "group": group,
                    "norm": norm,
                    "ratio_to_det": norm / det_norm if compared else None,
                    "cosine_with_det": float(g @ det) / (norm * det_norm)
                    if compared and norm > 0
                    else None,
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    label = {k: v[1] for k, v in TERMS.items()}
    lines = [
        "| group | term | gradient norm | / L_det's | cosine with L_det's |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["ratio_to_det"] is None else f"{r['ratio_to_det']:.3g}"
        cosine = "" if r["cosine_with_det"] is None else f"{r['cosine_with_det']:+.3f}"
        name = label.get(r["term"], r["term"])
        lines.append(f"| {r['group']} | {name} | {r['norm']:.4g} | {ratio} | {cosine} |")
    return "\n".join(lines)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """--split and --batches, the batches a run is measured on, and --out for the JSON rows."""
    parser.add_argument("--split", default="train", help="the split whose batches are used")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")


def first_batches(config, split: str, count: int):
    """(the first ``count`` batches of ``split`` at the run's batch size, without augmentation,
    the dataset)."""
    dataset = data_lib.build_dataset(
        config.data, split, train=False, batch_size=config.train.batch_size, seed=config.seed
    )
    return list(itertools.islice(iter(dataset.loader), count)), dataset


def write_rows(rows: list[dict], path: str | None) -> None:
    """``rows`` as JSON at ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained run's workdir")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    add_batch_arguments(parser)
    args = parser.parse_args(argv)
    config = checkpointing.stored_config(args.workdir)
    config.eval.checkpoint = args.checkpoint
    model, state, mesh, info = evaluate.restored_state(config, args.workdir)
    image_hw = (config.data.image_size, config.data.image_size)
    replicated = sharding.replicated_sharding(mesh)
    teacher = distill.load_teacher(config, info.num_classes, image_hw, replicated)
    batches, _ = first_batches(config, args.split, args.batches)
    gradients = term_gradients(config, model, state.params, state.batch_stats, batches, teacher)
    rows = gradient_table(gradients)
    print(f"{args.workdir} ({args.checkpoint} checkpoint, step {int(state.step)}), "
          f"{args.batches} batches of {args.split}:")  # fmt: skip
    print(markdown(rows))
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
