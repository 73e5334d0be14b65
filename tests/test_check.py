"""`sae-jax check`: an intact store, run and sweep pass; each kind of damage is named, one
line per damaged part, with a non-zero exit."""

import json

import numpy as np
from conftest import one_error_line, sae_jax_cli

TINY = ["arch=topk", "width=64", "batch_size=128", "log_every=5", "ckpt_every=5", "--quiet"]


def report(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_check_store_run_and_sweep(synthetic, tmp_path):
    np.save(tmp_path / "x.npy", synthetic[0][:10_000])
    assert sae_jax_cli("import", tmp_path / "x.npy", tmp_path / "D").returncode == 0
    assert sae_jax_cli("train", tmp_path / "D", tmp_path / "R", *TINY, "k=4",
                       "steps=10").returncode == 0
    assert sae_jax_cli("train", tmp_path / "D", tmp_path / "S", *TINY, "steps=5",
                       "k=4,8").returncode == 0
    for path, kind in ((tmp_path / "D", "store"), (tmp_path / "R", "run"),
                       (tmp_path / "S", "sweep")):
        proc = sae_jax_cli("check", path)
        assert proc.returncode == 0, proc.stderr
        assert report(proc) == {"path": str(path), "kind": kind, "ok": True, "problems": []}

    chunk = sorted((tmp_path / "D" / "rows" / "c").rglob("*"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:-7])  # truncated
    (tmp_path / "R" / "checkpoints" / "10" / "params" / "_METADATA").unlink()
    store, run = sae_jax_cli("check", tmp_path / "D"), sae_jax_cli("check", tmp_path / "R")
    assert "1 damaged in store" in one_error_line(store)
    assert "is truncated" in report(store)["problems"][0], report(store)
    assert "1 damaged in run" in one_error_line(run)
    assert report(run)["problems"] == [
        "checkpoint 10: damaged: 1 file(s) missing, e.g. params/_METADATA"]
    assert "neither a store" in one_error_line(sae_jax_cli("check", tmp_path))
