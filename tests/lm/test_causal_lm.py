"""Every causal-LM family against transformers, through the golden fixtures made by
`tests/fixtures/make_causal_golden.py` (tiny random-weight checkpoints; no torch here)."""

import json
import shutil

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sae_jax.lm
from sae_jax.errors import UserError
from sae_jax.lm import causal, families
from sae_jax.mesh import make_mesh
from tests.conftest import CAUSAL_FAMILIES, CAUSAL_FIXTURES, mesh_devices

F32_TOLERANCE = 1e-4  # max |ours - transformers| / max |transformers|
BF16_TOLERANCE = 0.03  # ‖ours - transformers‖ / ‖transformers‖, measured 0.007-0.018


def golden(family: str) -> dict:
    with np.load(CAUSAL_FIXTURES / family / "golden.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def relative_max_error(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(family: str, mesh: str = "data:1,model:1", dtype=None):
        key = (family, mesh, dtype)
        if key not in cache:
            cache[key] = causal.load(CAUSAL_FIXTURES / family, dtype=dtype,
                                     mesh=make_mesh(mesh, mesh_devices(mesh)))
        return cache[key]
    return get


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_matches_transformers_in_float32(family, loaded):
    m, g = loaded(family), golden(family)
    ids = g["input_ids"]
    stream = m.residuals(ids)
    assert stream.dtype == np.float32 and stream.shape == (m.n_layers, *ids.shape, m.d_model)
    for layer in range(m.n_layers):
        assert relative_max_error(stream[layer], g["block_outputs"][layer]) < F32_TOLERANCE
        if layer < m.n_layers - 1:  # HF's last hidden state has the final norm applied
            assert relative_max_error(stream[layer], g["hidden_states"][layer + 1]) \
                < F32_TOLERANCE
    assert relative_max_error(m.logits(ids), g["logits"]) < F32_TOLERANCE


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # pre-norm only, and post-norms too
def test_every_hook_site_matches_transformers(family, loaded):
    m, g = loaded(family), golden(family)
    ids, layer = g["input_ids"], int(g["hook_layer"])
    np.testing.assert_array_equal(m.residual(ids, layer), m.residuals(ids)[layer])
    for site in ("attn_out", "mlp_out"):
        assert relative_max_error(m.activations(ids, layer, site), g[site]) < F32_TOLERANCE
    pair = m.activations(ids, layer, "mlp")
    assert relative_max_error(pair[..., :m.d_model], g["mlp_in"]) < F32_TOLERANCE
    assert relative_max_error(pair[..., m.d_model:], g["mlp_out"]) < F32_TOLERANCE
    block = m.activations(ids, layer, "block")
    np.testing.assert_allclose(block[..., :m.d_model], g["block_outputs"][layer - 1],
                               atol=1e-5)
    np.testing.assert_allclose(block[..., m.d_model:], g["block_outputs"][layer], atol=1e-5)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_greedy_generation_matches_transformers(family, loaded):
    m, g = loaded(family), golden(family)
    n = int(g["prompt_len"])
    out = m.generate(g["generated"][:, :n], g["generated"].shape[1] - n)
    np.testing.assert_array_equal(out, g["generated"])


EIGHT_DEVICES = ([(f, "data:2,model:4") for f in CAUSAL_FAMILIES]
                 + [(f, m) for f in ("llama", "gemma3") for m in ("data:8,model:1",
                                                                  "data:1,model:8")])


@pytest.mark.parametrize("family,mesh", EIGHT_DEVICES)
def test_sharded_over_eight_devices(family, mesh, loaded):
    """The weights really are split over "model", and the outputs do not change."""
    m, g = loaded(family, mesh), golden(family)
    model = m.mesh.shape["model"]
    q = m.params["layers"][0]["q"]["w"]
    assert q.sharding.spec == P(None, "model")
    assert len(q.addressable_shards) == 8
    if model > 1:
        assert q.addressable_shards[0].data.shape[1] == q.shape[1] // model
    ids = g["input_ids"]
    assert relative_max_error(m.logits(ids), g["logits"]) < F32_TOLERANCE
    layer = int(g["hook_layer"])
    assert relative_max_error(m.residual(ids, layer), g["block_outputs"][layer]) < F32_TOLERANCE
    # A batch the data axis does not divide is padded inside and cut back.
    assert relative_max_error(m.residual(ids[:1], layer), g["block_outputs"][layer][:1]) \
        < F32_TOLERANCE


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_bfloat16_stays_within_stated_tolerance(family, loaded):
    m, g = loaded(family, dtype="bfloat16"), golden(family)
    assert m.params["embed"].dtype.name == "bfloat16"
    ids = g["input_ids"]
    logits = m.logits(ids)
    assert logits.dtype == np.float32
    err = np.linalg.norm(logits - g["logits"]) / np.linalg.norm(g["logits"])
    assert 0 < err < BF16_TOLERANCE
    last = m.residual(ids, m.n_layers - 1)
    ref = g["block_outputs"][-1]
    assert np.linalg.norm(last - ref) / np.linalg.norm(ref) < BF16_TOLERANCE


def test_family_switches_come_from_the_config():
    """What each fixture exercises: the switches that differ between families."""
    arch = {f: families.arch_from_config(json.loads((CAUSAL_FIXTURES / f / "config.json")
                                                    .read_text())) for f in CAUSAL_FAMILIES}
    assert arch["gpt2"].rope is None and arch["gpt2"].norm == "layernorm"
    assert arch["llama"].n_kv_heads < arch["llama"].n_heads
    assert arch["llama"].rope.kind == "llama3" and not arch["llama"].tied_embeddings
    assert (CAUSAL_FIXTURES / "llama" / "model.safetensors.index.json").is_file()
    assert set(arch["mistral"].layer_types) == {"sliding"} and arch["mistral"].sliding_window
    assert arch["qwen2"].tied_embeddings
    assert arch["qwen3"].qk_norm and arch["qwen3"].head_dim * arch["qwen3"].n_heads \
        != arch["qwen3"].d_model
    g2, g3 = arch["gemma2"], arch["gemma3"]
    assert g2.attn_softcap and g2.final_softcap and g2.post_norms
    assert g2.layer_types == ("sliding", "full", "sliding", "full")
    assert g3.layer_types[-1] == "full" and "sliding" in g3.layer_types
    assert g3.rope_local.theta != g3.rope.theta and g3.rope.kind == "linear" and g3.qk_norm


def test_one_entry_point_for_every_model():
    m = sae_jax.lm.load(CAUSAL_FIXTURES / "llama")
    assert m.tokenizer.decode(m.tokenizer.encode("def f(x): return x").ids) \
        == "def f(x): return x"
    assert m.specials.cls == json.loads((CAUSAL_FIXTURES / "llama" / "config.json")
                                        .read_text())["bos_token_id"]
    with pytest.raises(UserError, match="layer must be in 0..2"):
        m.residual(np.zeros((1, 4), np.int32), 3)
    with pytest.raises(UserError, match="int array"):
        m.residual(np.zeros(4, np.int32), 0)


def copy_fixture(tmp_path, family="llama"):
    folder = tmp_path / family
    shutil.copytree(CAUSAL_FIXTURES / family, folder)
    return folder


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(UserError, match="unsupported model_type 'falcon'; supported: gpt2, "
                                        "llama, mistral, qwen2, qwen3, gemma2"):
        causal.load(folder)


def test_damaged_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        causal.load(tmp_path / "nowhere")
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(UserError, match="has shape .* config.json implies"):
        causal.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / first).unlink()
    with pytest.raises(UserError, match="missing"):
        causal.load(folder)
    for path in folder.glob("*.safetensors*"):
        path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="pickle, which is never read"):
        causal.load(folder)


def test_minilm_under_the_same_roof():
    m = sae_jax.lm.load("minilm")
    ids, mask = m.tokenize(["a short sentence"])
    n = int(mask.sum())  # the contract's ids carry no padding
    states, _ = m.hidden_states(["a short sentence"])
    np.testing.assert_allclose(m.residual(ids[:, :n], 2), states[3][:, :n], atol=1e-5)
    with pytest.raises(UserError, match="no LM head"):
        m.logits(ids)
