"""`sae-jax cost`: the arguments, the table printed to stderr and the command.

The numbers are `sae_jax.planning.cost`'s (`estimate_cost`, `estimate_from_fit`); this module
only reads the command line and formats the result.
"""

from __future__ import annotations

import argparse
import math
import sys

from sae_jax.errors import UserError
from sae_jax.planning.cost import DEFAULT_MFU, GIB, estimate_cost, estimate_from_fit, si

# ----------------------------------------------------------------------------- output


def format_cost_table(result: dict) -> str:
    """The human-readable summary that `sae-jax cost` prints to stderr."""
    mem = result["memory"]
    rows = []
    if "from_fit" in result:
        plan = result["from_fit"]
        rows += [("budget", si(plan["budget_flops"], "FLOP"), "from the scaling fit"),
                 ("optimal width", f"{plan['optimal_width']:,}",
                  f"fit {plan['optimal_width_raw']:,.0f}, rounded"),
                 ("optimal steps", f"{plan['optimal_steps']:,.0f}",
                  "fitted law" + (f", at the sweep's {plan['fit_tokens_per_step']:,.0f} "
                                  "tokens/step" if plan["fit_tokens_per_step"] else "")),
                 ("predicted loss", f"{plan['predicted_loss']:.4g}", "L_inf + a·C^-alpha")]
    rows += [
        ("FLOPs / token", si(result["flops_per_token"], "FLOP"), result["flop_count"]),
        ("run FLOPs", si(result["flops"], "FLOP"),
         f"{si(result['tokens'])} tokens, {result['steps']:,} steps of {result['batch_size']:,}"),
        ("wall time", f"{result['wall_hours']:,.1f} h",
         f"{result['chips']} chips × {si(result['peak_flops_per_chip'], 'FLOP/s')} × "
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
