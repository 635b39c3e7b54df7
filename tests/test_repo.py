"""Repository contract: the README gives the test command CI runs, and the CLI documents itself."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_gives_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r'^TEST_COMMAND="(.+)"$', ci, re.M).group(1)
    assert command in (ROOT / "README.md").read_text()


def test_main_help_documents_its_flags():
    out = subprocess.run(
        [sys.executable, "-m", "dfrdet_jax.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for flag in ("--config", "--workdir", "--mode", "train", "eval", "predict"):
        assert flag in out
