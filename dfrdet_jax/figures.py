"""The ``viz`` mode: the paper's kinds of pictures of a trained detector, as PNG files in
``workdir/figures`` (drawn by dfrdet_jax/viz.py).

From the ``config.eval.checkpoint`` checkpoint and the first ``config.viz.num_images`` images of
``config.eval.split``:
  outcomes_<id>.png      true positives, false positives and misses, coloured by size class, at
                         IoU ``viz.iou`` for detections of score >= ``viz.min_score``;
  saliency_<id>.png      the mean |activation| of FPN level P``viz.level`` beside the image, and
                         beside it the same of ``viz.compare_workdir``'s checkpoint (another run,
                         e.g. 1-bit without DFR, its config read from its workdir), as Fig. 5;
  reconstruction_<id>.png  (variants with the DFR decoder) image, mask M, target M * X and the
                         decoder's reconstruction;
and over the whole split and the runs' logs:
  pr_curves.png          precision-recall per size class (IoU ``viz.iou``, 1,500 detections);
  training_curves.png    every loss part and the validation AP over steps, this run and the
                         compared one.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from dfrdet_jax import checkpointing, evaluate, viz
from dfrdet_jax.evaluation import coco_tiny
from dfrdet_jax.evaluation import results as results_lib
from dfrdet_jax.losses import dfr
from dfrdet_jax.models.detectors import normalize_images


def _compare_run(config: ml_collections.ConfigDict):
    """(label, model, state) of ``config.viz.compare_workdir`` with the config stored there
    (its eval settings from ``config``), or None when none is given."""
    other = config.viz.compare_workdir
    if not other:
        return None
    other_config = checkpointing.stored_config(other)
    other_config.eval = config.eval
    model, state, _, _ = evaluate.restored_state(other_config, other)
    return f"{other_config.variant} ({os.path.basename(os.path.normpath(other))})", model, state


def _variables(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _network_fn(model, level: int, reconstruct: bool):
    """(state, normalised images [B, H, W, 3]) -> ([B, h, w] saliency of FPN level P``level``,
    the decoder's [B, H, W, 3] reconstruction with ``reconstruct``, else None). The network runs
    once per call, without its head, as one compiled program (op by op, every operation would
    compile alone)."""

    @jax.jit
    def run(variables, images):
        outputs = model.apply(
            variables, images, train=False, features=True, reconstruct=reconstruct,
            run_head=False,
        )  # fmt: skip
        return outputs["features"][level - model.min_level], outputs.get("reconstruction")

    def apply(state, images):
        level_map, reconstruction = run(_variables(state), images)
        saliency = np.stack([viz.saliency(m) for m in np.asarray(level_map, np.float32)])
        if reconstruction is not None:
            reconstruction = np.asarray(reconstruction, np.float32)
        return saliency, reconstruction

    return apply


def make_figures(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the figures (module docstring) into ``workdir/figures``; returns that folder."""
    evaluate.check_eval_batch(config)
    v = config.viz
    model, state, mesh, info = evaluate.restored_state(config, workdir)
    if not model.min_level <= v.level <= model.max_level:
        raise ValueError(
            f"config.viz.level={v.level} is not a level of the model "
            f"(P{model.min_level}-P{model.max_level})"
        )
    compare = _compare_run(config)
    out_dir = os.path.join(workdir, "figures")
    os.makedirs(out_dir, exist_ok=True)
    dataset = evaluate.eval_dataset(config)
    predict = evaluate.predict_fn(config, model, mesh)
    reconstructs = bool(config.dfr.levels) and config.variant == "dfr"  # has the decoder
    own_network = _network_fn(model, v.level, reconstructs)
    other_network = _network_fn(compare[1], v.level, False) if compare else None
    foreground_mask = jax.jit(dfr.foreground_mask, static_argnums=(3, 4))
    drawn, written = 0, []
    for batch in dataset.loader:
        if drawn >= v.num_images:
            break
        detections, _ = predict(state, batch)
        images = normalize_images(batch["image"])
        own, reconstruction = own_network(state, images)
        other = other_network(compare[2], images)[0] if compare else None
        for i in range(len(batch["image"])):
            image_id = int(batch["image_id"][i])
            if image_id < 0 or drawn >= v.num_images:
                continue
            h, w = batch["image_hw"][i]
            image = batch["image"][i][:h, :w]
            gt = batch["box_valid"][i] & ~batch["ignore"][i]
            valid = detections.valid[i]
            path = os.path.join(out_dir, f"outcomes_{image_id}.png")
            counts = viz.draw_outcomes(
                image,
                batch["boxes"][i][gt],
                batch["labels"][i][gt],
                detections.boxes[i][valid],
                detections.scores[i][valid],
                detections.classes[i][valid],
                path,
                iou_threshold=v.iou,
                min_score=v.min_score,
            )
            logging.info("%s: %s", path, counts)
            level_hw = own[i].shape
            crop = (slice(0, -(-h * level_hw[0] // images.shape[1])),
                    slice(0, -(-w * level_hw[1] // images.shape[2])))  # fmt: skip
            maps = {f"P{v.level}, {config.variant} (this run)": own[i][crop]}
            if compare:
                maps[f"P{v.level}, {compare[0]}"] = other[i][crop]
            path = os.path.join(out_dir, f"saliency_{image_id}.png")
            viz.draw_saliency(image, maps, path)
            written += [f"outcomes_{image_id}.png", f"saliency_{image_id}.png"]
            if reconstructs:
                height, width = images.shape[1:3]
                mask, _ = foreground_mask(
                    batch["boxes"][i], batch["box_valid"][i], batch["ignore"][i], height, width
                )
                mask = np.asarray(mask)[:h, :w]
                target = np.asarray(images[i])[:h, :w] * mask[..., None]
                path = os.path.join(out_dir, f"reconstruction_{image_id}.png")
                viz.draw_reconstruction(image, mask, target, reconstruction[i][:h, :w], path)
                written.append(f"reconstruction_{image_id}.png")
            drawn += 1
    results = evaluate.predict_dataset(config, model, state, mesh, dataset)
    if jax.process_index() == 0:
        gt, _ = results_lib.load_ground_truth(dataset.annotation_file)
        recall, curves = coco_tiny.precision_recall_curves(
            gt, results_lib.load_detections(results, gt), iou=v.iou
        )
        viz.plot_pr_curves(recall, curves, os.path.join(out_dir, "pr_curves.png"))
        runs = {config.variant: os.path.join(workdir, "metrics.jsonl")}
        if compare:
            runs[compare[0]] = os.path.join(config.viz.compare_workdir, "metrics.jsonl")
        runs = {label: path for label, path in runs.items() if os.path.isfile(path)}
        if runs:
            viz.plot_training_curves(runs, os.path.join(out_dir, "training_curves.png"))
            written.append("training_curves.png")
        written.append("pr_curves.png")
        with open(os.path.join(out_dir, "figures.json"), "w") as f:
            json.dump(written, f, indent=1)
    logging.info("Wrote %d figures to %s", len(written), out_dir)
    return out_dir
