"""The command line's errors: one clear message (what, where, what to do), no tracebacks."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = "--config=configs/fcos_r18.py:synthetic,real,smoke"


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            [CONFIG, "--config.train.bach_size=3"],
            'Config error: \'bach_size\'\nDid you mean "batch_size" instead of "bach_size"? '
            "(in --config.train.bach_size=3)",
        ),
        (
            ["--config=configs/fcos_r18.py:aitod,real,demo"],
            "'demo' and 'smoke' size a run for the synthetic data set",
        ),
        ([CONFIG, "--config.model.fpn_width=abc"], "invalid literal for int()"),
        ([CONFIG, "--workdir={file}/run"], "--workdir {file}/run cannot be written: "),
    ],
    ids=["misspelt field", "demo of aitod", "bad value", "unwritable workdir"],
)
def test_errors_are_one_message(tmp_path, args, expected):
    file = tmp_path / "a_file"
    file.write_text("")
    args = [a.format(file=file) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={tmp_path / 'run'}")
    result = subprocess.run(
        [sys.executable, "-m", "dfrdet_jax.main", *args], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0
    assert expected.format(file=file) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # failed before any work
