"""Multi-host on JAX's own runtime, on CPU: two local processes with 4 devices each (gloo
collectives) train as one process with 8 devices, and a two-process run that stops and
resumes equals the uninterrupted one."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from test_loop import tiny_config

from scott_jax import loop
from scott_jax.checkpoint import load_state_tree
from scott_jax.writers import read_metrics

TESTS = Path(__file__).parent

WORKER = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace(
        "device_count=8", "device_count=4")
    sys.path.insert(0, {tests!r})
    from scott_jax import distributed
    distributed.initialize("localhost:{port}", num_processes=2, process_id=int(sys.argv[1]))
    from test_loop import tiny_config
    from scott_jax import loop
    outcome = loop.train_and_evaluate(tiny_config(), {workdir!r}, stop_at_step={stop})
    assert int(outcome.state.step) == {stop}
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(workdir: Path, stop: int) -> None:
    script = WORKER.format(tests=str(TESTS), port=free_port(), workdir=str(workdir), stop=stop)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_exactly(tmp_path):
    loop.train_and_evaluate(tiny_config(), tmp_path / "one", stop_at_step=4)
    run_two_processes(tmp_path / "two", stop=2)
    run_two_processes(tmp_path / "two", stop=4)  # resumes from the two-process checkpoint

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], 1e-5)
    params_one = load_state_tree(tmp_path / "one" / "checkpoints", 4)["params"]
    params_two = load_state_tree(tmp_path / "two" / "checkpoints", 4)["params"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_two, params_one
    )
