"""Equal-shape sweep members as one vmapped step (`--batch-members`): which members batch,
the stacked sharding, equality with the unbatched sweep (float32 rounding, not bitwise) on a
sharded mesh with a member that diverges and stops alone, and the bench of it."""

import argparse
import shutil

import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sae_jax
from sae_jax.config import make_config
from sae_jax.errors import UserError
from sae_jax.mesh import make_mesh
from sae_jax.training import command
from sae_jax.training.stacked import BATCHABLE_KEYS, batch_groups, stacked_sharding
from sae_jax.training.sweep import run_sweep_command, train_sweep


def test_members_batch_when_they_differ_only_in_seed_lr_or_coefficient():
    assert BATCHABLE_KEYS == ("seed", "lr", "sparsity_coeff")
    cfgs = [make_config(arch="relu", width=64, seed=0, data_seed=0),
            make_config(arch="relu", width=128, seed=0, data_seed=0),  # another shape
            make_config(arch="relu", width=64, seed=1, data_seed=0, lr=3e-3, sparsity_coeff=2.0),
            make_config(arch="relu", width=64, seed=2, data_seed=0, beta1=0.8)]  # not batchable
    assert batch_groups(cfgs) == [[0, 2], [1], [3]]
    topk = [make_config(width=64, k=4), make_config(width=64, k=8)]  # top_k needs static k
    assert batch_groups(topk) == [[0], [1]]
    assert batch_groups(cfgs[:1] * 2, scales=[1.0, 2.0]) == [[0], [1]]
    mesh = make_mesh("data:2,model:4")
    assert stacked_sharding(NamedSharding(mesh, P(None, "model"))).spec == P(None, None,
                                                                             "model")


def test_batch_members_needs_a_sweep(synthetic_store, tmp_path):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([synthetic_store, str(tmp_path / "run"), "width=64",
                              "--batch-members"])
    with pytest.raises(UserError, match="--batch-members batches the members of a sweep"):
        command.run(args)


def test_batched_sweep_equals_unbatched_on_a_sharded_mesh(synthetic_store, tmp_path):
    """Dictionary split 4 ways, members seed x lr in one vmapped group: the lr=1e30 members
    stop alone with nothing saved (the group is restacked without them) and the healthy
    ones hold the unbatched sweep's params (bitwise separate runs') to float32 rounding,
    also after resuming them, batched, from step 2."""
    base = ["arch=topk", "width=64", "k=4", "steps=4", "batch_size=128", "log_every=2",
            "ckpt_every=2", "mesh=data:2,model:4", "seed=0,1"]
    with pytest.raises(UserError, match=r"2 of 4 members stopped: seed=0,lr=1e\+30"):
        run_sweep_command(synthetic_store, str(tmp_path / "batched"), base + ["lr=1e-3,1e30"],
                          progress=False, batch_members=True)
    run_sweep_command(synthetic_store, str(tmp_path / "alone"), base + ["lr=1e-3"],
                      progress=False)
    healthy = [f"seed={seed},lr=0.001" for seed in (0, 1)]
    for name in healthy:  # resume the batched members from step 2: the same end
        shutil.rmtree(tmp_path / "batched" / name / "checkpoints" / "4")
    train_sweep([make_config(base[:-1] + [f"seed={s}", "data_seed=0", "lr=1e-3"])
                 for s in (0, 1)], synthetic_store, tmp_path / "batched", progress=False,
                names=healthy, batch_members=True)
    for seed in (0, 1):
        alone = sae_jax.load(tmp_path / "alone" / f"seed={seed}")
        batched = sae_jax.load(tmp_path / "batched" / f"seed={seed},lr=0.001")
        assert alone.step == batched.step == 4
        for key, value in alone.params.items():
            np.testing.assert_allclose(np.asarray(batched.params[key]), np.asarray(value),
                                       rtol=1e-5, atol=1e-6, err_msg=f"seed={seed} {key}")
        saved = (tmp_path / "batched" / f"seed={seed},lr=1e+30" / "checkpoints").iterdir()
        assert [p.name for p in saved if p.name.isdigit()] == []
