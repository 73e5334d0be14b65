"""Matryoshka BatchTopK: every nested prefix of the dictionary reconstructs on its own."""

import jax
import numpy as np
import pytest

import sae_jax
from sae_jax.config import make_config
from sae_jax.errors import UserError
from sae_jax.saes import matryoshka
from sae_jax.training.train import train

LEVELS = (8, 32, 128)


def _prefix_fvu(sae, x) -> list[float]:
    """FVU of the reconstruction from latents [0, m) only, for each level m."""
    f = np.asarray(sae.encode(x))
    W, b = np.asarray(sae.params["W_dec"]), np.asarray(sae.params["b_dec"])
    xs = x * sae.input_scale
    var = np.sum((xs - xs.mean(0)) ** 2)
    return [float(np.sum((f[:, :m] @ W[:m] + b - xs) ** 2) / var) for m in LEVELS]


@pytest.fixture(scope="module")
def runs(synthetic_store, tmp_path_factory):
    out = {}
    for arch in ("matryoshka", "batchtopk"):
        out[arch] = tmp_path_factory.mktemp(arch) / "run"
        cfg = make_config(arch=arch, width=128, k=4, steps=800, batch_size=256, lr=3e-3,
                          matryoshka_widths=LEVELS[:-1] if arch == "matryoshka" else None)
        train(cfg, synthetic_store, out[arch], progress=False, devices=jax.devices()[:1])
    return out


def test_every_prefix_reconstructs_and_loss_falls_with_width(runs, synthetic):
    x = synthetic[0][-2000:]
    fvu = _prefix_fvu(sae_jax.load(runs["matryoshka"]), x)
    assert fvu[0] > fvu[1] > fvu[2]
    assert fvu[0] < 0.9 and fvu[2] < 0.3  # even 8 of 128 latents explain a real share
    # A plain BatchTopK SAE spreads its features anywhere: its first 8 latents explain far less.
    assert _prefix_fvu(sae_jax.load(runs["batchtopk"]), x)[0] > fvu[0] + 0.05


def test_prefix_losses_are_logged(runs):
    import json

    last = json.loads((runs["matryoshka"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["mse_prefix_8"] > last["mse_prefix_32"] > last["mse"]


def test_levels_default_and_validation():
    assert matryoshka.levels(make_config(arch="matryoshka", width=1024)) == (64, 256, 1024)
    assert matryoshka.levels(make_config(arch="matryoshka", width=64,
                                         matryoshka_widths=(16, 64))) == (16, 64)
    assert make_config(["arch=matryoshka", "matryoshka_widths=8,32"]).matryoshka_widths == (8, 32)
    for bad in ((32, 8), (0, 8), (8, 8), (8, 2048)):
        with pytest.raises(UserError, match="strictly increasing"):
            make_config(arch="matryoshka", width=64, matryoshka_widths=bad)
