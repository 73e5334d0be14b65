"""Checks `sae-jax export` against the real SAELens (run by hand; the test suite uses a
numpy re-implementation of SAELens's math and never imports torch).

    # 1. in this project's venv: train tiny SAEs on inputs scaled x37 (so the input-scale
    #    folding matters), export them, and save our features/reconstructions
    python experiments/saelens_check.py export /tmp/slx
    # 2. in a scratch venv: pip install torch==2.13.0 sae-lens   (torch 2.13.0 = the local
    #    CPU wheel; plain `torch` pulls a CUDA build)
    python experiments/saelens_check.py check /tmp/slx

Result (2026-11-23, sae-lens 6.54.12, torch 2.13.0+cpu): every architecture loads with
`SAE.load_from_disk` (relu -> StandardSAE, jumprelu, batchtopk and matryoshka ->
JumpReLUSAE, topk -> TopKSAE; transcoders: relu -> Transcoder, batchtopk + skip ->
JumpReLUSkipTranscoder, matryoshka -> JumpReLUTranscoder); on raw activations features match
to <= 1e-6 and reconstructions to <= 2.3e-5 at magnitudes ~100 (transcoders, with the skip
path: <= 7.6e-6 at ~40), with identical supports.
"""

import shutil
import sys

import numpy as np

ARCHS = ("relu", "jumprelu", "topk", "batchtopk", "matryoshka")
# Transcoders: name -> (arch, skip_connection); SAELens has no TopK transcoder.
TRANSCODERS = {"tc_relu": ("relu", False), "tc_batchtopk_skip": ("batchtopk", True),
               "tc_matryoshka": ("matryoshka", False)}


def _pair_store(root: str, rows: np.ndarray) -> str:
    """A transcoder store: input x (scale x37) and target = a sparse map of x (scale x5)."""
    from sae_jax.data.store import StoreWriter

    rng = np.random.default_rng(2)
    mix = rng.normal(size=(rows.shape[1], 24)) * (rng.random((rows.shape[1], 24)) < 0.2)
    target = np.maximum(rows / 37, 0) @ mix * 5
    path = f"{root}/pairs"
    shutil.rmtree(path, ignore_errors=True)
    with StoreWriter(path, d_in=rows.shape[1] + 24,
                     meta={"pair": {"d_in": rows.shape[1], "d_out": 24}}) as w:
        w.append(np.concatenate([rows, target], axis=1).astype(np.float32))
    return path


def export(root: str) -> None:
    import sae_jax
    from sae_jax.config import make_config
    from sae_jax.data.importers import import_activations
    from sae_jax.data.synthetic import sparse_dictionary_data
    from sae_jax.saelens import export_saelens
    from sae_jax.training.train import train

    rows = sparse_dictionary_data(20000, 32, 64, seed=1)[0] * 37
    np.save(f"{root}/x.npy", rows)
    np.save(f"{root}/x200.npy", rows[:200])
    shutil.rmtree(f"{root}/store", ignore_errors=True)
    import_activations(f"{root}/x.npy", f"{root}/store")
    pairs = _pair_store(root, rows)
    cases = {a: (a, False, f"{root}/store") for a in ARCHS}
    cases.update({k: (a, skip, pairs) for k, (a, skip) in TRANSCODERS.items()})
    for name, (arch, skip, store) in cases.items():
        run, out = f"{root}/run_{name}", f"{root}/export_{name}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        train(make_config(arch=arch, width=64, k=4, steps=200, batch_size=256,
                          matryoshka_widths=(8, 32) if arch == "matryoshka" else None,
                          skip_connection=skip), store, run, progress=False)
        export_saelens(run, out)
        sae = sae_jax.load(run)
        f = np.asarray(sae.encode(rows[:200]))
        np.save(f"{out}/feats.npy", f)
        np.save(f"{out}/recon.npy", np.asarray(sae(rows[:200])))


def check(root: str) -> None:
    import torch
    from sae_lens import SAE

    x = torch.tensor(np.load(f"{root}/x200.npy"))
    for name in (*ARCHS, *TRANSCODERS):
        out = f"{root}/export_{name}"
        sae = SAE.load_from_disk(out, device="cpu")
        with torch.no_grad():
            f = sae.encode(x)
            r = sae.forward(x) if name in TRANSCODERS else sae.decode(f)
        ours_f, ours_r = np.load(f"{out}/feats.npy"), np.load(f"{out}/recon.npy")
        print(f"{name}: {type(sae).__name__} feats max diff "
              f"{np.abs(f.numpy() - ours_f).max():.2e}, recon max diff "
              f"{np.abs(r.numpy() - ours_r).max():.2e} (|recon| <= "
              f"{np.abs(ours_r).max():.0f}), support mismatches "
              f"{int(((f.numpy() > 0) != (ours_f > 0)).sum())}")


if __name__ == "__main__":
    {"export": export, "check": check}[sys.argv[1]](sys.argv[2])
