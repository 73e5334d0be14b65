"""Reading a local Hugging Face model folder: `config.json`, the weights (one
`model.safetensors` or a sharded `model.safetensors.index.json`) and `tokenizer.json`.

No torch, no transformers and no network: weights are memory-mapped with our own
safetensors reader, so a many-GB checkpoint is read one tensor at a time as it is placed on
the devices. Only `.safetensors` is read: `pytorch_model.bin` is a pickle, and files users
hand us are data, never code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sae_jax.data.safetensors_io import read_header, read_tensor
from sae_jax.errors import UserError
from sae_jax.files import file_sha256

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(folder: str | Path) -> dict:
    """`config.json` of a model folder, as a dict."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist (give a local Hugging Face "
                        "folder with config.json, *.safetensors and tokenizer.json)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder") \
            from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def weight_files(folder: str | Path) -> list[Path]:
    """The `.safetensors` files holding the weights, in a stable order."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {folder / INDEX}: {e}") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    hint = " (pytorch_model.bin is a pickle, which is never read)" if any(
        folder.glob("*.bin")) else ""
    raise UserError(f"{folder} holds no .safetensors weights{hint}")


def read_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's weight files, memory-mapped (nothing is read yet)."""
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise UserError(f"weight file {path} named by {INDEX} is missing")
        header, offset = read_header(path)
        for name in header:
            tensors[name] = read_tensor(path, name, header, offset)
    return tensors


def weights_sha256(folder: str | Path) -> dict[str, str]:
    """SHA-256 of each weight file: the model's identity in store metadata and provenance."""
    return {path.name: file_sha256(path) for path in weight_files(folder)}


def load_tokenizer(folder: str | Path):
    """The folder's `tokenizer.json` as a `tokenizers.Tokenizer`, padding and truncation off."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for a missing/bad file
        raise UserError(f"cannot load the tokenizer {path}: {e}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
