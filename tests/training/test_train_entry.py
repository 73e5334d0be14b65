"""`sae-jax train` through its console entry point, progress bar on, on 8 simulated CPU
devices: every architecture on a data-parallel and a model-parallel mesh runs to its last
step instead of aborting in an all-reduce whose participants never all arrive.

The deadlock (unbounded async run-ahead, `training.lifecycle.StepWindow`) needs XLA:CPU's
client thread pool to be no larger than the device count, as it is on a host with at most 8
cores: the pool has max(PJRT_NPROC or the core count, devices) threads, so `PJRT_NPROC=1`
makes the test mean the same on a many-core host. A deadlocked run aborts about a minute in
(XLA's rendezvous timeout). At this size (batch 1024, 200 steps) the code without the bound
aborted in 6 of these 10 cases in one run, and 5 of 9 repetitions of relu on data:8.
"""

import json

import numpy as np
import pytest
from conftest import sae_jax_cli

from sae_jax.saes import ARCHITECTURES

STEPS = 200


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("entry")
    np.save(tmp / "x.npy", np.random.default_rng(0).standard_normal((65_536, 64), np.float32))
    assert sae_jax_cli("import", tmp / "x.npy", tmp / "store").returncode == 0
    return tmp / "store"


@pytest.mark.entry
@pytest.mark.parametrize("mesh", ["data:8", "model:8"])
# The crosscoders run the plain relu/topk/batchtopk step (`saes.crosscoder`): the same
# collectives, so ~35 s each here would test nothing new; tests/analysis/test_diff.py trains
# one through this entry point on a two-source store.
@pytest.mark.parametrize("arch", sorted(a for a, arch in ARCHITECTURES.items()
                                        if not arch.crosscoder))
def test_train_finishes_on_8_devices_with_progress_bar(arch, mesh, store, tmp_path):
    out = sae_jax_cli("train", store, tmp_path / "run", f"arch={arch}", "width=512",
                      "batch_size=1024", "k=8", f"steps={STEPS}", f"mesh={mesh}",
                      env={"PJRT_NPROC": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["step"] == STEPS
    assert f"{STEPS}/{STEPS}" in out.stderr  # the progress bar was drawn
