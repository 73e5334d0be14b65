"""`sae-jax cost`: hand-computed FLOPs, hours and memory; the CLI path; bad input."""

import argparse
import json

import numpy as np
import pytest

from sae_jax.errors import UserError
from sae_jax.planning import cost, scaling

GIB = 2**30
F34M = 34 * 2**20  # Scaling Monosemanticity's largest SAE, as docs/sharding-and-tpu.md counts it


def parse(argv):
    parser = argparse.ArgumentParser()
    cost.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("spec, name, chips", [
    ("v5p-128", "v5p", 64), ("v4-64", "v4", 32), ("v5e-256", "v5e", 256),
    ("v5litepod-16", "v5e", 16), ("v6e-256", "v6e", 256), ("H100-8", "h100", 8),
    ("a100-1", "a100", 1),
])
def test_accelerator_names_count_cores_or_chips(spec, name, chips):
    acc, n = cost.parse_accelerator(spec)
    assert (acc.name, n) == (name, chips)


@pytest.mark.parametrize("spec", ["v9-8", "v5p", "v5p-127", "v5e-0", "tpu-8", "h100-x"])
def test_bad_accelerator_names_fail(spec):
    with pytest.raises(UserError, match="accelerator"):
        cost.parse_accelerator(spec)


def test_flops_per_token_is_the_bench_formula():
    from sae_jax.config import make_config
    from sae_jax.mesh import make_mesh
    from sae_jax.planning.bench import flops_per_token

    d, width, k = 384, 24576, 32
    assert cost.step_flops_per_token("relu", d, width, k, sparse=True) == 10 * d * width
    assert cost.step_flops_per_token("relu", d, width, k, False, centre_grad_matmul=True) == (
        12 * d * width)  # the baseline step: b_dec's encoder gradient as a matmul
    assert cost.step_flops_per_token("relu", d, width, k, False, transcoder=True,
                                     centre_grad_matmul=True) == 10 * d * width
    assert cost.step_flops_per_token("matryoshka", d, width, k, sparse=False) == 22 * d * width
    assert cost.step_flops_per_token("matryoshka", d, width, k, False, inner_levels=1) == (
        16 * d * width)
    assert cost.step_flops_per_token("topk", d, width, k, sparse=True) == (2 * d * width
                                                                           + 10 * d * k)
    cfg = make_config(["arch=topk", f"width={width}", f"k={k}"])
    assert flops_per_token(cfg, d, make_mesh("data:8,model:1")) == 2 * d * width + 10 * d * k
    assert flops_per_token(cfg, d, make_mesh("data:2,model:4")) == 10 * d * width
    assert cost.run_flops("relu", d, width, k, 1e6, sparse=False) == 10 * d * width * 1e6


def test_34m_features_on_v5p_256_by_hand():
    """34M features, d=4096, TopK k=64, 8e9 tokens, batch 4096 on v5p-256 (128 chips)."""
    r = cost.estimate_cost(4096, F34M, 8e9, "v5p-256", arch="topk", k=64, batch_size=4096)
    per_token = 10 * 4096 * 35_651_584  # sharded dictionary: the dense step
    assert r["flops_per_token"] == per_token == 1_460_288_880_640
    assert r["flops"] == pytest.approx(1.1682311e22, rel=1e-6)
    seconds = 1.1682311e22 / (128 * 459e12 * 0.5)  # chips × bf16 peak × MFU
    assert r["wall_hours"] == pytest.approx(seconds / 3600, rel=1e-6)  # ≈ 110.5 h
    assert r["chip_hours"] == pytest.approx(128 * seconds / 3600, rel=1e-6)
    assert r["steps"] == 1_953_125
    # the train default (auto mesh) splits the dictionary 128 ways, as docs/sharding-and-tpu.md says
    assert r["mesh"] == "data:1,model:128" and r["mesh_rule"].startswith("auto")
    weights = 2 * 4096 * F34M / 128
    mem = r["memory"]
    assert mem["state_bytes"] == 12 * weights and mem["state_bytes"] / GIB == 25.5
    assert mem["grad_bytes"] / GIB == 8.5
    assert mem["temp_bytes"] == 6 * 4 * 4096 * (F34M / 128)  # 6 f32 (batch, F/128) copies
    assert mem["batch_bytes"] == 2 * 4 * 4096 * 4096
    assert mem["total_bytes"] == pytest.approx((25.5 + 8.5 + 25.5 + 0.125) * GIB)
    assert mem["fits"] and r["max_batch_size"] >= 4096


def test_small_relu_on_one_h100_node_by_hand():
    r = cost.estimate_cost(512, 16384, 1e9, "h100-8", arch="relu", batch_size=512)
    assert r["mesh"] == "data:8,model:1"  # 0.2 GB of params + Adam: data parallel
    assert r["flops"] == 10 * 512 * 16384 * 1e9
    assert r["wall_hours"] == pytest.approx(10 * 512 * 16384 * 1e9 / (8 * 989e12 * 0.5)
                                            / 3600)
    weights = 2 * 512 * 16384
    mem = r["memory"]
    assert mem["temp_bytes"] == max(4 * weights, 3 * 4 * 64 * 16384)  # the Adam update
    assert mem["total_bytes"] == 12 * weights + 4 * weights + 4 * weights + 2 * 4 * 64 * 512
    assert r["k"] is None and "dense" in r["flop_count"]


def test_unsplit_topk_takes_the_sparse_step():
    r = cost.estimate_cost(384, 24576, 1e8, "v5e-8", arch="topk", k=32)
    assert r["mesh"] == "data:8,model:1"
    assert r["flops_per_token"] == 2 * 384 * 24576 + 10 * 384 * 32
    assert any("sparse" in n for n in r["notes"])


def test_too_big_for_the_slice_is_flagged_and_another_mesh_is_found():
    r = cost.estimate_cost(4096, F34M, 8e9, "v5e-256", k=64)
    assert not r["memory"]["fits"] and r["max_batch_size"] == 0
    assert r["mesh"] == "data:1,model:256" and "NOT" in r["mesh_rule"]
    assert any("at any batch size" in n for n in r["notes"])
    # 24M features at d=4096 on v5p-128 (64 chips): params + Adam are 36 GiB per chip even
    # split 64 ways, over the train default's 30% of HBM, yet the step fits at batch 1024
    r = cost.estimate_cost(4096, 24 * 2**20, 1e9, "v5p-128", batch_size=1024)
    assert r["memory"]["fits"] and r["mesh"] == "data:1,model:64"
    assert "train default refuses" in r["mesh_rule"]
    assert "pass mesh=data:1,model:64 to train" in r["mesh_rule"]


def test_max_batch_size_is_the_largest_that_fits():
    r = cost.estimate_cost(4096, F34M, 8e9, "v5p-256", k=64)
    data, model = (int(p.split(":")[1]) for p in r["mesh"].split(","))
    hbm = r["hbm_bytes_per_chip"]

    def fits(batch):
        total = cost.memory_per_chip(4096, F34M, batch, data, model, "topk")["total_bytes"]
        return total <= cost.HBM_USABLE_FRACTION * hbm

    assert fits(r["max_batch_size"]) and not fits(r["max_batch_size"] + data)


@pytest.mark.parametrize("arch, mesh", [("topk", "data:8,model:1"), ("topk", "data:1,model:8"),
                                        ("relu", "data:2,model:4")])
def test_memory_estimate_matches_the_compiled_step(arch, mesh):
    """Against XLA's memory analysis of the real f32 step (abstract shapes, no allocation)."""
    from sae_jax.config import make_config
    from sae_jax.mesh import make_mesh, parse_mesh
    from sae_jax.planning.bench import step_memory

    d, width, batch = 64, 8192, 1024
    cfg = make_config([f"arch={arch}", f"width={width}", "k=16", f"batch_size={batch}",
                       f"mesh={mesh}", "compute_dtype=float32"])
    measured = step_memory(cfg, d, make_mesh(mesh))
    sizes = parse_mesh(mesh, 8)
    est = cost.memory_per_chip(d, width, batch, sizes["data"], sizes["model"], arch)
    assert est["state_bytes"] == pytest.approx(measured["state_bytes_per_device"], rel=0.02)
    assert est["total_bytes"] == pytest.approx(measured["peak_bytes_per_device"], rel=0.2)


def test_cli_prints_a_table_and_returns_json(capsys):
    result = cost.run(parse(["--d-model", "4096", "--width", str(F34M), "--tokens",
                                     "8e9", "--k", "64", "--accelerator", "v5p-256"]))
    table = capsys.readouterr().err
    assert "sae-jax cost" in table and "110.5 h" in table and "data:1,model:128" in table
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["wall_hours"] == pytest.approx(110.5, abs=0.05)


def fit_file(tmp_path):
    """A scaling fit from a synthetic grid (see test_scaling.grid_points)."""
    from test_scaling import grid_points

    result = scaling.fit_scaling(grid_points())
    return result, scaling.write_fit(result, tmp_path)


def test_from_fit_prices_the_compute_optimal_run(tmp_path, capsys):
    fit, path = fit_file(tmp_path)
    budget = 1e18
    r = cost.run(parse(["--d-model", "64", "--accelerator", "h100-8", "--arch", "relu",
                                "--from-fit", path, "--budget-flops", "1e18"]))
    plan = r["from_fit"]
    raw = scaling.predict_pure(fit["optimal_width"], budget)
    assert plan["optimal_width_raw"] == pytest.approx(raw)
    assert r["width"] == plan["optimal_width"] and r["width"] % 256 == 0
    assert abs(r["width"] - raw) <= 128
    assert plan["optimal_steps"] == pytest.approx(scaling.predict_pure(fit["optimal_steps"],
                                                                       budget))
    assert plan["predicted_loss"] == pytest.approx(scaling.predict(fit["loss_vs_compute"],
                                                                   budget))
    assert r["flops"] == pytest.approx(budget)  # the run spends the budget
    assert r["tokens"] == pytest.approx(budget / (10 * 64 * r["width"]))
    assert "predicted loss" in capsys.readouterr().err
    # a wall-clock budget buys hours × chips × peak × MFU
    r = cost.run(parse(["--d-model", "64", "--accelerator", "h100-8", "--arch", "relu",
                                "--from-fit", path, "--budget-hours", "2", "--mfu", "0.4"]))
    assert r["from_fit"]["budget_flops"] == pytest.approx(2 * 3600 * 8 * 989e12 * 0.4)
    assert r["wall_hours"] == pytest.approx(2)


@pytest.mark.parametrize("argv, message", [
    (["--width", "1024", "--tokens", "1e9", "--accelerator", "tpu-9"], "unknown accelerator"),
    (["--width", "0", "--tokens", "1e9", "--accelerator", "v5e-8"], "--width"),
    (["--width", "1024", "--tokens", "-5", "--accelerator", "v5e-8"], "--tokens"),
    (["--width", "1024", "--tokens", "1e9", "--accelerator", "v5e-8", "--mfu", "1.5"], "--mfu"),
    (["--width", "1024", "--tokens", "1e9", "--accelerator", "v5e-8", "--k", "2048"], "--k"),
    (["--width", "1024", "--tokens", "1e9", "--accelerator", "v5e-8", "--arch", "x"], "arch"),
    (["--width", "1024", "--accelerator", "v5e-8"], "--tokens"),
    (["--width", "1024", "--tokens", "1e9", "--accelerator", "v5e-8", "--budget-flops", "1e18"],
     "need --from-fit"),
    (["--width", "1024", "--tokens", "1e9", "--accelerator", "v5e-8", "--mesh", "data:3"],
     "mesh"),
])
def test_bad_input_is_a_user_error(argv, message):
    with pytest.raises(UserError, match=message):
        cost.run(parse(["--d-model", "512", *argv]))


def test_fit_without_the_needed_laws_is_a_user_error(tmp_path):
    fit, _ = fit_file(tmp_path)
    path = scaling.write_fit({**fit, "optimal_width": None}, tmp_path / "no_width")
    with pytest.raises(UserError, match="no optimal_width law"):
        cost.run(parse(["--d-model", "64", "--accelerator", "h100-8", "--from-fit",
                                path, "--budget-flops", "1e18"]))
    with pytest.raises(UserError, match="exactly one of"):
        cost.run(parse(["--d-model", "64", "--accelerator", "h100-8", "--from-fit",
                                str(tmp_path)]))
    with pytest.raises(UserError, match="no scaling fit"):
        cost.run(parse(["--d-model", "64", "--accelerator", "h100-8", "--from-fit",
                                str(tmp_path / "missing.json"), "--budget-flops", "1e18"]))
    assert np.isfinite(fit["optimal_steps"]["exponent"])
