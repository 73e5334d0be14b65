"""experiments/synthetic_bench.py end to end at its `--small` size: the data goes through
`sae-jax import`, training through `sae-jax train`, and a TopK SAE recovers the truth far
better than a random dictionary and beats both of its random baselines."""

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
    pw = {"topk": {"mean": 0.9, "half_width": 0.05}}
    assert f"| topk | 2.333 ± {half:.3f} |" in bench.table(summary, 0.3, 3, pw)
    assert bench.table(summary, 0.3, 3, pw).splitlines()[2].endswith("| 0.900 ± 0.050 |")
    one = bench.summarise({"topk": runs[:1]})
    assert "| topk | 1.000 | 1.000 |" in bench.table(one, 0.3, 1, {"topk": {"mean": None}})


def test_the_margin_table_shows_baseline_values_and_signed_margins():
    bench = _bench()
    base = [{"random_init": {"mcc": 0.3, "f1": 0.1, "fvu": 1.2}}] * 2
    margin = [{"random_init": {"mcc": m, "f1": 0.4, "fvu": 1.0}} for m in (0.5, 0.7)]
    half = stats.t.ppf(0.975, 1) * np.std([0.5, 0.7], ddof=1) / np.sqrt(2)
    md = bench.margin_table(bench.summarise_by_baseline({"topk": base}),
                            bench.summarise_by_baseline({"topk": margin}), 2)
    assert (f"| topk | random_init | 0.300 ± 0.000 | 0.100 ± 0.000 | 1.200 ± 0.000 | "
            f"+0.600 ± {half:.3f} | +0.400 ± 0.000 | +1.000 ± 0.000 |") in md.splitlines()


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
    for name in ("random_directions", "random_init"):  # same rows, same score_sae
        assert len(result["baseline_runs"]["topk"]) == 2
        for metric in ("mcc", "f1"):
            margin = result["margins"]["topk"][name][metric]
            assert margin["mean"] > 0.1 and min(margin["per_run"]) > 0, (name, metric)
        assert result["baselines"]["topk"][name]["mcc"]["mean"] < topk["mcc"] - 0.25
    assert 0 < result["pw_mcc"]["topk"]["mean"] <= 1
    assert len(result["pw_mcc"]["topk"]["pairs"]) == 1
    assert "| topk | random_directions |" in (out / "bench.md").read_text()
