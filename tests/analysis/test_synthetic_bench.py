"""experiments/synthetic_bench.py end to end at its `--small` size: the data goes through
`sae-jax import`, training through `sae-jax train`, and a TopK SAE recovers the truth far
better than a random dictionary."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats


def _bench():
    name = "synthetic_bench"
    if name not in sys.modules:
        path = Path(__file__).parents[2] / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_mean_ci_is_the_student_t_interval():
    mean, half = _bench().mean_ci([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * np.std([1, 2, 4], ddof=1) / np.sqrt(3))
    assert _bench().mean_ci([1.0]) == (1.0, None)


@pytest.mark.entry
def test_small_benchmark_runs_and_topk_beats_a_random_dictionary(tmp_path):
    out = tmp_path / "bench"
    result = _bench().main(["--small", "--out", str(out), "--seeds", "0",
                            "--archs", "topk,batchtopk"])
    assert json.loads((out / "bench.json").read_text())["summary"] == result["summary"]
    assert "| topk |" in (out / "bench.md").read_text()
    topk = result["runs"]["topk"][0]
    assert topk["mcc"] > result["random_dictionary_mcc"] + 0.25
    assert topk["f1"] > 0.3 and topk["l0"] == pytest.approx(3.0, abs=0.1)
    assert result["data_stats"]["orphan_child_fires"] == 0
    assert set(result["summary"]) == {"topk", "batchtopk"}
