"""experiments/synthetic_bench.py end to end at its `--small` size: the data goes through
`sae-jax import`, training through `sae-jax train`, and a TopK SAE recovers the truth far
better than a random dictionary."""

import json

import numpy as np
import pytest
from conftest import experiment
from scipy import stats


def _bench():
    return experiment("synthetic_bench")


def test_the_table_shows_mean_and_student_t_half_width():
    bench = _bench()
    keys = bench.METRICS + tuple(f"{m}_{k}" for m in ("mcc", "f1") for k in bench.KINDS)
    runs = [{k: v for k in keys} for v in (1.0, 2.0, 4.0)]
    summary = bench.summarise({"topk": runs})
    half = stats.t.ppf(0.975, 2) * np.std([1, 2, 4], ddof=1) / np.sqrt(3)
    assert summary["topk"]["mcc"]["half_width"] == pytest.approx(half)
    assert f"| topk | 2.333 ± {half:.3f} |" in bench.table(summary, 0.3, 3)
    one = bench.summarise({"topk": runs[:1]})
    assert "| topk | 1.000 | 1.000 |" in bench.table(one, 0.3, 1)


@pytest.mark.entry
def test_small_benchmark_runs_and_topk_beats_a_random_dictionary(tmp_path):
    out = tmp_path / "bench"
    result = _bench().main(["--small", "--out", str(out), "--seeds", "0,1",
                            "--archs", "topk,batchtopk"])
    assert json.loads((out / "bench.json").read_text())["summary"] == result["summary"]
    assert "| topk |" in (out / "bench.md").read_text()
    assert len(result["runs"]["topk"]) == 2  # seeds 0 and 1, trained in the same pass
    for topk in result["runs"]["topk"]:
        assert topk["mcc"] > result["random_dictionary_mcc"] + 0.25
        assert topk["f1"] > 0.3 and topk["l0"] == pytest.approx(3.0, abs=0.1)
    assert result["summary"]["topk"]["mcc"]["half_width"] is not None
    assert result["data_stats"]["orphan_child_fires"] == 0
    assert set(result["summary"]) == {"topk", "batchtopk"}
