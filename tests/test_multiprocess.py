"""Two training processes on localhost (gloo CPU collectives, 2 devices each) reach the same
parameters as one process with 4 devices over the same global batches; a SIGTERM that reaches
one of them stops both at the same step."""

import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
PREEMPTION_WORKER = pathlib.Path(__file__).with_name("preemption_worker.py")
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


def test_sigterm_to_one_process_stops_every_process_at_one_step():
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(PREEMPTION_WORKER), str(pid), "2", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for pid in range(2)
    ]
    for proc in procs:  # both are looping in step (gloo prints its own lines first)
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        assert line, "a worker ended before its loop began"
    procs[1].send_signal(signal.SIGTERM)  # the scheduler pre-empts one process only
    stops = []
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        stops += [line for line in output.splitlines() if line.startswith("stopped at ")]
    assert len(stops) == 2 and stops[0] == stops[1], stops
