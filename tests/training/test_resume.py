"""Preemption and resume: kill -9 and rerun ends bitwise equal to an uninterrupted run,
SIGTERM saves a checkpoint, a corrupt latest checkpoint falls back to the previous one,
and checkpoints restore onto another mesh."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sae_jax
from sae_jax.cli import PREEMPTED_EXIT
from sae_jax.config import make_config
from sae_jax.mesh import make_mesh
from sae_jax.rundir import read_run
from sae_jax.training import checkpoint
from sae_jax.training.step import make_optimizer, state_shardings
from sae_jax.training.train import train

TRAIN_ARGS = ["arch=topk", "width=64", "k=4", "steps=400", "batch_size=256", "ckpt_every=25",
              "log_every=25", "mesh=data:2,model:4", "--quiet"]


def _train_cmd(store, run):
    return [sys.executable, "-m", "sae_jax", "train", str(store), str(run), *TRAIN_ARGS]


def _params(run) -> dict:
    return {k: np.asarray(v) for k, v in sae_jax.load(run).params.items()}


def _wait_for_checkpoint(run: Path, proc, minimum: int = 50, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpts = run / "checkpoints"
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= minimum:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(synthetic_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "uninterrupted"
    out = subprocess.run(_train_cmd(synthetic_store, run), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return _params(run)


@pytest.mark.entry
def test_kill_9_then_rerun_is_bitwise_identical(synthetic_store, tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(synthetic_store, run), stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sae_jax.load(run).step < 400
    out = subprocess.run(_train_cmd(synthetic_store, run), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resumed = _params(run)
    for name, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


@pytest.mark.entry
def test_sigterm_saves_then_resumes(synthetic_store, tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(synthetic_store, run), stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, proc, minimum=25)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert "SIGTERM at step" in err and "rerun the same command to resume" in err
    stopped_at = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert sae_jax.load(run).step == stopped_at  # saved exactly where it stopped
    out = subprocess.run(_train_cmd(synthetic_store, run), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name, value in _params(run).items():
        np.testing.assert_array_equal(value, uninterrupted[name], err_msg=name)


def test_corrupt_latest_checkpoint_falls_back(synthetic_store, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = make_config(arch="topk", width=64, k=4, steps=20, batch_size=128, ckpt_every=10,
                      keep_checkpoints=3)
    train(cfg, synthetic_store, run, progress=False)
    for f in (run / "checkpoints/20").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)  # truncate every data file of the latest checkpoint
    longer = make_config(**{**cfg.to_dict(), "steps": 30})
    train(longer, synthetic_store, run, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint 20 is damaged" in err and "trying the previous one" in err
    assert (run / "corrupt_checkpoints/20").is_dir()  # moved aside, not deleted
    assert sae_jax.load(run).step == 30


def test_restore_onto_a_different_mesh(synthetic_store, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(arch="jumprelu", width=64, steps=10, batch_size=128, mesh="data:2,model:4")
    train(cfg, synthetic_store, run, progress=False)
    saved = _params(run)
    mesh = make_mesh("data:8,model:1")
    info = read_run(run)
    shapes, shardings = state_shardings(info.config, info.d_in, make_optimizer(info.config), mesh)
    mngr = checkpoint.manager(run)
    state = checkpoint.restore(mngr, checkpoint.abstract_with_shardings(shapes, shardings))
    mngr.close()
    assert state.params["W_enc"].sharding.mesh.shape == {"data": 8, "model": 1}
    for name, value in saved.items():
        np.testing.assert_array_equal(np.asarray(state.params[name]), value)
    # and training continues on the new mesh
    more = make_config(**{**cfg.to_dict(), "steps": 15, "mesh": "data:8,model:1"})
    train(more, synthetic_store, run, progress=False)
    assert sae_jax.load(run).step == 15


def test_tensorboard_events_are_written(synthetic_store, tmp_path):
    cfg = make_config(arch="topk", width=64, k=4, steps=10, batch_size=128, log_every=5)
    train(cfg, synthetic_store, tmp_path / "run", progress=False)
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboardX.proto import event_pb2  # read back: the scalars are really there

    data = events[0].read_bytes()
    tags, pos = set(), 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        tags |= {v.tag for v in event.summary.value}
        pos += 12 + length + 4
    assert {"train/loss", "train/l0", "train/fvu", "train/lr", "train/tokens_per_s"} <= tags

