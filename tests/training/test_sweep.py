"""Many SAEs in one pass: grid expansion, bitwise equality with separate runs, SIGTERM and
resume of an interrupted sweep, a sharded sweep, a diverging member that does not stop the
others, and the scaling-law experiment's grid and points."""

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest
from conftest import experiment

import sae_jax
from sae_jax.config import TrainConfig, make_config
from sae_jax.errors import Preempted, UserError
from sae_jax.training.grid import SHARED_KEYS, SWEEPABLE, expand_grid, is_sweep, run_names
from sae_jax.training.sweep import SWEEP_FILE, run_sweep_command, train_sweep
from sae_jax.training.train import train

BASE = ["arch=topk", "steps=20", "batch_size=128", "log_every=10", "ckpt_every=10"]
GRID = ["width=64,128", "k=4,8"]
ONE_DEVICE = jax.devices()[:1]
NAMES = ["width=64,k=4", "width=64,k=8", "width=128,k=4", "width=128,k=8"]


def _params(run) -> dict:
    return {k: np.asarray(v) for k, v in sae_jax.load(run).params.items()}


@pytest.fixture(scope="module")
def one_pass(synthetic_store, tmp_path_factory):
    """A 2 widths x 2 k sweep, trained in one pass on one device."""
    run_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    grid = expand_grid(BASE + GRID)
    result = train_sweep([make_config(p) for p in grid], synthetic_store, run_dir,
                         progress=False, names=run_names(grid), devices=ONE_DEVICE)
    return run_dir, result


def test_is_sweep():
    assert is_sweep(["width=1024,4096"]) and is_sweep(["sweep=grid.json"])
    assert not is_sweep(["width=1024", "mesh=data:2,model:4"])


def test_every_config_key_is_either_sweepable_or_shared():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(SWEEPABLE) | set(SHARED_KEYS)
    assert not set(SWEEPABLE) & set(SHARED_KEYS)


def test_expand_grid_is_the_product_in_order():
    grid = expand_grid(["arch=topk", "width=64,128", "lr=1e-3", "k=4,8,16"])
    assert len(grid) == 6
    assert grid[0] == ["arch=topk", "lr=1e-3", "width=64", "k=4"]
    assert grid[1] == ["arch=topk", "lr=1e-3", "width=64", "k=8"]
    assert grid[5] == ["arch=topk", "lr=1e-3", "width=128", "k=16"]
    assert run_names(grid)[:2] == ["width=64,k=4", "width=64,k=8"]
    assert expand_grid(["width=64,128", "mesh=data:2,model:4"])[1] == [
        "mesh=data:2,model:4", "width=128"]


@pytest.mark.parametrize("pairs, message", [
    (["batch_size=128,256"], "batch_size cannot be swept"),
    (["steps=10,20"], "steps cannot be swept"),
    (["data_seed=0,1"], "data_seed cannot be swept"),
    (["holdout=0.1,0.2"], "holdout cannot be swept"),
    (["width=64,,128"], "empty or repeated"),
    (["width=64,64"], "empty or repeated"),
    (["width=64,128", "width=256"], "width is given twice"),
    (["width=8,64", "k=16"], "k=16 must be <= width=8"),
    (["widht=64,128"], "unknown config key 'widht'"),
    (["lr=1e-3,0.001"], "same member more than once: lr=0.001"),
])
def test_expand_grid_rejects(pairs, message):
    with pytest.raises(UserError, match=message):
        run_names(expand_grid(pairs))


def test_sweep_file(tmp_path):
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps([{"width": 64, "k": 4}, {"width": 128, "k": 8}]))
    grid = expand_grid(["arch=topk", f"sweep={listed}", "lr=1e-3,2e-3"])
    assert run_names(grid) == ["width=64,k=4,lr=0.001", "width=64,k=4,lr=0.002",
                               "width=128,k=8,lr=0.001", "width=128,k=8,lr=0.002"]
    product = tmp_path / "product.json"
    product.write_text(json.dumps({"width": [64, 128], "aux_k": [None, 8]}))
    assert run_names(expand_grid([f"sweep={product}"])) == [
        "width=64,aux_k=none", "width=64,aux_k=8", "width=128,aux_k=none", "width=128,aux_k=8"]
    bad = tmp_path / "bad.json"
    for content, message in [("[{'width': 64}]", "not valid JSON"),
                             ('[{"batch_size": 64}]', "batch_size cannot be swept"),
                             ('{"width": 64}', "non-empty JSON list"),
                             ('[{"width": [64]}]', "bad value for width")]:
        bad.write_text(content)
        with pytest.raises(UserError, match=message):
            expand_grid([f"sweep={bad}"])
    with pytest.raises(UserError, match="width given both in the sweep file"):
        expand_grid([f"sweep={listed}", "width=256"])
    with pytest.raises(UserError, match="does not exist"):
        expand_grid([f"sweep={tmp_path / 'missing.json'}"])


def test_one_pass_equals_separate_runs(one_pass, synthetic_store, tmp_path):
    """Every member holds exactly the params of a separate `train` on the same batches."""
    run_dir, result = one_pass
    assert [m["name"] for m in result["members"]] == NAMES
    listed = json.loads((run_dir / SWEEP_FILE).read_text())["members"]
    assert [m["name"] for m in listed] == NAMES
    for pairs, name in zip(expand_grid(BASE + GRID), NAMES):
        member = run_dir / name
        steps = [json.loads(line)["step"] for line in (member / "metrics.jsonl").open()]
        assert steps == [10, 20]
        sae = sae_jax.load(member)
        assert sae.step == 20 and sae.width == int(name.split(",")[0].split("=")[1])
        train(make_config(pairs), synthetic_store, tmp_path / name, progress=False,
              devices=ONE_DEVICE)
        separate = _params(tmp_path / name)
        for key, value in _params(member).items():
            np.testing.assert_array_equal(value, separate[key], err_msg=f"{name} {key}")
        assert (json.loads((member / "config.json").read_text())
                == json.loads((tmp_path / name / "config.json").read_text()))


def _sigterm_once_handler_changes(ignore):
    """Sends this process SIGTERM as soon as someone replaces the `ignore` handler (i.e.
    once the sweep listens for it), from a watcher thread."""
    def watch():
        deadline = time.time() + 60
        while signal.getsignal(signal.SIGTERM) is ignore and time.time() < deadline:
            time.sleep(0.001)
        if signal.getsignal(signal.SIGTERM) is not ignore:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_saves_every_member_then_resumes(one_pass, synthetic_store, tmp_path):
    """SIGTERM: every member saves the current step. Resuming (one member's checkpoint lost,
    so it catches up on its own first) ends equal to the uninterrupted sweep."""
    run_dir, _ = one_pass
    cfgs = [make_config(p) for p in expand_grid(BASE + GRID)]

    def ignore(*_):
        pass

    previous = signal.signal(signal.SIGTERM, ignore)  # a late signal must not kill pytest
    try:
        watcher = _sigterm_once_handler_changes(ignore)
        with pytest.raises(Preempted, match="SIGTERM at step 1: checkpoints saved"):
            train_sweep(cfgs, synthetic_store, tmp_path / "sweep", progress=False,
                        names=NAMES, devices=ONE_DEVICE)
        watcher.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [sae_jax.load(tmp_path / "sweep" / n).step for n in NAMES] == [1, 1, 1, 1]
    shutil.rmtree(tmp_path / "sweep" / NAMES[2] / "checkpoints")
    train_sweep(cfgs, synthetic_store, tmp_path / "sweep", progress=False, names=NAMES,
                devices=ONE_DEVICE)
    for name in NAMES:
        assert sae_jax.load(tmp_path / "sweep" / name).step == 20
        expected = _params(run_dir / name)
        for key, value in _params(tmp_path / "sweep" / name).items():
            np.testing.assert_array_equal(value, expected[key], err_msg=f"{name} {key}")


def test_sharded_sweep_matches(one_pass, synthetic_store, tmp_path):
    """The dictionary axis split 4 ways: same SAEs as on the data-parallel mesh."""
    run_dir, _ = one_pass
    pairs = BASE + ["k=4", "width=64,128", "mesh=data:2,model:4"]
    result = run_sweep_command(synthetic_store, str(tmp_path / "sharded"), pairs,
                               progress=False)
    assert [m["name"] for m in result["members"]] == ["width=64", "width=128"]
    for width in (64, 128):
        member = tmp_path / "sharded" / f"width={width}"
        assert json.loads((member / "config.json").read_text())["config"]["mesh"] == \
            "data:2,model:4"
        expected = _params(run_dir / f"width={width},k=4")
        for key, value in _params(member).items():
            np.testing.assert_allclose(value, expected[key], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{width} {key}")


def test_diverging_member_stops_alone(synthetic_store, tmp_path):
    pairs = ["arch=relu", "width=64", "steps=6", "batch_size=128", "log_every=1",
             "ckpt_every=2", "lr=1e-3,1e30"]
    with pytest.raises(UserError, match=r"1 of 2 members stopped: lr=1e\+30: the updated "
                                        r"params are not finite .* at step 1;"):
        run_sweep_command(synthetic_store, str(tmp_path / "sweep"), pairs, progress=False)
    healthy = sae_jax.load(tmp_path / "sweep" / "lr=0.001")
    assert healthy.step == 6
    diverged = tmp_path / "sweep" / "lr=1e+30" / "checkpoints"
    saved = [int(p.name) for p in diverged.iterdir() if p.name.isdigit()]
    assert saved == []  # its first step diverged: nothing of it was ever saved


def test_refusals(synthetic_store, tmp_path):
    cfgs = [make_config(width=64, k=4, steps=10), make_config(width=64, k=8, steps=20)]
    with pytest.raises(UserError, match="must share steps: 10 vs 20"):
        train_sweep(cfgs, synthetic_store, tmp_path / "a", progress=False)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds a single run"):
        train_sweep(cfgs[:1], synthetic_store, tmp_path / "single", progress=False)
    with pytest.raises(UserError, match="width=66 must be divisible by the model axis"):
        run_sweep_command(synthetic_store, str(tmp_path / "b"),
                          BASE + ["width=64,66", "k=4", "mesh=data:2,model:4"], progress=False)


@pytest.mark.parametrize("mode", ["small", "full"])
def test_scaling_grid_diagonals_are_the_iso_compute_groups(mode):
    """With the executed (sparse TopK) FLOP count, each diagonal of the width x steps grid
    is one iso-compute group of the fit, and nothing else is."""
    from sae_jax.planning import cost, scaling

    lab = experiment("scaling_laws")
    grid = lab.GRIDS[mode]
    points = [{"width": w, "steps": s, "tokens": s * grid.batch_size, "loss": 1.0,
               "flops": cost.run_flops("topk", 384, w, grid.k, s * grid.batch_size, True),
               "diagonal": i + j}
              for i, w in enumerate(grid.widths) for j, s in enumerate(grid.steps)]
    groups = scaling.iso_compute_groups(points, lab.ISO_TOL_LOG10)
    assert [sorted({p["diagonal"] for p in g}) for g in groups] == [
        [d] for d in range(2 * len(grid.widths) - 1)]


def test_scaling_point_of_a_member(one_pass, synthetic_store):
    """A sweep member as a scaling point: FLOPs of the sparse TopK step x tokens, loss =
    held-out FVU."""
    from sae_jax.analysis.evaluate import evaluate

    lab = experiment("scaling_laws")
    run_dir, _ = one_pass
    heldout = lab.heldout_rows(synthetic_store, 1000)
    point = lab.measure_point(run_dir / "width=128,k=8", heldout, 1.0)
    assert point["sparse_step"]  # the dictionary is not split
    assert point["tokens"] == 20 * 128
    assert point["flops"] == (2 * 32 * 128 + 10 * 32 * 8) * 20 * 128
    assert point["loss"] == evaluate(sae_jax.load(run_dir / "width=128,k=8"), heldout)["fvu"]
