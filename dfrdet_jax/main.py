r"""Command line of dfrdet_jax: train, evaluate or run a detector described by a config file.

Usage::

  python -m dfrdet_jax.main --config configs/fcos_r18.py:synthetic,dfr,demo \
      --workdir /tmp/fcos_dfr --mode train

  # Any config field can be overridden on the command line; a typo is an error:
  python -m dfrdet_jax.main --config configs/fcos_r18.py:aitod,dfr \
      --config.optimizer.base_learning_rate=0.01 --workdir /tmp/run --mode eval

Modes:
  train    trains (resuming from the latest checkpoint in --workdir), evaluates periodically;
           a --workdir of another config is an error (its config.json names the fields).
  eval     scores the latest checkpoint in --workdir with the tiny-object metrics (an error
           when it has none that reads: never a freshly initialised model).
  predict  runs the latest checkpoint on the images of --input (a folder or one image), of any
           size: tiles at the model's resolution, merged (config.predict); writes COCO results
           JSON and drawn boxes into --workdir/predictions.
  complexity  the model's size (MB) and OPs as the paper counts them, at data.image_size;
           needs no checkpoint, and --workdir only to write complexity.json there.
  viz      pictures of the latest checkpoint on config.eval.split into --workdir/figures:
           true/false positives and misses by size, P2 saliency (beside another run's with
           config.viz.compare_workdir), the DFR reconstruction, PR and training curves.
  export   packs the latest checkpoint for deployment into --workdir/export: 1-bit kernels as
           bits, the rest float32, no training-only decoder (see dfrdet_jax/export.py).
"""

from __future__ import annotations

import ast
import importlib
import logging as std_logging
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from dfrdet_jax import distributed
from dfrdet_jax.choices import check_choice

# mode -> (module, function); imported lazily so `--help` stays fast.
MODES = {
    "train": ("dfrdet_jax.train", "train_and_evaluate"),
    "eval": ("dfrdet_jax.evaluate", "evaluate_checkpoint"),
    "predict": ("dfrdet_jax.predict", "predict_folder"),
    "complexity": ("dfrdet_jax.complexity", "model_complexity"),
    "export": ("dfrdet_jax.export", "export_checkpoint"),
    "viz": ("dfrdet_jax.figures", "make_figures"),
}

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file and its argument, e.g. configs/fcos_r18.py:synthetic,dfr. Fields can be "
    "overridden with --config.<field>=<value>; an unknown field is an error.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics (JSONL) and predictions."
)
_MODE = flags.DEFINE_enum("mode", "train", sorted(MODES), "What to do: " + ", ".join(sorted(MODES)))
_INPUT = flags.DEFINE_string(
    "input", None, "predict mode: a folder of images (or a single image) to run the detector on."
)


class _QuietLibraries(std_logging.Filter):
    """Drops the per-save INFO chatter of orbax and grain; their warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/"))
        return record.levelno >= std_logging.WARNING or not noisy


def run(mode: str, config, workdir: str, **kwargs):
    """Runs ``mode`` with ``config`` in ``workdir``; returns what the mode's function returns:
    train (final state, last evaluation's metrics), eval metrics, the predict or export output
    folder, complexity counts."""
    check_choice("mode", mode, sorted(MODES))
    module_name, function_name = MODES[mode]
    function = getattr(importlib.import_module(module_name), function_name)
    return function(config, workdir, **kwargs)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; ``--help``/``-h`` prints this module's usage and exits with status 0."""
    if any(arg in ("-h", "--help", "--helpshort") for arg in argv[1:]):
        print(__doc__)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "Traceback (most recent call last)" in message:  # the config file raised
            lines = [line for line in message.splitlines() if line.strip()]
            message = f"{lines[0]} {lines[-1]}"
        sys.stderr.write(f"Flag error: {message}\nPass --help for usage.\n")
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # Raised by the config file (its argument) or a --config.* override while the flags
        # are parsed: the message, without the three chained tracebacks of ml_collections.
        sys.stderr.write(f"Config error: {config_error_message(error, argv)}\n")
        sys.exit(2)


def config_error_message(error: Exception, argv: list[str]) -> str:
    """``error``'s message unquoted (ml_collections wraps a KeyError's repr in an
    AttributeError), with the override that names the offending field, if one does."""
    message = str(error)
    while len(message) > 1 and message[0] in "'\"" and message[-1] == message[0]:
        try:
            message = ast.literal_eval(message)
        except (SyntaxError, ValueError):
            break
    field = message.split("\n")[0].strip("'\"")
    overrides = [a for a in argv if a.startswith("--config.") and f".{field}" in a.split("=")[0]]
    return message + (f" (in {overrides[0]})" if overrides else "")


def check_writable(workdir: str) -> None:
    """UsageError naming ``workdir`` unless it is (or can be made) a folder this process can
    write, checked before any work starts."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise app.UsageError(f"--workdir {workdir} cannot be written: {error}") from error


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError(
            "--config is required, e.g. --config configs/fcos_r18.py:synthetic,dfr"
        )
    if _WORKDIR.value is None and _MODE.value != "complexity":
        raise app.UsageError("--workdir is required")
    kwargs = {}
    if _MODE.value == "predict":
        if _INPUT.value is None:
            raise app.UsageError("--mode predict needs --input (a folder of images)")
        kwargs["input_path"] = _INPUT.value
    if _WORKDIR.value is not None:
        check_writable(_WORKDIR.value)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    distributed.initialize(_CONFIG.value)
    logging.info("mode=%s workdir=%s", _MODE.value, _WORKDIR.value)
    run(_MODE.value, _CONFIG.value, _WORKDIR.value, **kwargs)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
