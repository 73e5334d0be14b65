"""`sae-jax cost`: what an SAE run will cost on a TPU slice or GPU node, before launching it.

    sae-jax cost --d-model 4096 --width 35651584 --tokens 8e9 --accelerator v5p-256

Definitions (every number `estimate_cost` returns):

* **FLOPs per token** of one train step, counted analytically as executed (the one formula,
  also used by `sae-jax bench`): a dense SAE step is 10·d·F (encoder forward 2dF, decoder
  forward 2dF, decoder backward 2dF for W_dec and 2dF for f, encoder backward 2dF for W_enc;
  b_dec's gradient through the encoder input x − b_dec is one mat-vec,
  `saes.common.centered_matmul`, where it was a 2dF matmul before). The sparse TopK step
  (`saes.sparse`, used by arch=topk only when the dictionary is not split, i.e. the mesh's
  model axis is 1) runs only the encoder forward densely: 2dF + 10dk. Elementwise work,
  top-k and the optimizer are not counted.
  **Run FLOPs** = FLOPs per token × tokens.
* **Time** = run FLOPs / (chips × bf16 peak per chip × MFU); **chip-hours** = time × chips.
  The default MFU, 0.5, is what Gemma Scope reports for its TPU SAE training, and about what
  the dense step reaches of the matmul peak on CPU here (48–54 % counted as 10dF, so 58–65 %
  as executed; docs/benchmarks.md). The sparse TopK step is bound by its gathers rather than
  the MXU, so its time at that MFU is optimistic (on CPU it ran at 21 % of the peak, counted
  this way).
* **Memory per chip** under the dictionary sharding (W_enc/W_dec split over the mesh's
  `model` axis, the batch over `data`): params + Adam moments at 12 bytes per weight
  (`mesh.STATE_BYTES_PER_WEIGHT`, the figure `auto_mesh_spec` and docs/sharding-and-tpu.md
  "Memory at scale" use) and
  f32 gradients at 4, over 2·d·F/model weights; plus the step's temporaries, calibrated
  against XLA's memory analysis of the compiled f32 step (`bench.step_memory`: −14 % to
  +18 % over 48 sizes, meshes and architectures on 8 CPU devices; tested). On the dense
  path they are max(one more param-sized f32 buffer for the Adam update, c f32
  (batch/data, F/model) activations), c = 3 for relu and 6 for the other architectures;
  on the sparse TopK path 2.5 param-sized f32 buffers plus 1.5 f32 (batch, F)
  activations; plus the f32 input batch twice (raw and scaled). bf16 compute keeps some
  activations in bf16, so on TPU this errs high. **Fits** = total ≤ 90 % of HBM (XLA's
  own buffers, fragmentation and this estimate's error take the rest).
* **Mesh**: `--mesh` if given; otherwise the mesh `sae-jax train` picks by default
  (`mesh.auto_mesh_spec`: data parallel unless params + Adam exceed 30 % of HBM) if it
  fits, else the smallest power-of-two model axis that fits (to be passed to `train` as
  `mesh=...`), else every usable chip on `model` (flagged as not fitting).
  **Max batch size** = the largest global batch that fits on that mesh.
* **Accelerator names** follow Cloud TPU's `--accelerator-type`: `v5e-256` and `v6e-256`
  count chips (one TensorCore each); `v4-64` and `v5p-128` count TensorCores, two per chip
  (so 32 and 64 chips); `h100-8` and `a100-8` count GPUs.
* **From a fit** (`--from-fit FIT.json` with `--budget-flops C` or `--budget-hours H`, which
  buys C = H × 3600 × chips × peak × MFU): the compute-optimal width F*(C) of the fitted
  power law (rounded to a multiple of lcm(256, chips) so every mesh splits it), the fitted
  optimal steps S*(C), the predicted loss L(C), and the cost of the run that spends C on
  F* features, i.e. C / (FLOPs per token at F*) tokens.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from sae_jax.errors import UserError

GIB = 2**30
DEFAULT_MFU = 0.5
HBM_USABLE_FRACTION = 0.9
F32 = 4
GRAD_BYTES_PER_WEIGHT = F32
DENSE_ACTIVATION_COPIES = {"relu": 3.0}
"""f32 (batch/data, F/model) temporaries of the dense step, per architecture (default 6):
relu keeps pre-activations, codes and their gradient; the others also a mask or top-k
buffers. Calibrated on XLA:CPU's memory analysis (module docstring)."""
DEFAULT_ACTIVATION_COPIES = 6.0
SPARSE_PARAM_COPIES = 2.5
SPARSE_ACTIVATION_COPIES = 1.5
WIDTH_GRANULE = 256


@dataclass(frozen=True)
class Accelerator:
    """One accelerator generation: per-chip bf16 dense peak and HBM, from the vendor."""

    name: str
    peak_flops: float
    """bf16 dense peak FLOP/s of one chip (no structured sparsity)."""
    hbm_bytes: float
    """HBM of one chip, in the unit its spec page states."""
    cores_per_chip: int
    """How many units of the accelerator-type suffix one chip is (TPU v4/v5p: 2 TensorCores)."""
    source: str


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a for a in (
        # "Peak compute per chip 275 teraflops (bf16 or int8)", "32 GiB", two TensorCores/chip.
        Accelerator("v4", 275e12, 32 * GIB, 2, "https://cloud.google.com/tpu/docs/v4"),
        # "Peak compute per chip (bf16) 197 TFLOPs", "HBM2 capacity 16 GB", one TensorCore.
        Accelerator("v5e", 197e12, 16e9, 1, "https://cloud.google.com/tpu/docs/v5e"),
        # "Peak compute per chip (bf16) 459 TFLOPs", "HBM2e capacity 95GB"; v5p-128 =
        # topology 4x4x4 = 128 cores = 64 chips (the page's slice table).
        Accelerator("v5p", 459e12, 95e9, 2, "https://cloud.google.com/tpu/docs/v5p"),
        # Trillium: "Peak compute per chip (bf16) 918 TFLOPs", "HBM capacity per chip 32 GB".
        Accelerator("v6e", 918e12, 32e9, 1, "https://cloud.google.com/tpu/docs/v6e"),
        # H100 SXM: BF16 Tensor Core 1,979 TFLOPS *with sparsity*, i.e. 989 dense; 80 GB.
        Accelerator("h100", 989e12, 80e9, 1, "https://www.nvidia.com/en-us/data-center/h100/"),
        # A100 SXM 80GB: BF16 Tensor Core 312 TFLOPS dense; 80 GB HBM2e.
        Accelerator("a100", 312e12, 80e9, 1,
                    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    )
}
ALIASES = {"v5litepod": "v5e", "trillium": "v6e"}


def parse_accelerator(spec: str) -> tuple[Accelerator, int]:
    """`v5p-128` -> (the v5p record, 64 chips); see the module docstring for the suffix."""
    name, sep, count = str(spec).strip().lower().rpartition("-")
    name = ALIASES.get(name, name)
    known = ", ".join(f"{n}-N" for n in ACCELERATORS)
    if not sep or name not in ACCELERATORS:
        raise UserError(f"unknown accelerator {spec!r}; expected one of {known} "
                        "(e.g. v5p-128, v5e-256, h100-8)")
    acc = ACCELERATORS[name]
    if not count.isdigit() or int(count) < 1 or int(count) % acc.cores_per_chip:
        unit = "TensorCores (2 per chip)" if acc.cores_per_chip == 2 else "chips"
        raise UserError(f"bad accelerator {spec!r}: the suffix counts {unit}; expected a "
                        f"positive multiple of {acc.cores_per_chip}")
    return acc, int(count) // acc.cores_per_chip


# ----------------------------------------------------------------------------- FLOPs


def step_flops_per_token(arch: str, d_in: int, width: int, k: int, sparse: bool,
                         inner_levels: int | None = None, transcoder: bool = False,
                         centre_grad_matmul: bool = False) -> int:
    """Executed matmul FLOPs per token of one train step (module docstring).

    A dense SAE step is 10·d·F: encoder forward 2dF; decoder forward 2dF; decoder backward
    2dF for W_dec and 2dF for f; encoder backward 2dF for W_enc. b_dec's gradient through
    the encoder input x − b_dec costs a mat-vec (`saes.common.centered_matmul`). (XLA's own
    cost analysis of the compiled step agrees within 2 %: `tests/test_cli.py`.)

    Args:
      sparse: whether the sparse TopK step runs (`arch == "topk"` and an unsplit
        dictionary); ignored for other architectures, which always run densely.
      inner_levels: matryoshka only: prefixes besides the full width, each one more
        decoder matmul forward and two backward (+6dF); default 2 (the default levels).
      transcoder: the encoder does not centre with b_dec.
      centre_grad_matmul: the step built under `saes.common.baseline()`, where b_dec's
        encoder gradient is a (batch, F) × (F, d) matmul: +2dF unless a transcoder.
    """
    if sparse and arch == "topk":
        return 2 * d_in * width + 10 * d_in * k
    extra = (2 if inner_levels is None else inner_levels) if arch == "matryoshka" else 0
    centre = 2 if centre_grad_matmul and not transcoder else 0
    return (10 + centre + 6 * extra) * d_in * width


def sparse_step_applies(arch: str, model_axis: int) -> bool:
    """Mirror of `saes.sparse.usable`: TopK runs sparsely only on an unsplit dictionary."""
    return arch == "topk" and model_axis == 1


def run_flops(arch: str, d_in: int, width: int, k: int, tokens: float, sparse: bool) -> float:
    """Training FLOPs of a run: `step_flops_per_token` × tokens."""
    return float(step_flops_per_token(arch, d_in, width, k, sparse)) * tokens


# ----------------------------------------------------------------------------- memory


def memory_per_chip(d_in: int, width: int, batch_size: int, data: int, model: int,
                    arch: str = "topk") -> dict:
    """Estimated bytes per chip of the train step on a `data:D,model:M` mesh.

    Returns:
      `{"state_bytes", "grad_bytes", "temp_bytes", "batch_bytes", "total_bytes"}` (module
      docstring); state = params + Adam moments.
    """
    from sae_jax.mesh import STATE_BYTES_PER_WEIGHT

    weights = 2 * d_in * width / model
    rows, cols = batch_size / data, width / model
    if sparse_step_applies(arch, model):
        temp = (SPARSE_PARAM_COPIES * F32 * weights
                + SPARSE_ACTIVATION_COPIES * F32 * rows * cols)
    else:
        copies = DENSE_ACTIVATION_COPIES.get(arch, DEFAULT_ACTIVATION_COPIES)
        temp = max(F32 * weights, copies * F32 * rows * cols)
    parts = {"state_bytes": STATE_BYTES_PER_WEIGHT * weights,
             "grad_bytes": GRAD_BYTES_PER_WEIGHT * weights,
             "temp_bytes": temp, "batch_bytes": 2 * F32 * rows * d_in}
    return {**{k: float(v) for k, v in parts.items()}, "total_bytes": float(sum(parts.values()))}


def _fits(memory: dict, hbm: float) -> bool:
    return memory["total_bytes"] <= HBM_USABLE_FRACTION * hbm


def max_batch_size(d_in: int, width: int, data: int, model: int, arch: str, hbm: float) -> int:
    """The largest global batch (a multiple of `data`) whose step fits, 0 if none does."""
    def fits(rows: int) -> bool:
        return _fits(memory_per_chip(d_in, width, rows * data, data, model, arch), hbm)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 2**40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # memory grows with the batch: bisect on rows per data shard
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * data


def _model_axes(chips: int, width: int) -> list[int]:
    """Power-of-two model-axis sizes that split both the chips and the dictionary."""
    sizes, m = [], 1
    while m <= chips:
        if chips % m == 0 and width % m == 0:
            sizes.append(m)
        m *= 2
    return sizes


def choose_mesh(chips: int, d_in: int, width: int, batch_size: int, arch: str, hbm: float,
                mesh: str | None = None) -> tuple[dict[str, int], str]:
    """The mesh the estimate assumes and why (module docstring, "Mesh")."""
    from sae_jax.mesh import auto_mesh_spec, parse_mesh

    if mesh:
        return parse_mesh(mesh, chips), "given (--mesh)"
    try:
        auto = parse_mesh(auto_mesh_spec(chips, d_in, width, hbm), chips)
    except UserError:
        auto = None
    if auto and _fits(memory_per_chip(d_in, width, batch_size, auto["data"], auto["model"],
                                      arch), hbm):
        return auto, "auto (what `sae-jax train` picks without mesh=)"
    axes = _model_axes(chips, width)
    for model in axes:
        if _fits(memory_per_chip(d_in, width, batch_size, chips // model, model, arch), hbm):
            why = ("the train default refuses (params + Adam > 30% of HBM)" if auto is None
                   else "the train default does not fit")
            return ({"data": chips // model, "model": model},
                    f"smallest model axis that fits; {why}: pass mesh=data:{chips // model},"
                    f"model:{model} to train")
    model = axes[-1]
    return {"data": chips // model, "model": model}, "largest model axis; does NOT fit"


# ----------------------------------------------------------------------------- estimate


def _positive(name: str, value) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be positive, got {value!r}")


def estimate_cost(d_model: int, width: int, tokens: float, accelerator: str,
                  arch: str = "topk", k: int | None = None, batch_size: int | None = None,
                  mfu: float = DEFAULT_MFU, mesh: str | None = None) -> dict:
    """FLOPs, time and memory per chip of one SAE run (module docstring).

    Args:
      d_model: activation width d.
      width: dictionary features F.
      tokens: training tokens (rows).
      accelerator: e.g. `v5p-128`, `v5e-256`, `h100-8`.
      arch: SAE architecture (only topk can take the sparse step).
      k: active features (topk/batchtopk; default the train default, 32).
      batch_size: global batch in tokens (default the train default, 4096).
      mfu: achieved fraction of the bf16 peak, in (0, 1].
      mesh: `data:D,model:M` to assume instead of choosing one.

    Returns:
      A JSON-able dict; `format_cost_table` renders it.
    """
    from sae_jax.config import TrainConfig
    from sae_jax.saes import ARCHITECTURES

    defaults = TrainConfig.__dataclass_fields__
    k = defaults["k"].default if k is None else k
    batch_size = defaults["batch_size"].default if batch_size is None else batch_size
    for name, value in (("--d-model", d_model), ("--width", width), ("--tokens", tokens),
                        ("--batch-size", batch_size), ("--k", k), ("--mfu", mfu)):
        _positive(name, value)
    if mfu > 1:
        raise UserError(f"--mfu is a fraction of the peak in (0, 1], got {mfu}")
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if k > width:
        raise UserError(f"--k {k} must be <= --width {width}")
    acc, chips = parse_accelerator(accelerator)
    sizes, mesh_rule = choose_mesh(chips, d_model, width, batch_size, arch, acc.hbm_bytes, mesh)
    sparse = sparse_step_applies(arch, sizes["model"])
    per_token = step_flops_per_token(arch, d_model, width, k, sparse)
    flops = float(per_token) * tokens
    seconds = flops / (chips * acc.peak_flops * mfu)
    memory = memory_per_chip(d_model, width, batch_size, sizes["data"], sizes["model"], arch)
    notes = []
    if batch_size % sizes["data"]:
        notes.append(f"batch size {batch_size} is not divisible by the data axis "
                     f"({sizes['data']}); train will refuse it")
    if sparse:
        notes.append("sparse TopK step: gather-bound, so the time at this MFU is optimistic")
    fits = _fits(memory, acc.hbm_bytes)
    largest = max_batch_size(d_model, width, sizes["data"], sizes["model"], arch, acc.hbm_bytes)
    if not fits and largest:
        notes.append(f"does NOT fit in HBM at batch {batch_size}; the largest batch that fits "
                     f"on this mesh is {largest}")
    elif not fits:
        floor = memory_per_chip(d_model, width, sizes["data"], sizes["data"], sizes["model"],
                                arch)["total_bytes"] / GIB
        notes.append(f"does NOT fit in HBM at any batch size: params, Adam, gradients and "
                     f"the update alone take {floor:.1f} GiB per chip of the "
                     f"{HBM_USABLE_FRACTION * acc.hbm_bytes / GIB:.1f} GiB usable; use more "
                     "chips")
    return {
        "arch": arch, "d_model": int(d_model), "width": int(width),
        "k": int(k) if arch in ("topk", "batchtopk", "matryoshka") else None,
        "tokens": float(tokens), "batch_size": int(batch_size),
        "steps": math.ceil(tokens / batch_size),
        "accelerator": str(accelerator), "generation": acc.name, "chips": chips,
        "peak_flops_per_chip": acc.peak_flops, "hbm_bytes_per_chip": acc.hbm_bytes,
        "source": acc.source, "mfu": mfu,
        "flop_count": ("sparse TopK: 2dF + 10dk per token" if sparse
                       else "dense: 10dF per token"),
        "flops_per_token": int(per_token), "flops": flops, "seconds": seconds,
        "wall_hours": seconds / 3600, "chip_hours": seconds / 3600 * chips,
        "mesh": f"data:{sizes['data']},model:{sizes['model']}", "mesh_rule": mesh_rule,
        "memory": {**memory, "hbm_bytes": acc.hbm_bytes,
                   "fraction_of_hbm": memory["total_bytes"] / acc.hbm_bytes, "fits": fits},
        "max_batch_size": largest,
        "notes": notes,
    }


def _need_law(fit: dict, name: str) -> dict:
    law = fit.get(name)
    if not isinstance(law, dict):
        raise UserError(f"the scaling fit has no {name} law (too few iso-compute groups with "
                        "an interior optimum); sweep a wider grid")
    return law


def plan_from_fit(fit: dict, budget_flops: float, chips: int) -> dict:
    """Compute-optimal width and steps and predicted loss at `budget_flops` (docstring)."""
    from sae_jax.planning.scaling import predict, predict_pure

    _positive("--budget-flops", budget_flops)
    width_law, steps_law = _need_law(fit, "optimal_width"), _need_law(fit, "optimal_steps")
    loss_law = _need_law(fit, "loss_vs_compute")
    granule = math.lcm(WIDTH_GRANULE, chips)
    raw_width = predict_pure(width_law, budget_flops)
    return {"budget_flops": float(budget_flops), "optimal_width_raw": raw_width,
            "optimal_width": max(granule, round(raw_width / granule) * granule),
            "optimal_steps": predict_pure(steps_law, budget_flops),
            "predicted_loss": predict(loss_law, budget_flops),
            "fit_tokens_per_step": fit.get("tokens_per_step"), "fit_d_in": fit.get("d_in")}


def estimate_from_fit(fit: dict, d_model: int, accelerator: str, budget_flops: float | None = None,
                      budget_hours: float | None = None, **kwargs) -> dict:
    """`estimate_cost` of the compute-optimal run that a scaling fit prescribes.

    Args:
      fit: a `scaling.fit_scaling` / `read_fit` result.
      budget_flops, budget_hours: the budget, exactly one of them.
      **kwargs: the other `estimate_cost` arguments (arch, k, batch_size, mfu, mesh).

    Returns:
      The `estimate_cost` dict of that run, plus `"from_fit"` (the plan).
    """
    if (budget_flops is None) == (budget_hours is None):
        raise UserError("--from-fit needs exactly one of --budget-flops and --budget-hours")
    acc, chips = parse_accelerator(accelerator)
    if budget_flops is None:
        _positive("--budget-hours", budget_hours)
        budget_flops = budget_hours * 3600 * chips * acc.peak_flops * kwargs.get("mfu",
                                                                                  DEFAULT_MFU)
    plan = plan_from_fit(fit, budget_flops, chips)
    width = plan["optimal_width"]
    # The mesh (hence the FLOP count) depends on the width only, so size it once with
    # one token, then spend the whole budget.
    probe = estimate_cost(d_model, width, 1, accelerator, **kwargs)
    tokens = budget_flops / probe["flops_per_token"]
    result = estimate_cost(d_model, width, tokens, accelerator, **kwargs)
    if plan["fit_d_in"] is not None and plan["fit_d_in"] != d_model:
        result["notes"].append(f"the fit was measured at d_in={plan['fit_d_in']}, not "
                               f"{d_model}: its laws are extrapolated")
    if plan["fit_tokens_per_step"]:
        fitted_tokens = plan["optimal_steps"] * plan["fit_tokens_per_step"]
        if abs(math.log(fitted_tokens / tokens)) > 0.25:
            result["notes"].append(
                f"the fitted steps law implies {fitted_tokens:.3g} tokens at this budget, "
                f"the width law {tokens:.3g}: the two laws disagree")
    return {**result, "from_fit": plan}


# ----------------------------------------------------------------------------- output


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"),
                          (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def format_cost_table(result: dict) -> str:
    """The human-readable summary that `sae-jax cost` prints to stderr."""
    mem = result["memory"]
    rows = []
    if "from_fit" in result:
        plan = result["from_fit"]
        rows += [("budget", _si(plan["budget_flops"], "FLOP"), "from the scaling fit"),
                 ("optimal width", f"{plan['optimal_width']:,}",
                  f"fit {plan['optimal_width_raw']:,.0f}, rounded"),
                 ("optimal steps", f"{plan['optimal_steps']:,.0f}",
                  "fitted law" + (f", at the sweep's {plan['fit_tokens_per_step']:,.0f} "
                                  "tokens/step" if plan["fit_tokens_per_step"] else "")),
                 ("predicted loss", f"{plan['predicted_loss']:.4g}", "L_inf + a·C^-alpha")]
    rows += [
        ("FLOPs / token", _si(result["flops_per_token"], "FLOP"), result["flop_count"]),
        ("run FLOPs", _si(result["flops"], "FLOP"),
         f"{_si(result['tokens'])} tokens, {result['steps']:,} steps of {result['batch_size']:,}"),
        ("wall time", f"{result['wall_hours']:,.1f} h",
         f"{result['chips']} chips × {_si(result['peak_flops_per_chip'], 'FLOP/s')} × "
         f"MFU {result['mfu']:.0%}"),
        ("chip-hours", f"{result['chip_hours']:,.0f}", ""),
        ("mesh", result["mesh"], result["mesh_rule"]),
        ("params + Adam", f"{mem['state_bytes'] / GIB:,.1f} GiB", "per chip, 12 B/weight"),
        ("gradients", f"{mem['grad_bytes'] / GIB:,.1f} GiB", "per chip, f32"),
        ("temporaries", f"{mem['temp_bytes'] / GIB:,.1f} GiB", "per chip, activations/update"),
        ("total", f"{mem['total_bytes'] / GIB:,.1f} GiB",
         f"{mem['fraction_of_hbm']:.0%} of {mem['hbm_bytes'] / GIB:.1f} GiB HBM: "
         f"{'fits' if mem['fits'] else 'DOES NOT FIT'}"),
        ("max batch size", f"{result['max_batch_size']:,}", "that fits on this mesh"),
    ]
    label = max(len(r[0]) for r in rows)
    value = max(len(r[1]) for r in rows)
    k = f" k={result['k']}" if result["k"] is not None else ""
    head = (f"sae-jax cost: arch={result['arch']} d={result['d_model']:,} "
            f"F={result['width']:,}{k} on {result['accelerator']} ({result['chips']} "
            f"{result['generation']} chips)")
    lines = [head] + [f"  {a:<{label}}  {b:>{value}}  {c}".rstrip() for a, b, c in rows]
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _number(text: str) -> float:
    """Accepts 8e9, 8_000_000_000 and 8000000000."""
    try:
        return float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _integer(text: str) -> int:
    value = _number(text)
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sae-jax cost` arguments."""
    parser.add_argument("--d-model", type=_integer, required=True, help="activation width d")
    parser.add_argument("--width", type=_integer, help="dictionary features F")
    parser.add_argument("--tokens", type=_number, help="training tokens, e.g. 8e9")
    parser.add_argument("--arch", default="topk", help="SAE architecture (default topk)")
    parser.add_argument("--k", type=_integer, help="active features (default 32)")
    parser.add_argument("--batch-size", type=_integer, help="tokens per step (default 4096)")
    parser.add_argument("--accelerator", required=True,
                        help="e.g. v5p-128 (TensorCores), v5e-256, v6e-256 (chips), h100-8")
    parser.add_argument("--mfu", type=_number, default=DEFAULT_MFU,
                        help=f"fraction of the bf16 peak achieved (default {DEFAULT_MFU})")
    parser.add_argument("--mesh", help="assume this mesh, e.g. data:2,model:32")
    parser.add_argument("--from-fit", metavar="FIT.json",
                        help="a scaling fit (scaling_fit.json): price its compute-optimal run")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-flops", type=_number, help="compute budget for --from-fit")
    budget.add_argument("--budget-hours", type=_number,
                        help="wall-clock budget on the accelerator for --from-fit")


def run(args) -> dict:
    """Runs `sae-jax cost`: prints the table to stderr, returns the JSON-able result."""
    kwargs = {"arch": args.arch, "k": args.k, "batch_size": args.batch_size, "mfu": args.mfu,
              "mesh": args.mesh}
    if args.from_fit:
        from sae_jax.planning.scaling import read_fit

        result = estimate_from_fit(read_fit(args.from_fit), args.d_model, args.accelerator,
                                   budget_flops=args.budget_flops,
                                   budget_hours=args.budget_hours, **kwargs)
    else:
        if args.budget_flops is not None or args.budget_hours is not None:
            raise UserError("--budget-flops/--budget-hours need --from-fit")
        if args.width is None or args.tokens is None:
            raise UserError("cost needs --width and --tokens (or --from-fit with a budget)")
        result = estimate_cost(args.d_model, args.width, args.tokens, args.accelerator,
                               **kwargs)
    print(format_cost_table(result), file=sys.stderr)
    return result
