"""A release policy (`policy.toml`): which numbers a bundle must reach to ship.

Every key is optional; a threshold that is absent is not checked. Top-level keys only:

| key | type | checks |
|---|---|---|
| `min_fidelity` | float | eval: MiniLM `fidelity.fidelity_recovered` >= |
| `min_loss_recovered` | float | eval: causal-LM `loss_recovered` >= |
| `max_dark_matter` | float | audit: `coverage.fvu`, the held-out variance left unexplained <= |
| `min_faithfulness_auc` | float | audit: `summary[score].auc` (vs the random control) >= |
| `min_faithfulness_auc_margin` | float | the same AUC minus 0.5 (chance) >= |
| `faithfulness_scores` | list of str | scores those two apply to (causal, explanatory) |
| `max_dead_frac` | float | eval: `dead_frac` <= |
| `max_poisoning_flags` | int | audit: `poisoning` flags not acknowledged <= (default 0) |
| `acknowledged_features` | list of int | flagged latent ids reviewed and accepted |
| `min_drift_pwmcc` | float | mean one-to-one decoder cosine with `--baseline`'s SAE >= |
| `drift_threshold` | float | decoder cosine that counts as the same feature (default 0.7) |
| `max_diff_exclusive_frac` | float | `--crosscoder` run: (A-only + B-only) / non-empty latents <= |
| `diff_shared_latents` | list of int | `--crosscoder` latents that must be classed shared |
| `allow_missing` | bool | a metric the bundle lacks is skipped instead of failing |

The poisoning check runs when either poisoning key is set; the diff checks when either diff
key is set (without them a `--crosscoder` run is reported, deciding nothing). Anything else
(an unknown key, a table, a wrong type) is refused in one line: a typo must not silently
drop a check from a release gate.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields

from sae_jax.analysis.audit_report import SUMMARY_SCORES
from sae_jax.analysis.matching import DEFAULT_THRESHOLD
from sae_jax.errors import UserError

DEFAULT_SCORES = ("causal", "explanatory")


@dataclass(frozen=True)
class Policy:
    """The thresholds of a `policy.toml` (module docstring); None: not checked."""

    min_fidelity: float | None = None
    min_loss_recovered: float | None = None
    max_dark_matter: float | None = None
    min_faithfulness_auc: float | None = None
    min_faithfulness_auc_margin: float | None = None
    faithfulness_scores: tuple[str, ...] = DEFAULT_SCORES
    max_dead_frac: float | None = None
    max_poisoning_flags: int | None = None
    acknowledged_features: tuple[int, ...] = ()
    min_drift_pwmcc: float | None = None
    drift_threshold: float = DEFAULT_THRESHOLD
    max_diff_exclusive_frac: float | None = None
    diff_shared_latents: tuple[int, ...] = ()
    allow_missing: bool = False

    @property
    def checks_poisoning(self) -> bool:
        return self.max_poisoning_flags is not None or bool(self.acknowledged_features)

    @property
    def checks_diff(self) -> bool:
        return self.max_diff_exclusive_frac is not None or bool(self.diff_shared_latents)

    @property
    def poisoning_limit(self) -> int:
        return 0 if self.max_poisoning_flags is None else self.max_poisoning_flags


FLOAT_KEYS = ("min_fidelity", "min_loss_recovered", "max_dark_matter", "min_faithfulness_auc",
              "min_faithfulness_auc_margin", "max_dead_frac", "min_drift_pwmcc",
              "drift_threshold", "max_diff_exclusive_frac")


def _float(where: str, key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise UserError(f"{where}: {key} must be a finite number, got {v!r}")
    return float(v)


def _int_list(where: str, key: str, v) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                          and i >= 0 for i in v):
        raise UserError(f"{where}: {key} must be a list of feature ids (integers >= 0), got "
                        f"{v!r}")
    return tuple(v)


def parse_policy(values: dict, where: str = "policy") -> Policy:
    """A `Policy` from the parsed TOML table, every key and type checked (module docstring)."""
    known = [f.name for f in fields(Policy)]
    for key in values:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    out = {}
    for key, v in values.items():
        if key in FLOAT_KEYS:
            out[key] = _float(where, key, v)
        elif key == "max_poisoning_flags":
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{where}: {key} must be an integer >= 0, got {v!r}")
            out[key] = v
        elif key in ("acknowledged_features", "diff_shared_latents"):
            out[key] = _int_list(where, key, v)
        elif key == "faithfulness_scores":
            if (not isinstance(v, list) or not v
                    or not all(isinstance(s, str) and s in SUMMARY_SCORES for s in v)):
                raise UserError(f"{where}: {key} must be a non-empty list of audit scores "
                                f"({', '.join(SUMMARY_SCORES)}), got {v!r}")
            out[key] = tuple(dict.fromkeys(v))
        elif key == "allow_missing":
            if not isinstance(v, bool):
                raise UserError(f"{where}: {key} must be true or false, got {v!r}")
            out[key] = v
    if "min_faithfulness_auc" in out and "min_faithfulness_auc_margin" in out:
        raise UserError(f"{where}: set min_faithfulness_auc or min_faithfulness_auc_margin, "
                        "not both (margin = AUC - 0.5)")
    if not 0 < out.get("drift_threshold", DEFAULT_THRESHOLD) <= 1:
        raise UserError(f"{where}: drift_threshold must be in (0, 1], got "
                        f"{out['drift_threshold']}")
    if not 0 <= out.get("max_diff_exclusive_frac", 0) <= 1:
        raise UserError(f"{where}: max_diff_exclusive_frac must be in [0, 1], got "
                        f"{out['max_diff_exclusive_frac']}")
    return Policy(**out)


def read_policy(path: str | os.PathLike) -> Policy:
    """Reads and checks a `policy.toml` (stdlib `tomllib`: a file of data, never code)."""
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"no policy file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the policy {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    return parse_policy(values, str(path))
