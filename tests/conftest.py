"""Every test runs on 8 simulated CPU devices, so sharded code paths are exercised.

XLA_FLAGS must be set before jax is imported anywhere.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sae_jax.data.synthetic import sparse_dictionary_data  # noqa: E402

MESHES = ["data:1,model:1", "data:8,model:1", "data:2,model:4", "data:1,model:8"]


def mesh_devices(spec: str) -> list:
    """The first n devices, n = the product of the mesh spec's sizes."""
    sizes = [int(p.split(":")[1]) for p in spec.split(",")]
    return jax.devices()[: int(np.prod(sizes))]


@pytest.fixture(scope="session")
def synthetic():
    """(rows, atoms): 40k rows of d=32 built from 64 known sparse atoms."""
    return sparse_dictionary_data(40_000, 32, 64, active=3.0, seed=0)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory, synthetic):
    """A store directory holding the `synthetic` rows."""
    from sae_jax.data.importers import import_activations

    tmp = tmp_path_factory.mktemp("synthetic")
    np.save(tmp / "x.npy", synthetic[0])
    return import_activations(tmp / "x.npy", tmp / "store").path


@pytest.fixture(scope="session")
def params():
    """all-MiniLM-L6-v2's weights, loaded once per test session."""
    from sae_jax.lm import minilm

    return minilm.load_params()


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's tokenizer, loaded once per test session."""
    from sae_jax.lm import minilm

    return minilm.load_tokenizer()


def batch_at(rows: np.ndarray, cfg, step: int) -> np.ndarray:
    """The training batch of `step` for in-memory rows, exactly as `train` would load it."""
    from sae_jax.data.loader import ArraySpan, BatchSource

    return BatchSource(ArraySpan(rows), cfg.batch_size, cfg.seed, cfg.steps)[step]
