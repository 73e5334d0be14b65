"""`sae-jax train DATA_DIR RUN_DIR [key=value ...]`: one run, or a sweep when values are lists.

Lists of values (`width=1024,4096 k=16,32`) or `--sweep FILE.json` train the whole grid in one
pass over the data (`training.sweep`); otherwise one run (`training.train`). Re-running the
same command resumes.
"""

from __future__ import annotations

import argparse

from sae_jax.config import describe, make_config
from sae_jax.training.distributed import initialize
from sae_jax.training.grid import is_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "config keys:\n" + describe()
    parser.add_argument("data_dir")
    parser.add_argument("run_dir", help="run directory; an existing run is resumed")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--sweep", metavar="FILE.json",
                        help="train a grid in one pass: a JSON list of override dicts, or a "
                             "dict of value lists (also: comma lists, e.g. width=1024,4096 "
                             "k=16,32)")
    group = parser.add_argument_group(
        "multi-process", "for clusters without auto-detection; on Cloud TPU set "
        "SAE_JAX_DISTRIBUTED=1 instead and every worker runs the same command")
    group.add_argument("--coordinator-address", help="host:port of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)


def run(args) -> dict:
    from sae_jax.allocator import keep_freed_memory
    from sae_jax.training.sweep import run_sweep_command
    from sae_jax.training.train import train

    keep_freed_memory()  # no page faults for each step's temporaries (before XLA's threads)

    overrides = args.overrides + ([f"sweep={args.sweep}"] if args.sweep else [])
    if is_sweep(overrides):  # lists of values: the whole grid in one pass over the data
        initialize(args.coordinator_address, args.num_processes, args.process_id)
        return run_sweep_command(args.data_dir, args.run_dir, overrides,
                                 progress=not args.quiet)
    cfg = make_config(overrides)
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    return train(cfg, args.data_dir, args.run_dir, progress=not args.quiet)
