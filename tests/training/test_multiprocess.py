"""Multi-host training, for real: two CPU processes on localhost with 4 devices each form
one 8-device mesh, train on the same store, and end with the same params as one process
with 8 devices and the same global batches; and the two-process run resumes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import sae_jax

ARGS = ["arch=topk", "width=64", "k=4", "batch_size=128", "ckpt_every=10", "log_every=10",
        "mesh=data:2,model:4", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int) -> dict:
    env = os.environ.copy()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    return env


def _train(store, run, steps: int, processes: int) -> None:
    cmd = [sys.executable, "-m", "sae_jax", "train", str(store), str(run), f"steps={steps}",
           *ARGS]
    if processes == 1:
        out = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return
    port = _free_port()
    procs = [subprocess.Popen(
        [*cmd, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)], env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    # both print the same final metrics (but their own timings)
    finals = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    for final in finals:
        final.pop("tokens_per_s")
    assert finals[0] == finals[1]


def _params(run) -> dict:
    return {k: np.asarray(v) for k, v in sae_jax.load(run).params.items()}


@pytest.mark.entry
def test_two_processes_equal_one_and_resume(synthetic_store, tmp_path):
    _train(synthetic_store, tmp_path / "single", 20, processes=1)
    _train(synthetic_store, tmp_path / "multi", 20, processes=2)
    single, multi = _params(tmp_path / "single"), _params(tmp_path / "multi")
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    lines = (tmp_path / "multi/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written once, by process 0

    # Resume both runs for 10 more steps: still the same.
    _train(synthetic_store, tmp_path / "single", 30, processes=1)
    _train(synthetic_store, tmp_path / "multi", 30, processes=2)
    assert sae_jax.load(tmp_path / "multi").step == 30
    single, multi = _params(tmp_path / "single"), _params(tmp_path / "multi")
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
