"""The `sae-jax` command line: a table of command modules.

Every command lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> dict`, and is imported only when that command runs (so `sae-jax import` never
loads the analysis stack). Commands end their stdout with one strict-JSON line (NaN and
infinities become null) so scripts can parse them. Bad input exits with status 2 and a
one-line `sae-jax: error: ...` on stderr; a check that ran and failed (`verify`, `gate`)
prints its JSON line too and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sae_jax import files
from sae_jax.errors import Failed, Preempted, UserError, disk_full

PREEMPTED_EXIT = 143  # 128 + SIGTERM: the run stopped early but resumably
FAILED_EXIT = 1  # a check ran and failed (verify, gate)

COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("sae_jax.data.importers", "copy (N, d) float activations into a new store"),
    "harvest": ("sae_jax.lm.harvest", "harvest model activations into a new store"),
    "train": ("sae_jax.training.command", "train (or resume) an SAE, or a sweep of them"),
    "eval": ("sae_jax.analysis.evaluate", "evaluate a trained SAE; last line is JSON"),
    "evals": ("sae_jax.analysis.evals", "eval suites of runs/seeds with 95% CIs, random "
              "baselines and PW-MCC; JSON, PNGs; last line is JSON"),
    "dashboard": ("sae_jax.analysis.dashboard", "feature catalog + static HTML dashboard"),
    "export": ("sae_jax.saelens.export",
               "write a run as a SAELens SAE (cfg.json + safetensors)"),
    "import-sae": ("sae_jax.saelens.import_sae",
                   "load a SAELens-format SAE into a new run directory"),
    "steer": ("sae_jax.analysis.steer",
              "clamp a feature and measure the effect (causal LMs: generation); last line is JSON"),
    "features": ("sae_jax.analysis.features",
                 "per-token active features of texts, with catalog labels; last line is JSON"),
    "audit": ("sae_jax.analysis.audit",
              "faithfulness (causal, explanatory) and coverage audit of a run; last line is JSON"),
    "compare": ("sae_jax.analysis.compare",
                "drift between two SAEs: matched features, appear/vanish/split; last line is JSON"),
    "diff": ("sae_jax.analysis.diff",
             "model diff with a crosscoder: shared / A-only / B-only latents by relative "
             "decoder norm; JSON, PNG; last line is JSON"),
    "prune": ("sae_jax.release.prune",
              "drop dead, duplicate and least-used latents within an FVU budget; last line JSON"),
    "check": ("sae_jax.check", "read a store or run through; report what is damaged"),
    "cost": ("sae_jax.planning.cost_command",
             "FLOPs, hours and memory per chip of a planned run; last line is JSON"),
    "bench": ("sae_jax.planning.bench",
              "measure loader and train-step throughput; last line is JSON"),
    "bundle": ("sae_jax.release.bundle",
               "write a run's auditable release bundle (SAE, catalog, reports, provenance, "
               "bill, manifest); last line is JSON"),
    "verify": ("sae_jax.release.verify",
               "check a bundle's hashes, and with --model re-derive its catalog's activations; "
               "exit 1 names each failing check"),
    "gate": ("sae_jax.release.gate",
             "release gate: a bundle against a policy.toml (and a baseline); exit 0 pass, 1 fail"),
}
"""command -> (module with `add_arguments`/`run`, one-line help)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of `command` only (its module is imported), since a run
    needs no other command's options."""
    parser = argparse.ArgumentParser(
        prog="sae-jax", description="Sparse autoencoders on language-model activations, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command word: the first argument that is not an option."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def quiet_library_logs() -> None:
    """Orbax and tensorstore log every failed background write with full tracebacks (absl,
    asyncio), hundreds of lines for one full disk. The CLI reports each failure itself, in
    one line, when it reaches the main thread; unexpected errors keep their traceback."""
    import logging

    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # After a failed async save, tensorstore completes pending writes into Orbax's closed
    # event loop; each one prints "Event loop is closed" through sys.excepthook.
    default_hook = sys.excepthook

    def hook(kind, value, tb):
        if not (kind is RuntimeError and str(value) == "Event loop is closed"):
            default_hook(kind, value, tb)

    sys.excepthook = hook


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_library_logs()
    parser = build_parser(_command_of(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e for e in extra):
        args.overrides += extra  # key=value pairs given after an option such as --quiet
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = args.run(args)
    except UserError as e:
        print(f"sae-jax: error: {e}", file=sys.stderr)
        return 2
    except Failed as e:
        print(files.strict_json(e.result), flush=True)
        print(f"sae-jax: {args.command}: {e}", file=sys.stderr)
        return FAILED_EXIT
    except Preempted as e:
        print(f"sae-jax: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print("sae-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise  # a bug: keep its traceback
        print(f"sae-jax: error: {full}; free some space and rerun (what was saved before is "
              "kept: a run resumes from its last checkpoint)", file=sys.stderr)
        return 2
    print(files.strict_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
