"""`bench_sharded` refuses sizes the 8-device meshes cannot split, before starting its child
process. Its figures are checked where users get them: `sae-jax bench`'s entry-point test
(`tests/test_cli.py`), on both meshes."""

import pytest

from sae_jax.errors import UserError
from sae_jax.planning.bench_sharded import bench_sharded


@pytest.mark.parametrize("sizes", [{"width": 100}, {"batch_size": 36}, {"k": 0}])
def test_bench_sharded_refuses_sizes_the_meshes_cannot_split(sizes):
    with pytest.raises(UserError, match="sharded bench needs"):
        bench_sharded(**{"d_in": 16, "width": 256, "k": 4, "batch_size": 64, **sizes})
