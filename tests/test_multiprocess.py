"""Two training processes on localhost (gloo CPU collectives, 2 devices each) reach the same
parameters as one process with 4 devices over the same global batches."""

import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
STEPS = 3
pytestmark = pytest.mark.slow  # three training processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(num_processes, local_devices, out):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(pid),
                str(num_processes),
                str(local_devices),
                str(port),
                str(STEPS),
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(num_processes)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    return dict(np.load(out))


def test_two_processes_match_one(tmp_path):
    multi = _run(2, 2, tmp_path / "multi.npz")
    single = _run(1, 4, tmp_path / "single.npz")
    assert multi.keys() == single.keys()
    assert np.all(np.isfinite(multi["losses"]))
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-4)
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-4, atol=1e-5, err_msg=name)
