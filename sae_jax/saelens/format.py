"""SAELens 6.x's folder format: file names and architecture names, shared by export and import."""

from __future__ import annotations

import ml_dtypes
import numpy as np

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
CATALOG_FILE = "feature_catalog.json"
SAELENS_VERSION = "6.0.0"
NATIVE_FORMAT = "sae_jax"  # cfg.json's "format" in sae_jax's own layout (`saelens.native`)

EXPORT_ARCH = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk",
               "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
TRAINING_ARCH = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk",
                 "batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}
THRESHOLD_ARCHS = ("batchtopk", "matryoshka")  # one scalar inference threshold
# Transcoders: (inference form, with skip connection). SAELens has no TopK transcoder.
TRANSCODER_ARCH = {"standard": ("transcoder", "skip_transcoder"),
                   "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}
IMPORT_ARCH = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
BASE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
CFG_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
              "bfloat16": ml_dtypes.bfloat16}  # SAELens's DTYPE_MAP (constants.py)
