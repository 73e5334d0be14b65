"""Loss recovered on tiny random-weight causal LMs, harvested, trained and evaluated through
`sae-jax`: the error-term splice is the clean run, the score is SAELens's formula of the
reported CEs, the clean CE is the model's own, and the mesh does not change the numbers.

(Random weights make the *values* of the scores meaningless — zeroing a site can even lower
the loss — so the checks are of the arithmetic, not of how good a tiny SAE is; the corpus is
a fixed text written here, on which zero ablation of these sites does raise the loss.)
"""

import json
import random

import numpy as np
import pytest
from conftest import CAUSAL_FIXTURES, json_result, one_error_line, sae_jax_cli

from sae_jax.analysis.evaluate import EVAL_JSON
from sae_jax.errors import UserError

N_SEQ = 16
VARIANTS = ("spliced", "zero_ablation", "mean_ablation", "spliced_with_error")


def write_corpus(path) -> str:
    """~6,000 tokens of pseudo-English paragraphs, the same on every machine."""
    words = ("the model reads a token and predicts the next one while the sparse "
             "autoencoder stands in for one layer of its residual stream").split()
    rng = random.Random(0)
    paragraphs = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
                           .capitalize() + "." for _ in range(rng.randint(2, 4)))
                  for _ in range(80)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return str(path)


def harvest(tmp, family: str, layer: int, corpus: str, *pair: str):
    """A store of `family` at `layer` (`pair`: "--pair", "mlp"), harvested on 8 devices."""
    store = tmp / "store"
    json_result(sae_jax_cli("harvest", store, "--model", CAUSAL_FIXTURES / family, "--layer",
                            layer, "--max-tokens", 3000, "--seq-len", 32, "--corpus", corpus,
                            *pair))
    return store


TRAIN = ("arch=topk", "width=64", "k=8", "steps=150", "batch_size=128", "holdout=0.2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Harvest, train (on one device: faster to compile) and eval through `sae-jax`; eval
    on the model-parallel mesh data:2,model:4."""
    tmp = tmp_path_factory.mktemp("loss_recovered")
    corpus = write_corpus(tmp / "corpus.txt")
    store, run = harvest(tmp, "llama", 1, corpus), tmp / "run"
    json_result(sae_jax_cli("train", store, run, *TRAIN, devices=1))
    # --lm-batch 4 here, the default 8 in process below: the batch changes no number
    result = json_result(sae_jax_cli("eval", run, store, "--fidelity-sequences", N_SEQ,
                                     "--corpus", corpus, "--mesh", "data:2,model:4",
                                     "--lm-batch", 4))
    return store, run, corpus, result


def check_arithmetic(lm: dict) -> None:
    """What holds for any SAE on any model: the error-term splice is the clean run, zeroing
    the site moves the prediction further than the SAE does, and the scores are the formula
    of the reported CEs."""
    assert lm["ce_spliced_with_error"] == pytest.approx(lm["ce_clean"], rel=1e-4)
    assert abs(lm["kl_spliced_with_error"]) < 1e-5
    assert lm["kl_zero_ablation"] > lm["kl_spliced"] > 1e-4
    assert lm["ce_zero_ablation"] > lm["ce_clean"]
    assert lm["loss_recovered"] == pytest.approx(
        (lm["ce_zero_ablation"] - lm["ce_spliced"]) / (lm["ce_zero_ablation"] - lm["ce_clean"]),
        rel=1e-12)
    if lm["ce_mean_ablation"] > lm["ce_clean"]:
        assert lm["loss_recovered_mean"] == pytest.approx(
            (lm["ce_mean_ablation"] - lm["ce_spliced"])
            / (lm["ce_mean_ablation"] - lm["ce_clean"]), rel=1e-12)
    else:
        assert lm["loss_recovered_mean"] is None
    assert 0 < lm["fvu_spliced"] < 1


def test_eval_reports_loss_recovered(llama):
    _, run, _, r = llama
    lm = r["lm_loss"]
    assert "fidelity" not in r and r["loss_recovered"] == lm["loss_recovered"]
    assert lm["n_sequences"] == N_SEQ and lm["layer"] == 1 and lm["site"] == "resid"
    # No BOS row: every spliced token is a document token, and so is every predicted one.
    assert lm["n_tokens_spliced"] == lm["n_tokens_predicted"] > N_SEQ
    check_arithmetic(lm)
    assert json.loads((run / "eval" / EVAL_JSON).read_text())["lm_loss"] == lm


def test_clean_loss_is_the_models_own(llama):
    """ce_clean recomputed from `CausalLM.logits` on the same held-out sequences."""
    from sae_jax.analysis.heldout import heldout_sequences
    from sae_jax.data.store import open_store
    from sae_jax.lm import causal
    from sae_jax.lm.corpus import NO_POSITION
    from sae_jax.sae import load

    store_dir, run, corpus, r = llama
    store, sae = open_store(store_dir), load(run)
    m = causal.load(CAUSAL_FIXTURES / "llama")
    s = heldout_sequences(store, store.split(sae.config.holdout)[1], m.tokenizer, m.specials,
                          N_SEQ, 0, corpus)
    assert (s.ids[:, 0] == m.specials.cls).all()
    logits = m.logits(s.ids).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], s.ids[:, 1:, None].astype(np.int64), -1)[..., 0]
    predicted = s.positions[:, 1:] != NO_POSITION
    assert predicted.sum() == r["lm_loss"]["n_tokens_predicted"]
    assert nll[predicted].mean() == pytest.approx(r["lm_loss"]["ce_clean"], rel=1e-5)


def test_same_numbers_on_a_data_parallel_mesh(llama):
    """The CLI's data:2,model:4 result again on data:8, in process."""
    from sae_jax.analysis.loss_recovered import loss_recovered
    from sae_jax.data.store import open_store
    from sae_jax.mesh import make_mesh
    from sae_jax.sae import load

    store, run, corpus, r = llama
    a = r["lm_loss"]
    b = loss_recovered(load(run), open_store(store), n_sequences=N_SEQ, corpus=corpus,
                       mesh=make_mesh("data:8"))
    assert b.keys() == a.keys()
    for name in ("clean",) + VARIANTS:
        assert b[f"ce_{name}"] == pytest.approx(a[f"ce_{name}"], rel=1e-5)
    for name in VARIANTS:
        assert b[f"kl_{name}"] == pytest.approx(a[f"kl_{name}"], rel=1e-3, abs=1e-6)
    assert b["loss_recovered"] == pytest.approx(a["loss_recovered"], rel=1e-3)
    assert b["fvu_spliced"] == pytest.approx(a["fvu_spliced"], rel=1e-5)
    assert {k: b[k] for k in ("n_sequences", "n_tokens_spliced", "n_tokens_predicted")} == \
        {k: a[k] for k in ("n_sequences", "n_tokens_spliced", "n_tokens_predicted")}


def test_transcoder_on_gemma2(tmp_path):
    """A transcoder on block 1's MLP (`harvest --pair mlp`) of Gemma 2 (post-norms,
    soft-capping): its prediction replaces the MLP output."""
    import jax

    from sae_jax.config import make_config
    from sae_jax.training.train import train

    corpus = write_corpus(tmp_path / "corpus.txt")
    store, run = harvest(tmp_path, "gemma2", 1, corpus, "--pair", "mlp"), tmp_path / "run"
    cfg = make_config(list(TRAIN))
    train(cfg, store, run, progress=False, devices=jax.devices()[:1])
    r = json_result(sae_jax_cli("eval", run, store, "--fidelity-sequences", N_SEQ,
                                "--corpus", corpus))
    lm = r["lm_loss"]
    assert lm["site"] == "mlp" and lm["layer"] == 1 and r["loss_recovered"] is not None
    check_arithmetic(lm)

    # A cross-layer transcoder on the MLPs of blocks 0 and 1: both replaced at once.
    from sae_jax.analysis.loss_recovered import loss_recovered
    from sae_jax.data.store import open_store
    from sae_jax.lm.harvest import run_harvest
    from sae_jax.sae import load

    run_harvest(tmp_path / "clt", model=str(CAUSAL_FIXTURES / "gemma2"), layers=[0, 1],
                pair="mlp", max_tokens=3000, seq_len=32, corpus=corpus, progress=False)
    cfg = make_config([*TRAIN, "arch=clt_topk", "k=4"])
    train(cfg, tmp_path / "clt", tmp_path / "clt_run", progress=False,
          devices=jax.devices()[:1])
    lm = loss_recovered(load(tmp_path / "clt_run"), open_store(tmp_path / "clt"),
                        n_sequences=N_SEQ, corpus=corpus)
    assert lm["layer"] == [0, 1]
    check_arithmetic(lm)


def test_refusals(llama, synthetic_store):
    """Not a causal store: loss recovered says so; a causal store: MiniLM fidelity says so."""
    from sae_jax.analysis.fidelity import downstream_fidelity
    from sae_jax.analysis.loss_recovered import loss_recovered
    from sae_jax.data.store import open_store
    from sae_jax.lm.hooks import NOT_MODEL_BACKED
    from sae_jax.sae import load

    store, run, _, _ = llama
    sae = load(run)
    with pytest.raises(UserError, match=NOT_MODEL_BACKED):
        loss_recovered(sae, open_store(synthetic_store))
    with pytest.raises(UserError, match="comes from a causal LM"):
        downstream_fidelity(sae, open_store(store))
    with pytest.raises(UserError, match="--lm-batch"):
        loss_recovered(sae, open_store(store), batch_sequences=0)
    line = one_error_line(sae_jax_cli("eval", run, store, "--lm-batch", 0))
    assert "--lm-batch must be at least 1" in line
