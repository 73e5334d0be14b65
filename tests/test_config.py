"""Config parsing: typed key=value overrides, one-line errors, architecture defaults."""

import pytest

from sae_jax.config import TrainConfig, describe, make_config, parse_overrides
from sae_jax.errors import UserError
from sae_jax.mesh import parse_mesh


def test_overrides_are_typed():
    cfg = make_config(["arch=relu", "width=1e3", "lr=3e-4", "compute_dtype=bfloat16"])
    assert (cfg.arch, cfg.width, cfg.lr, cfg.compute_dtype) == ("relu", 1000, 3e-4, "bfloat16")


def test_architecture_defaults_fill_unset_keys():
    assert make_config(arch="relu").penalty == "l1"
    assert make_config(arch="jumprelu").penalty == "l0"
    assert make_config(arch="topk").penalty == "none"
    assert make_config(arch="relu", penalty="tanh").penalty == "tanh"
    assert make_config(width=16384).lr == pytest.approx(2e-4)
    assert make_config(width=4096).lr == pytest.approx(4e-4)


@pytest.mark.parametrize("pairs, message", [
    (["bogus=1"], "unknown config key 'bogus'; valid keys: arch, width"),
    (["width=abc"], "bad value for width: 'abc' (expected int)"),
    (["width=1.5"], "bad value for width: '1.5' (expected int)"),
    (["arch=gated"], "bad value for arch: 'gated'; choose one of: relu, jumprelu, topk"),
    (["penalty=l3"], "bad value for penalty: 'l3'; choose one of: l1, tanh, lp, l0, none"),
    (["compute_dtype=fp8"], "choose one of: float32, bfloat16"),
    (["k=0"], "k must be > 0"),
    (["width=8", "k=16"], "k=16 must be <= width=8"),
    (["lr_warmup=0.9", "lr_decay=0.5"], "lr_warmup + lr_decay must be <= 1"),
    (["arch=topk", "penalty=l0"], "penalty=l0 needs the learned thresholds"),
    (["mesh=data=2"], "bad mesh 'data=2'"),
    (["width"], "expected key=value, got 'width'"),
])
def test_bad_input_is_one_clear_line(pairs, message):
    with pytest.raises(UserError) as e:
        make_config(pairs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_parse_overrides_leaves_defaults_alone():
    assert parse_overrides(["k=8"]) == {"k": 8}
    assert parse_overrides(["aux_k=none"]) == {"aux_k": None}


@pytest.mark.parametrize("spec, n, sizes", [
    ("", 8, {"data": 8, "model": 1}),
    ("model:4", 8, {"data": 2, "model": 4}),
    ("data:2,model:4", 8, {"data": 2, "model": 4}),
    ("data:1,model:8", 8, {"data": 1, "model": 8}),
])
def test_mesh_spec(spec, n, sizes):
    assert parse_mesh(spec, n) == sizes


def test_mesh_that_does_not_fit_is_an_error():
    with pytest.raises(UserError, match="needs 6 devices, but 8 are available"):
        parse_mesh("data:2,model:3", 8)


def test_every_key_is_documented():
    table = describe()
    for name in TrainConfig.__dataclass_fields__:
        assert f"| `{name}` |" in table


def test_auto_mesh_is_data_parallel_until_the_state_does_not_fit():
    from sae_jax.mesh import auto_mesh_spec

    assert auto_mesh_spec(8, 384, 24576, None) == "data:8,model:1"  # CPU: memory unknown
    assert auto_mesh_spec(8, 384, 24576, 16 * 2**30) == "data:8,model:1"  # 0.2 GiB fits
    # 1M features at d=4096 is 100 GiB of state: split until 30% of a 95 GiB chip holds it
    assert auto_mesh_spec(256, 4096, 2**20, 95 * 2**30) == "data:64,model:4"
    with pytest.raises(UserError, match="even split 8 ways; use more devices"):
        auto_mesh_spec(8, 4096, 2**25, 95 * 2**30)


def test_device_defaults_resolve_at_train_time():
    import jax

    cfg = make_config(width=64, k=4)
    assert (cfg.compute_dtype, cfg.mesh) == ("auto", "")
    resolved = cfg.for_devices(jax.devices()[:4], d_in=16)
    assert (resolved.compute_dtype, resolved.mesh) == ("float32", "data:4,model:1")
    explicit = make_config(width=64, k=4, compute_dtype="bfloat16", mesh="model:2")
    assert explicit.for_devices(jax.devices(), 16) == explicit
