"""The `sae-jax` command line.

Commands that produce results end their stdout with one JSON line so scripts can parse
them. Bad input exits with status 2 and a one-line `sae-jax: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from sae_jax.errors import Preempted, UserError

PREEMPTED_EXIT = 143  # 128 + SIGTERM: the run stopped early but resumably


def _cmd_import(args) -> dict:
    from sae_jax.data.importers import import_activations

    store = import_activations(args.src, args.data_dir, args.tensor)
    return {"data_dir": store.path, **store.meta}


def _cmd_harvest(args) -> dict:
    from sae_jax.lm import harvest

    return harvest.run_harvest(**harvest.harvest_kwargs(args))


def _cmd_train(args) -> dict:
    from sae_jax.config import make_config
    from sae_jax.training.distributed import initialize
    from sae_jax.training.sweep import is_sweep, run_sweep_command
    from sae_jax.training.train import train

    overrides = args.overrides + ([f"sweep={args.sweep}"] if args.sweep else [])
    if is_sweep(overrides):  # lists of values: the whole grid in one pass over the data
        initialize(args.coordinator_address, args.num_processes, args.process_id)
        return run_sweep_command(args.data_dir, args.run_dir, overrides,
                                 progress=not args.quiet)
    cfg = make_config(overrides)
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    return train(cfg, args.data_dir, args.run_dir, progress=not args.quiet)


def _cmd_eval(args) -> dict:
    from sae_jax.analysis.evaluate import evaluate, write_eval_artifacts
    from sae_jax.analysis.fidelity import downstream_fidelity
    from sae_jax.files import join
    from sae_jax.sae import load
    from sae_jax.data.store import open_store

    sae = load(args.run_dir)
    store = open_store(args.data_dir)
    if store.d_in != sae.row_width:
        raise UserError(f"store {args.data_dir} has d_in={store.d_in}, but the SAE in "
                        f"{args.run_dir} was trained on d_in={sae.row_width}")
    rows = store.span() if args.split == "all" else store.split(sae.config.holdout)[1]
    result = {"step": sae.step, "split": args.split, **evaluate(sae, rows)}
    try:
        result["fidelity"] = downstream_fidelity(sae, store, n_sequences=args.fidelity_sequences,
                                                 corpus=args.corpus)
    except UserError as e:  # not a harvested store, or its corpus cannot be rebuilt
        result["fidelity"] = None
        print(f"sae-jax: warning: fidelity skipped: {e}", file=sys.stderr)
    write_eval_artifacts(result, join(args.run_dir, "eval"))
    return result


def _cmd_dashboard(args) -> dict:
    from sae_jax.analysis.dashboard import write_dashboard

    result = write_dashboard(args.run_dir, args.data_dir, args.out_dir, split=args.split,
                             features=args.features, batch_size=args.batch_size,
                             progress=not args.quiet)
    print(f"dashboard: open {result['index']} in a browser", file=sys.stderr)
    return result


def _cmd_export(args) -> dict:
    from sae_jax.saelens import export_saelens

    return export_saelens(args.run_dir, args.out_dir, args.step)


def _cmd_import_sae(args) -> dict:
    from sae_jax.saelens import import_saelens

    return import_saelens(args.sae_dir, args.run_dir)


def _cmd_bench(args) -> dict:
    from sae_jax.planning.bench import run_bench

    return run_bench(args.overrides, compare_torch=args.compare_torch)


def build_parser() -> argparse.ArgumentParser:
    from sae_jax.config import describe

    parser = argparse.ArgumentParser(prog="sae-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="copy (N, d) float activations into a new store")
    p.add_argument("src", help="a .npy or .safetensors file of shape (N, d), or a folder of them")
    p.add_argument("data_dir", help="new store (a local path or gs://bucket/path)")
    p.add_argument("--tensor", help="which tensor of a .safetensors file (default: the only one)")
    p.set_defaults(fn=_cmd_import)

    p = sub.add_parser("harvest", help="harvest model activations into a new store")
    from sae_jax.lm.harvest import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_cmd_harvest)

    p = sub.add_parser("train", help="train (or resume) an SAE",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys:\n" + describe())
    p.add_argument("data_dir")
    p.add_argument("run_dir", help="run directory; an existing run is resumed")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sweep", metavar="FILE.json",
                   help="train a grid in one pass: a JSON list of override dicts, or a dict "
                        "of value lists (also: comma lists, e.g. width=1024,4096 k=16,32)")
    group = p.add_argument_group(
        "multi-process", "for clusters without auto-detection; on Cloud TPU set "
        "SAE_JAX_DISTRIBUTED=1 instead and every worker runs the same command")
    group.add_argument("--coordinator-address", help="host:port of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained SAE; last line is JSON")
    p.add_argument("run_dir")
    p.add_argument("data_dir")
    p.add_argument("--split", choices=("heldout", "all"), default="heldout",
                   help="rows to evaluate on (default: the held-out tail of the store)")
    p.add_argument("--fidelity-sequences", type=int, default=128,
                   help="held-out sequences for downstream fidelity (default 128)")
    p.add_argument("--corpus", nargs="+", metavar="PATH",
                   help="the corpus the store was harvested from, if not the default")
    p.set_defaults(fn=_cmd_eval)
    p = sub.add_parser("dashboard", help="feature catalog + static HTML dashboard")
    p.add_argument("run_dir")
    p.add_argument("data_dir", help="a harvested store (token contexts need its metadata)")
    p.add_argument("out_dir", help="where to write index.html")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                   help="rows to scan for examples (default: all)")
    p.add_argument("--features", type=int, help="only the first N features (default: all)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_dashboard)

    p = sub.add_parser("export", help="write a run as a SAELens SAE (cfg.json + safetensors)")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=("saelens",), default="saelens")
    p.add_argument("--step", type=int, help="checkpoint to export (default: the latest)")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("import-sae", help="load a SAELens-format SAE into a new run directory")
    p.add_argument("sae_dir", help="folder with cfg.json and sae_weights.safetensors")
    p.add_argument("run_dir", help="new run directory (for eval, load, ...)")
    p.set_defaults(fn=_cmd_import_sae)

    p = sub.add_parser("bench", help="measure loader and train-step throughput; last line JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config keys, plus d_in, bench_steps, store_rows")
    p.add_argument("--compare-torch", action="store_true",
                   help="also time the equivalent PyTorch step (if torch is installed)")
    p.set_defaults(fn=_cmd_bench)
    _add_module_command(sub, "steer", "clamp a feature in MiniLM and measure the effect; "
                        "last line is JSON", "sae_jax.analysis.steer")
    _add_module_command(sub, "features", "per-token active features of texts, with catalog "
                        "labels; last line is JSON", "sae_jax.analysis.features")
    _add_module_command(sub, "audit", "faithfulness (causal, explanatory) and coverage "
                        "audit of a run; last line is JSON", "sae_jax.analysis.audit")
    _add_module_command(sub, "compare", "drift between two SAEs: matched features, "
                        "appear/vanish/split; last line is JSON", "sae_jax.analysis.compare")
    _add_module_command(sub, "cost", "FLOPs, hours and memory per chip of a planned run; "
                        "last line is JSON", "sae_jax.planning.cost")
    return parser


def _add_module_command(sub, name: str, help: str, module: str) -> None:
    """A subcommand whose arguments and action live in `module` (`add_arguments`,
    `run_command`), imported only when the command line is built."""
    import importlib

    mod = importlib.import_module(module)
    p = sub.add_parser(name, help=help, description=help)
    mod.add_arguments(p)
    p.set_defaults(fn=mod.run_command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e for e in extra):
        args.overrides += extra  # key=value pairs given after an option such as --quiet
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = args.fn(args)
    except UserError as e:
        print(f"sae-jax: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"sae-jax: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print("sae-jax: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
