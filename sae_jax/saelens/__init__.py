"""SAELens 6.x folders: `export_saelens(RUN_DIR, OUT_DIR)` and `import_saelens(SAE_DIR, RUN_DIR)`;
for what SAELens cannot load (crosscoders, CLTs), sae_jax's own layout of the same two files:
`export_native(RUN_DIR, OUT_DIR)`, read back by `sae_jax.load(OUT_DIR)` and `import_saelens`
(`saelens.native`). `export_run` is `sae-jax export`, choosing between them.

An export is a folder `SAE.load_from_disk` opens: `cfg.json` plus `sae_weights.safetensors`
(float32 `W_enc (d_in, d_sae)`, `b_enc (d_sae,)`, `W_dec (d_sae, d_in)`, `b_dec (d_in,)`, and
`threshold (d_sae,)` for jumprelu), and `feature_catalog.json` when the run has one.

Folding the input scale c (`sae_jax` multiplies raw x by c before encoding, divides after
decoding; SAELens takes raw x with `normalize_activations: "none"`). Ours, with W, b_e, W_d,
b the stored params:

    pre   = (c·x − b) @ W + b_e          x̂ = (f @ W_d + b) / c

SAELens (`apply_b_dec_to_input: true`):  pre' = (x − b') @ W' + b_e',  x̂' = f @ W_d' + b'.
With W' = c·W, b' = b / c, b_e' = b_e, W_d' = W_d / c:

    pre' = (x − b/c) @ (c·W) + b_e = (c·x − b) @ W + b_e = pre
    x̂'   = f @ W_d / c + b / c = x̂

(SAELens's own rule, `W_enc *= c; W_dec /= c; b_dec /= c`, with b_enc unchanged.) Since
pre' = pre, everything in pre-activation units is unchanged: the jumprelu threshold
exp(log_threshold), the batchtopk threshold, and topk's ranking; f itself is unchanged, so
SAELens's `encode` returns our features.
TopK is exported with `rescale_acts_by_decoder_norm: false`: the folded decoder rows have norm
1/c, and with rescaling on SAELens would return f/c from `encode` (decode would still agree).

Architectures: relu -> "standard"; jumprelu -> "jumprelu" with `threshold = exp(log_threshold)`
(our f = h·H(h−θ) equals SAELens's ReLU(h)·H(h−θ) because θ > 0); topk -> "topk" (top-k of
the signed pre-activations, then ReLU, in both); batchtopk -> "jumprelu" with every threshold
equal to our scalar inference threshold (our f = ReLU(h)·H(h−θ), SAELens's formula exactly,
for any sign of θ), as SAELens exports its own BatchTopK. `metadata.training_architecture`
names the SAELens-style training architecture (standard/jumprelu/topk/batchtopk); sae_jax's
own arch, input scale, step and config are under `metadata.training_architecture_details`.

Matryoshka BatchTopK is exported like BatchTopK, as "jumprelu" with its scalar threshold (as
SAELens saves its own `matryoshka_batchtopk`). Transcoders (`apply_b_dec_to_input: false`,
`d_out`) become "transcoder" / "skip_transcoder" (relu) or "jumprelu_transcoder" /
"jumprelu_skip_transcoder" (jumprelu, batchtopk, matryoshka); the target scale c_t folds into
the decoder (W_d / c_t, b / c_t) and the skip map (W_skip · c / c_t). SAELens has no TopK
transcoder, so exporting one is refused with a hint.

Import reverses this into a new run directory (input_scale 1.0, step 0, an Orbax checkpoint
of the params alone: the run loads, evaluates and exports, but has no optimizer state to resume
training from). SAELens variants are folded into our form exactly:
`apply_b_dec_to_input: false` (h = x @ W + b_e) becomes b_e' = b_e + b_dec @ W; topk with
`rescale_acts_by_decoder_norm: true` (rank h·n, decode f/n, n = ‖W_dec_i‖) becomes W_enc·n,
b_enc·n, W_dec/n (SAELens's `_fold_norm_topk`); a jumprelu threshold θ becomes
log_threshold = log(max(θ, tiny)) (θ ≤ 0, which SAELens treats as plain ReLU, becomes the
smallest normal float32, so f differs only for 0 < h ≤ 1.2e-38); a jumprelu whose
`metadata.training_architecture` is "batchtopk" or "matryoshka_batchtopk" and whose thresholds
are all equal comes back as our batchtopk (a Matryoshka SAE's inference is BatchTopK's).
Weights are rounded to cfg.json's `dtype` (as SAELens casts them) and then computed in
float32.
"""

from sae_jax.data.safetensors_io import read_safetensors
from sae_jax.saelens.export import (
    export_native,
    export_run,
    export_saelens,
    saelens_cfg,
    saelens_tensors,
)
from sae_jax.saelens.import_sae import import_saelens, load_saelens

__all__ = ["export_native", "export_run", "export_saelens", "import_saelens", "load_saelens",
           "read_safetensors", "saelens_cfg", "saelens_tensors"]
