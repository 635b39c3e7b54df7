"""Where the train step's time and memory go: each component compiled and timed alone.

Every part runs forward and backward (gradients with respect to its parameters and its input
maps, as inside the full step) on the inputs the full step would hand it, jit-compiled on its
own: the backbone, the FPN, the head, target assignment with the detection losses (from fixed
head outputs), the reconstruction loss L_R of every binary layer, the DFR decoder with L_DFR,
and the optimizer update; then the whole step (``steps.make_train_step``, one device). The sum
of the parts against the whole shows what fusing them gains or costs. Memory is XLA's buffer
assignment of each compiled part (arguments, outputs and temporaries). Targets are assigned as
``--matching`` says: in the input pipeline (as training does; made once, untimed, so 'targets +
L_det' holds only the loss; Faster R-CNN matches its RPN anchors inside the head, which then
only gathers them) or in the step.

    python benchmarks/step_breakdown.py --size 512 --batch 2 --variants real,bnn,dfr
    python benchmarks/step_breakdown.py --size 128 --width small --steps 3   # quick

Prints a markdown table (ms per call, the share of the whole step, compile s, GiB) per variant
and, with --out, writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import train_throughput  # noqa: E402  (benchmarks/ is the script's folder)

from dfrdet_jax import layers, steps
from dfrdet_jax.losses import dfr
from dfrdet_jax.models import registry
from dfrdet_jax.models.decoder import DFRDecoder
from dfrdet_jax.models.detectors import normalize_images
from dfrdet_jax.models.fpn import FPN
from dfrdet_jax.models.resnet import ResNet

MUTABLE = ["batch_stats"]


def _summed(tree) -> jax.Array:
    """A scalar every leaf of ``tree`` contributes to: backward then reaches every output."""
    return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(tree))


def _module_part(module, variables):
    """f(params, inputs) = the sum of module(*inputs), its other collections fixed (batch
    statistics updated as in training; L_R is the part of its own)."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def objective(params, inputs):
        outputs, _ = module.apply({"params": params, **rest}, *inputs, True, mutable=MUTABLE)
        return _summed(outputs)

    return objective


def _binary_layers(params):
    """The dicts of ``params`` that are binary layers (a kernel and an alpha)."""
    if isinstance(params, dict):
        if "kernel" in params and "alpha" in params:
            yield params
        for child in params.values():
            yield from _binary_layers(child)


def _lr_objective(params) -> jax.Array:
    """L_R of every binary layer in ``params`` (alpha applied as |alpha|, as the layers do)."""
    return sum(
        (
            layers.reconstruction_loss(p["kernel"], jnp.abs(p["alpha"]))
            for p in _binary_layers(params)
        ),
        jnp.zeros((), jnp.float32),
    )


def _timed(fn, args, num_steps: int) -> dict:
    """Compile ``fn`` for ``args``; ms per call (median of ``num_steps`` after one untimed call;
    none with ``num_steps`` 0), compile s and XLA's GiB."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory_gb = train_throughput.step_memory_gb(compiled)
    if not num_steps:
        return {"ms": float("nan"), "compile_s": compile_s, "memory_gb": memory_gb}
    return {
        "ms": train_throughput.median_ms(lambda: compiled(*args), num_steps),
        "compile_s": compile_s,
        "memory_gb": memory_gb,
    }


def breakdown(variant: str, args) -> list[dict]:
    """One row per part of ``variant``'s step, then the whole step."""
    config = train_throughput.configure(variant, args, matching=args.matching)
    model = registry.build_model(config, num_classes=8)
    state = steps.create_train_state(
        config, model, jax.random.key(0), (args.size, args.size), max(args.steps, 1)
    )
    batch = train_throughput.random_batch(
        np.random.default_rng(0), args.batch, args.size, args.boxes, args.max_boxes
    )
    batch = jax.tree.map(jnp.asarray, train_throughput.with_pipeline_targets(config, batch))
    images = normalize_images(batch["image"], model.dtype or jnp.float32)
    params, variables = state.params, {"params": state.params, "batch_stats": state.batch_stats}

    def sub(name, variables=variables):
        return {k: v[name] for k, v in variables.items() if name in v}

    backbone = ResNet(model.depth, model.backbone_width, model.backbone_binary, model.dtype)
    neck = FPN(
        model.fpn_width, model.min_level, model.max_level, model.p6_source, model.neck_binary,
        model.dtype,
    )  # fmt: skip

    def forward(variables, images, batch):
        """Each part's inputs: the backbone's stages, the FPN's pyramid, the head's outputs."""
        stages = backbone.apply(sub("backbone", variables), images, True, mutable=MUTABLE)[0]
        pyramid = neck.apply(sub("neck", variables), stages, True, mutable=MUTABLE)[0]
        kwargs = registry.apply_kwargs(config, batch, train=True, rng=jax.random.key(0))
        head_outputs = model.apply(variables, images, True, mutable=MUTABLE, **kwargs)[0]
        return stages, pyramid, head_outputs

    # One program: op by op, every operation would compile alone.
    stages, pyramid, head_outputs = jax.jit(forward)(variables, images, batch)
    levels = [pyramid[f"P{v}"] for v in range(model.min_level, model.max_level + 1)]

    # part: (objective(params, inputs, batch), params, inputs). The batch is an argument, not a
    # closure: XLA would fold the target assignment of a constant batch away at compile time.
    backbone_part = _module_part(backbone, sub("backbone"))
    neck_part = _module_part(neck, sub("neck"))

    def image_input(batch):
        return normalize_images(batch["image"], model.dtype or jnp.float32)

    parts = {
        "backbone": (lambda p, _, b: backbone_part(p, (image_input(b),)), params["backbone"], ()),
        "FPN": (lambda p, inputs, _: neck_part(p, inputs), params["neck"], (stages,)),
    }

    def head(p, inputs, batch):
        extra = registry.apply_kwargs(config, batch, train=True, rng=jax.random.key(0))
        return _summed(model.head.apply({"params": p}, inputs[0], True, **extra))

    parts["head"] = (head, params["head"], (levels,))
    parts["targets + L_det"] = (
        lambda outputs, _, b: _summed(registry.detection_loss(config, outputs, b)),
        head_outputs,
        (),
    )
    if next(_binary_layers(params), None) is not None:
        parts["L_R"] = (lambda p, _, b: _lr_objective(p), params, ())
    if config.dfr.levels:
        decoder = DFRDecoder(model.decoder_width, model.decoder_blocks, dtype=model.dtype)
        decoded = [pyramid[f"P{v}"] for v in config.dfr.levels]
        height, width = images.shape[1:3]

        def decode(p, inputs, batch):
            recon = decoder.apply({"params": p}, inputs[0], (height, width))
            fg, ignore = jax.vmap(lambda b, v, i: dfr.foreground_mask(b, v, i, height, width))(
                batch["boxes"], batch["box_valid"], batch["ignore"]
            )
            return dfr.dfr_loss(recon, image_input(batch), fg, ignore, mode=config.dfr.mode)

        parts["DFR decoder + L_DFR"] = (decode, params["decoder"], (decoded,))

    def optimizer(state, grads):
        return state.apply_gradients(grads=grads)

    rows = []
    for name, (objective, p, inputs) in parts.items():
        grad = jax.grad(objective, argnums=(0, 1))
        rows.append({"part": name, **_timed(grad, (p, inputs, batch), args.steps)})
    rows.append({"part": "optimizer", **_timed(optimizer, (state, params), args.steps)})
    whole = steps.make_train_step(config, model, 2 * args.steps + 2)
    rows.append({"part": "whole step", **_timed(whole, (state, batch), args.steps)})
    return _with_totals(rows, variant)


def _with_totals(rows: list[dict], variant: str) -> list[dict]:
    """``rows`` (parts, then the whole step) with the sum of the parts before the whole step,
    and every row's variant and share of the whole step."""
    step_ms = rows[-1]["ms"]
    rows.insert(-1, {"part": "sum of parts", "ms": sum(r["ms"] for r in rows[:-1])})
    for row in rows:
        row.update(variant=variant, share=row["ms"] / step_ms)
    return rows


def torchvision_breakdown(args) -> list[dict]:
    """torchvision's FCOS-R18 step (``train_throughput.torchvision_fcos``) broken down as
    ``breakdown`` breaks down ours: each part forward and backward (its parameters and input
    maps) on the inputs the whole step hands it, median of ``args.steps`` calls. Its 'targets +
    L_det' includes torchvision's target assignment, which runs in its step; its optimizer is
    SGD with momentum, its backbone's batch norms frozen (torchvision's defaults). [] where
    torchvision is not installed."""
    fcos = train_throughput.torchvision_fcos(args)
    if fcos is None:
        return []
    torch, model = fcos.torch, fcos.model
    image_list, targets = model.transform(fcos.images, fcos.targets)
    images = image_list.tensors
    with torch.no_grad():  # each part's inputs
        stages = model.backbone.body(images)
        pyramid = model.backbone.fpn(stages)
        levels = list(pyramid.values())
        head_outputs = model.head(levels)
    anchors = model.anchor_generator(image_list, levels)
    anchors_per_level = [level.size(2) * level.size(3) for level in levels]

    def inputs(tree):
        """Fresh leaves of ``tree``'s tensors that take gradients, as a part's inputs do."""
        return {k: v.detach().requires_grad_() for k, v in tree.items()}

    def backward(outputs):
        model.zero_grad(set_to_none=True)
        sum(output.float().sum() for output in outputs.values()).backward()

    def loss():
        backward(model.compute_loss(targets, inputs(head_outputs), anchors, anchors_per_level))

    parts = {
        "backbone": lambda: backward(model.backbone.body(images)),
        "FPN": lambda: backward(model.backbone.fpn(inputs(stages))),
        "head": lambda: backward(model.head(list(inputs(pyramid).values()))),
        "targets + L_det": loss,
        "optimizer": fcos.optimizer.step,  # on the gradients the step before it left
        "whole step": fcos.step,
    }

    def synchronized(call):
        def run():
            call()
            if fcos.device == "cuda":
                torch.cuda.synchronize()

        return run

    rows = []
    for name, call in parts.items():
        if name == "optimizer":
            fcos.step()
        rows.append(
            {"part": name, "ms": train_throughput.median_ms(synchronized(call), args.steps)}
        )
    return _with_totals(rows, "torchvision")


def against_torchvision(rows: list[dict]) -> str:
    """A markdown table of the real step's parts against torchvision's, or '' without both."""
    ours = {r["part"]: r["ms"] for r in rows if r["variant"] == "real"}
    theirs = {r["part"]: r["ms"] for r in rows if r["variant"] == "torchvision"}
    if not ours or not theirs:
        return ""
    lines = ["| part | ours (real) ms | torchvision ms | ours / torchvision |", "|---|---|---|---|"]
    for part in theirs:
        if part in ours:
            ratio = ours[part] / theirs[part]
            lines.append(f"| {part} | {ours[part]:.0f} | {theirs[part]:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        title,
        "",
        "| variant | part | ms | share of step | compile s | GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        compile_s = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        memory = f"{r['memory_gb']:.2f}" if r.get("memory_gb") is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['part']} | {r['ms']:.0f} | {100 * r['share']:.0f} % | "
            f"{compile_s} | {memory} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="fcos", choices=["fcos", "retinanet", "faster_rcnn"])
    parser.add_argument(
        "--matching",
        default="pipeline",
        choices=train_throughput.MATCHING,
        help="where FCOS, RetinaNet and the RPN assign their targets",
    )
    parser.add_argument("--variants", default="real,bnn,dfr")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", default="full", choices=sorted(train_throughput.WIDTHS))
    parser.add_argument("--boxes", type=int, default=100, help="real boxes per image")
    parser.add_argument("--max_boxes", type=int, default=1500, help="box slots per image")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed calls per part (median); 0: compile only"
    )
    parser.add_argument(
        "--torchvision", action="store_true", help="also torchvision's FCOS-R18, where installed"
    )
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.torchvision and (args.family, args.width, args.dtype) != ("fcos", "full", "float32"):
        parser.error("--torchvision compares FCOS at full widths in float32")
    # configure() reads the synthetic data set's fields; nothing is generated or read here.
    setup = types.SimpleNamespace(data_root="/nonexistent", num_images=8, **vars(args))
    rows = [row for v in args.variants.split(",") for row in breakdown(v, setup)]
    if args.torchvision:
        theirs = torchvision_breakdown(setup)
        rows += theirs
        if not theirs:
            print("torchvision: not installed")
    title = (
        f"{args.family}, {args.size} px, batch {args.batch}, width {args.width}, {args.boxes} "
        f"boxes in {args.max_boxes} slots, {args.dtype}, {jax.devices()[0].device_kind}, median "
        f"of {args.steps} calls"
    )
    print(markdown(rows, title))
    comparison = against_torchvision(rows)
    if comparison:
        print(comparison)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setting": title, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
