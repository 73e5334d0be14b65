"""Checkpoints never lose a run: params are their own item, a damaged step is quarantined
(moved aside, never deleted) only on proof (digest mismatch, undecodable, NaN/Inf) and the
previous one used, transient read errors are retried, and a run never restarts from 0 while
any checkpoint exists. Real Orbax saves on 8 simulated devices; faults are real file damage,
except the transient read error, injected into Orbax's restore."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import sae_jax
from sae_jax.config import make_config
from sae_jax.errors import UserError
from sae_jax.mesh import make_mesh
from sae_jax.training import checkpoint
from sae_jax.training.digest import DIGEST_FILE, check_digest, write_digest
from sae_jax.training.step import init_state, make_optimizer, state_shardings

CFG = make_config(arch="topk", width=64, k=4, keep_checkpoints=5)
D_IN = 16


@pytest.fixture(scope="module")
def target():
    """(abstract train state on a 2x4 mesh, a fresh state with those shardings)."""
    tx = make_optimizer(CFG)
    shapes, shardings = state_shardings(CFG, D_IN, tx, make_mesh("data:2,model:4"))
    state = jax.jit(lambda k: init_state(k, CFG, D_IN, None, tx), out_shardings=shardings)(
        jax.random.key(0))
    return checkpoint.abstract_with_shardings(shapes, shardings), state


def _state_at(state, step: int):
    """A state recognisable by its step: step s has W_enc + s."""
    params = {**state.params, "W_enc": state.params["W_enc"] + step}
    return state.replace(step=jnp.int32(step), params=params)


def _saved_run(tmp_path, state, steps=(10, 20)) -> Path:
    run = tmp_path / "run"
    mngr = checkpoint.manager(run, CFG)
    for step in steps:
        checkpoint.save(mngr, step, _state_at(state, step))
    mngr.close()
    return run


def _restore(run, abstract):
    mngr = checkpoint.manager(run, CFG)
    try:
        return checkpoint.restore_latest_good(mngr, abstract)
    finally:
        mngr.close()


def _assert_is_step(state, fresh, step: int):
    assert int(state.step) == step
    np.testing.assert_array_equal(np.asarray(state.params["W_enc"]),
                                  np.asarray(fresh.params["W_enc"]) + step)


def _quarantined(run) -> list[str]:
    q = run / "corrupt_checkpoints"
    return sorted(p.name for p in q.iterdir()) if q.exists() else []


def _item(run, step: int, name: str) -> Path:
    """An Orbax item of a step (`default`, the whole state, in the layout before params had
    their own item: so that these tests also run, and fail, on the code before the fix)."""
    path = run / "checkpoints" / str(step) / name
    return path if path.exists() else path.with_name("default")


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


def test_params_are_their_own_item(tmp_path, target):
    abstract, state = target
    run = _saved_run(tmp_path, state)
    step_dir = run / "checkpoints/20"
    assert {"params", "train_state", DIGEST_FILE} <= {p.name for p in step_dir.iterdir()}
    restored = _restore(run, abstract)  # the whole train state, onto the mesh asked for
    _assert_is_step(restored, state, 20)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored.params["W_enc"].sharding == abstract.params["W_enc"].sharding
    # params alone read back (and verify) without the optimizer state
    shutil.rmtree(step_dir / "train_state")
    mngr = checkpoint.manager(run)
    params, step = checkpoint.read_params(mngr, abstract.params)
    mngr.close()
    assert step == 20
    np.testing.assert_array_equal(np.asarray(params["W_enc"]),
                                  np.asarray(state.params["W_enc"]) + 20)


def test_deleted_item_of_newest_falls_back_to_the_previous_step(tmp_path, target, capsys):
    abstract, state = target
    run = _saved_run(tmp_path, state, steps=(10, 20, 30))
    shutil.rmtree(_item(run, 30, "params"))
    shutil.rmtree(_item(run, 20, "train_state"))  # every older step is tried the same way
    _assert_is_step(_restore(run, abstract), state, 10)
    assert _quarantined(run) == ["20", "30"]  # moved aside with their files, not deleted
    assert (run / "corrupt_checkpoints/30/train_state").is_dir()
    err = capsys.readouterr().err
    assert "checkpoint 30 is damaged" in err and "resuming from checkpoint 10" in err
    lines = checkpoint.verify_checkpoints(run)
    assert len(lines) == 2
    assert re.fullmatch(r"corrupt_checkpoints/20: quarantined: \d+ file\(s\) missing, e\.g\. "
                        r"train_state/_METADATA", lines[0])
    assert lines[1].startswith("corrupt_checkpoints/30: quarantined: ")


def test_flipped_byte_is_detected_and_the_previous_step_used(tmp_path, target):
    abstract, state = target
    run = _saved_run(tmp_path, state)
    data = _largest_data_file(run / "checkpoints/20")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    _assert_is_step(_restore(run, abstract), state, 10)  # not 20 with a garbage value
    assert _quarantined(run) == ["20"]
    lines = checkpoint.verify_checkpoints(run)
    assert len(lines) == 1
    assert lines[0].startswith("corrupt_checkpoints/20: quarantined: 1 file(s) changed, e.g. ")


def test_never_starts_over_while_any_checkpoint_exists(tmp_path, target):
    abstract, state = target
    run = _saved_run(tmp_path, state)
    for step in (10, 20):
        shutil.rmtree(_item(run, step, "params"))
    with pytest.raises(UserError, match="refusing to start over from step 0") as err:
        _restore(run, abstract)
    assert "\n" not in str(err.value)
    # only quarantined ones left: still refused, and nothing is deleted
    with pytest.raises(UserError, match="refusing to start over from step 0"):
        _restore(run, abstract)
    assert _quarantined(run) == ["10", "20"]
    assert _restore(tmp_path / "new_run", abstract) is None  # a new run starts at 0


def test_undigested_step_is_used_if_it_decodes_and_is_finite(tmp_path, target):
    abstract, state = target
    run = _saved_run(tmp_path, state)
    (run / "checkpoints/20" / DIGEST_FILE).unlink()  # as if killed between commit and digest
    assert checkpoint.verify_checkpoints(run) == [
        "checkpoint 20: no digest, cannot be verified (saved before sae_jax wrote digests, or "
        "the process stopped before it did)"]
    _assert_is_step(_restore(run, abstract), state, 20)
    # an undigested step holding Inf (a flipped exponent bit) is damage
    mngr = checkpoint.manager(run, CFG)
    bad = _state_at(state, 30)
    bad = bad.replace(params={**bad.params, "b_dec": bad.params["b_dec"].at[3].set(jnp.inf)})
    checkpoint.save(mngr, 30, bad, digest=False)
    mngr.close()
    _assert_is_step(_restore(run, abstract), state, 20)
    assert _quarantined(run) == ["30"]


def test_transient_read_error_is_retried_and_nothing_quarantined(tmp_path, target, capsys,
                                                               monkeypatch):
    abstract, state = target
    run = _saved_run(tmp_path, state)
    real_restore, calls = ocp.CheckpointManager.restore, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("UNAVAILABLE: HTTP response code: 503")
        return real_restore(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "RETRY_DELAYS", (0.0, 0.0, 0.0), raising=False)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    _assert_is_step(_restore(run, abstract), state, 20)
    assert len(calls) == 2 and _quarantined(run) == []
    assert "503; retrying in 0 s" in capsys.readouterr().err


def test_persistent_read_error_fails_clearly_and_moves_nothing(tmp_path, target,
                                                                monkeypatch):
    abstract, state = target
    run = _saved_run(tmp_path, state)

    def down(self, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(checkpoint, "RETRY_DELAYS", (0.0, 0.0, 0.0), raising=False)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", down)
    with pytest.raises(UserError, match="still failing after 4 tries .*nothing was moved"):
        _restore(run, abstract)
    assert _quarantined(run) == [] and sorted(os.listdir(run / "checkpoints")) == ["10", "20"]


def test_intact_but_unrestorable_step_is_an_error_not_damage(tmp_path, target):
    """A target that does not fit (e.g. a changed config) proves nothing about the files."""
    abstract, state = target
    run = _saved_run(tmp_path, state)
    wider = make_config(**{**CFG.to_dict(), "width": 128})
    tx = make_optimizer(wider)
    shapes, shardings = state_shardings(wider, D_IN, tx, make_mesh("data:2,model:4"))
    with pytest.raises(UserError, match="checkpoint 20 .* is intact .* but cannot be restored"):
        _restore(run, checkpoint.abstract_with_shardings(shapes, shardings))
    assert _quarantined(run) == []


def test_step_quarantined_in_place_is_skipped_then_replaced(tmp_path, target):
    """On object stores a damaged step is marked, not moved (same code path, local here)."""
    abstract, state = target
    run = _saved_run(tmp_path, state)
    marker = run / "checkpoints/20" / checkpoint.QUARANTINE_MARKER
    marker.write_text(json.dumps({"step": 20, "reason": "test"}))
    assert "checkpoint 20: quarantined in place: test" in checkpoint.verify_checkpoints(run)
    _assert_is_step(_restore(run, abstract), state, 10)
    mngr = checkpoint.manager(run, CFG)
    checkpoint.save(mngr, 20, _state_at(state, 20))  # training reaches step 20 again
    mngr.close()
    assert not marker.exists() and checkpoint.verify_checkpoints(run) == []
    _assert_is_step(_restore(run, abstract), state, 20)


def test_checkpoint_from_before_the_params_item_still_reads(tmp_path, target):
    abstract, state = target
    run = tmp_path / "run"
    old = ocp.CheckpointManager(run / "checkpoints")  # the single-item layout
    old.save(10, args=ocp.args.StandardSave(_state_at(state, 10)))
    old.close()
    _assert_is_step(_restore(run, abstract), state, 10)
    mngr = checkpoint.manager(run)
    params, step = checkpoint.read_params(mngr, abstract.params)
    mngr.close()
    np.testing.assert_array_equal(np.asarray(params["W_enc"]),
                                  np.asarray(state.params["W_enc"]) + 10)


def test_digest_on_an_object_store(tmp_path):
    """The object-store path (listed and read through tensorstore), on its memory:// store."""
    from sae_jax import files

    step = "memory://ckpt_digest_test/checkpoints/7"
    files.write_bytes(f"{step}/params/d/abc", b"\1\2\3" * 1000)
    files.write_bytes(f"{step}/_CHECKPOINT_METADATA", b"{}")
    assert check_digest(step)[0] == "undigested"
    digest = write_digest(step)
    assert set(digest["files"]) == {"params/d/abc", "_CHECKPOINT_METADATA"}
    assert check_digest(step) == ("ok", "2 files match the digest")
    assert check_digest(step, "params") == ("ok", "1 files match the digest")
    files.write_bytes(f"{step}/params/d/abc", b"\1\2\4" * 1000)
    assert check_digest(step) == ("damaged", "1 file(s) changed, e.g. params/d/abc")


def test_save_without_digest_for_bench(tmp_path, target):
    _, state = target
    mngr = checkpoint.manager(tmp_path / "run", CFG)
    checkpoint.save(mngr, 1, state, digest=False)
    mngr.wait_until_finished()
    step_dir = Path(checkpoint.step_dir(mngr, 1))
    assert not (step_dir / DIGEST_FILE).exists()
    write_digest(step_dir)  # what bench times separately
    mngr.close()
    assert checkpoint.verify_checkpoints(tmp_path / "run") == []


@pytest.mark.entry
def test_cli_resumes_from_the_older_step_when_the_newest_lost_an_item(tmp_path):
    """Reproduces the lost-run bug end to end: the newest checkpoint's params item is
    deleted; the rerun must resume from the older step, quarantining only the damaged one."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    np.save(tmp_path / "x.npy",
            np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32))

    def sae_jax_cli(*args):
        return subprocess.run([sys.executable, "-m", "sae_jax", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=300)

    assert sae_jax_cli("import", tmp_path / "x.npy", tmp_path / "store").returncode == 0
    run = tmp_path / "run"
    train = ["train", tmp_path / "store", run, "arch=topk", "width=32", "k=4",
             "batch_size=64", "ckpt_every=10", "keep_checkpoints=3", "mesh=data:2,model:4"]
    out = sae_jax_cli(*train, "steps=20")
    assert out.returncode == 0, out.stderr
    shutil.rmtree(_item(run, 20, "params"))
    out = sae_jax_cli(*train, "steps=30")
    assert out.returncode == 0, out.stderr
    assert "checkpoint 20 is damaged" in out.stderr
    assert "resuming from checkpoint 10" in out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["step"] == 30
    assert _quarantined(run) == ["20"]
    assert sorted(os.listdir(run / "checkpoints")) == ["10", "20", "30"]
    assert sae_jax.load(run).step == 30
    assert checkpoint.verify_checkpoints(run)[0].startswith("corrupt_checkpoints/20:")


def test_params_only_checkpoint_loads_but_cannot_resume(tmp_path, target):
    """What import-sae writes: params alone, no optimizer state."""
    abstract, state = target
    run = tmp_path / "run"
    mngr = checkpoint.manager(run, CFG)
    checkpoint.save_params(mngr, 0, state.params)
    mngr.close()
    assert sorted(os.listdir(run / "checkpoints/0")) == [
        "_CHECKPOINT_METADATA", "commit_success.txt", "params", DIGEST_FILE]
    with pytest.raises(UserError, match="intact .* params only, as import-sae writes, cannot "
                                        "resume training"):
        _restore(run, abstract)
    assert _quarantined(run) == []
    mngr = checkpoint.manager(run)
    assert checkpoint.read_params(mngr, abstract.params)[1] == 0
    shutil.rmtree(run / "checkpoints/0/params/d")
    with pytest.raises(UserError, match=r"checkpoint 0 in .* is damaged \(\d+ file\(s\) missing"):
        checkpoint.read_params(mngr, abstract.params, 0)
    mngr.close()
