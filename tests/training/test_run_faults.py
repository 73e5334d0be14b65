"""Faults around a training run, driven through the `sae-jax` entry point as users run it
(8 simulated devices, progress bar on): a second writer, broken params, bad config values,
a RUN_DIR that is a file or read-only, a batch larger than the data, and a log that must
not repeat steps after a resume. Nothing saved may be lost, nothing damaged used."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAE_JAX, one_error_line, sae_jax_cli

import sae_jax
from sae_jax.errors import UserError
from sae_jax.training.runlock import LOCK_FILE, RunLock

TINY = ["arch=topk", "width=64", "k=4", "batch_size=128", "log_every=5", "ckpt_every=5"]




def test_a_second_train_on_the_same_run_is_refused_naming_the_holder(synthetic_store,
                                                                       tmp_path):
    run = tmp_path / "run"
    with RunLock(run):  # another process's lease, as it is on disk
        holder = json.loads((run / LOCK_FILE).read_text())
        proc = sae_jax_cli("train", synthetic_store, run, *TINY, "steps=5")
    line = one_error_line(proc)
    assert f"pid {holder['pid']}" in line and socket.gethostname() in line
    assert not (run / "checkpoints").exists()  # the refused process wrote nothing


def test_two_real_train_processes_one_refused(synthetic_store, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    first = subprocess.Popen([str(SAE_JAX), "train", str(synthetic_store), str(run), *TINY,
                              "steps=100000", "ckpt_every=100000"], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / LOCK_FILE).exists() and time.time() < deadline:
            time.sleep(0.2)
        second = sae_jax_cli("train", synthetic_store, run, *TINY, "steps=100000",
                             "ckpt_every=100000")
        assert f"pid {first.pid}" in one_error_line(second)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143  # SIGTERM: saved and stopped, resumable
    assert not (run / LOCK_FILE).exists()  # released
    assert sae_jax.load(run).step > 0


def test_a_dead_holders_lease_is_taken_over(synthetic_store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                             "token": "x", "expires": time.time() + 3600}))
    proc = sae_jax_cli("train", synthetic_store, run, *TINY, "steps=5")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_diverged_params_are_never_checkpointed(synthetic_store, tmp_path):
    """lr=1e30 leaves finite but absurd (±1e30) weights after one step: not saved."""
    proc = sae_jax_cli("train", synthetic_store, tmp_path / "run", *TINY, "arch=relu",
                       "lr=1e30", "steps=1")
    assert "updated params are not finite" in one_error_line(proc)
    with pytest.raises(UserError, match="no checkpoint"):
        sae_jax.load(tmp_path / "run")


@pytest.mark.parametrize("bad, message", [
    ("bandwidth=0", "bandwidth must be > 0"),
    ("threshold_init=0", "threshold_init must be > 0"),
    ("init_norm=0", "init_norm must be > 0"),
    ("width=1e30", "width must be > 0 and < 2^31"),
    ("lr=inf", "lr must be finite"),
])
def test_bad_config_values_are_one_line_errors(synthetic_store, tmp_path, bad, message):
    proc = sae_jax_cli("train", synthetic_store, tmp_path / "run", *TINY, "arch=jumprelu",
                       "steps=5", bad)
    assert message in one_error_line(proc)


def test_a_run_that_failed_before_its_first_save_can_be_corrected(synthetic_store, tmp_path):
    """A record left by a run with no checkpoint does not block a corrected rerun."""
    run = tmp_path / "run"
    proc = sae_jax_cli("train", synthetic_store, run, *TINY, "arch=relu", "lr=1e30",
                       "steps=1")
    assert proc.returncode == 2 and (run / "config.json").exists()
    proc = sae_jax_cli("train", synthetic_store, run, *TINY, "arch=relu", "steps=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").open()] == [5]


def test_run_dir_that_is_a_file_or_read_only(synthetic_store, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "the run " + str(tmp_path / "file") + " is a file" in one_error_line(
        sae_jax_cli("train", synthetic_store, tmp_path / "file", *TINY, "steps=5"))
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        read_only = Path("/sys/sae-jax-test-run")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        read_only = tmp_path / "ro" / "run"
    line = one_error_line(sae_jax_cli("train", synthetic_store, read_only, *TINY, "steps=5"))
    assert f"cannot write the run to {read_only}" in line
    # eval refuses before computing what it could not save
    run = tmp_path / "run"
    assert sae_jax_cli("train", synthetic_store, run, *TINY, "steps=5").returncode == 0
    (run / "eval").write_text("in the way")
    assert "the eval results" in one_error_line(sae_jax_cli("eval", run, synthetic_store))


def test_batch_larger_than_the_training_rows(synthetic_store, tmp_path):
    proc = sae_jax_cli("train", synthetic_store, tmp_path / "run", "arch=topk", "width=64",
                       "k=4", "batch_size=65536", "steps=5")
    assert "larger than the" in one_error_line(proc)


def test_resume_does_not_repeat_logged_steps(synthetic_store, tmp_path):
    """A run killed after logging steps its last checkpoint does not hold logs them once."""
    run = tmp_path / "run"
    sae_jax_cli("train", synthetic_store, run, *TINY, "steps=10", "ckpt_every=5")
    with (run / "metrics.jsonl").open("a") as log:  # what a kill after step 13 leaves
        for step in (11, 12, 13):
            log.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
        log.write('{"step": 14, "lo')  # and a torn last line
    proc = sae_jax_cli("train", synthetic_store, run, *TINY, "steps=15", "ckpt_every=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").open()]
    assert steps == [5, 10, 15]


def test_training_logs_the_compiled_steps_memory(synthetic_store, tmp_path):
    proc = sae_jax_cli("train", synthetic_store, tmp_path / "run", *TINY, "steps=5",
                       "mesh=data:2,model:4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train step compiled; per device:" in proc.stderr and "MiB temporaries" in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB filesystem of its own (tmpfs; mounting one needs root, which CI is)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(synthetic_store, small_disk):
    """Each checkpoint of this run is 12.3 MiB: the second one cannot fit."""
    run = small_disk / "run"
    proc = sae_jax_cli("train", synthetic_store, run, "arch=relu", "width=16384",
                       "batch_size=128", "steps=10", "ckpt_every=5", "log_every=5",
                       "keep_checkpoints=5")
    line = one_error_line(proc)
    assert "no space left on device for checkpoint 10" in line, line
    assert "checkpoint 5 is kept" in line
    assert sae_jax.load(run).step == 5  # the checkpoint saved before the disk filled


def test_resuming_on_another_store_of_the_same_width_is_refused(synthetic, tmp_path):
    """Two stores of the same width: the run records its store's id and refuses the other."""
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", synthetic[0][:8192])
        assert sae_jax_cli("import", tmp_path / f"{name}.npy", tmp_path / name).returncode == 0
    run = tmp_path / "run"
    assert sae_jax_cli("train", tmp_path / "a", run, *TINY, "steps=5").returncode == 0
    store_id = json.loads((tmp_path / "a" / "meta.json").read_text())["id"]
    assert json.loads((run / "config.json").read_text())["store_id"] == store_id
    line = one_error_line(sae_jax_cli("train", tmp_path / "b", run, *TINY, "steps=10"))
    assert f"was trained on store {store_id}" in line and "same width" in line
    assert sae_jax.load(run).step == 5  # untouched
