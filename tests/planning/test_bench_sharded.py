"""`bench_sharded`: the sparse and the dense TopK step timed in one child process with 8
simulated devices (tiny sizes, model:8 only to keep the suite fast: the figures are checked
for shape, not speed)."""

import pytest

from sae_jax.errors import UserError
from sae_jax.planning.bench_sharded import bench_sharded


def test_bench_sharded_times_both_paths():
    result = bench_sharded(d_in=16, width=256, k=4, batch_size=64, steps=1,
                           meshes=("data:1,model:8",))
    assert result["sharded_devices"] == 8
    assert set(result["sharded"]) == {"data:1,model:8"}
    for mesh, row in result["sharded"].items():
        assert row["sparse_tokens_per_s"] > 0 and row["dense_tokens_per_s"] > 0, mesh
        assert row["sparse_over_dense"] == pytest.approx(
            row["sparse_tokens_per_s"] / row["dense_tokens_per_s"])
    model8 = result["sharded"]["data:1,model:8"]
    assert result["sharded_sparse_over_dense_model8"] == model8["sparse_over_dense"]
    assert model8["flops_per_token"] == 2 * 16 * 256 + 10 * 16 * 4 * 8
    assert model8["model_axis_bytes_per_token"] == 4 * (4 * 8 + 3 * 4 + 16)


@pytest.mark.parametrize("sizes", [{"width": 100}, {"batch_size": 36}, {"k": 0}])
def test_bench_sharded_refuses_sizes_the_meshes_cannot_split(sizes):
    with pytest.raises(UserError, match="sharded bench needs"):
        bench_sharded(**{"d_in": 16, "width": 256, "k": 4, "batch_size": 64, **sizes})
