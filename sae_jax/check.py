"""`sae-jax check DATA_DIR|RUN_DIR`: read everything, report what is damaged.

A store is checked chunk by chunk (missing, truncated or extended chunk files, checksum
mismatches: `data.store.verify_store`); a run by its record and every checkpoint against its
digest (`training.checkpoint.verify_checkpoints`); a sweep directory member by member. Each
problem is one line on stderr; the last stdout line is the JSON report; a damaged store or
run exits non-zero, so a script can gate on it.
"""

from __future__ import annotations

import sys

from sae_jax import files
from sae_jax.data.store import META_FILE, verify_store
from sae_jax.errors import UserError
from sae_jax.rundir import CONFIG_FILE, read_run
from sae_jax.training.checkpoint import verify_checkpoints
from sae_jax.training.sweep import SWEEP_FILE


def verify_run(run_dir) -> list[str]:
    """One line per damaged part of a run: its record, then its checkpoints."""
    try:
        read_run(run_dir)
    except UserError as e:
        return [str(e)]
    return verify_checkpoints(run_dir)


def check(path) -> dict:
    """`{"path", "kind", "problems"}` for a store, a run or a sweep directory."""
    if files.exists(files.join(path, META_FILE)):
        kind, problems = "store", verify_store(path)
    elif files.exists(files.join(path, CONFIG_FILE)):
        kind, problems = "run", verify_run(path)
    elif files.exists(files.join(path, SWEEP_FILE)):
        members = files.read_json(files.join(path, SWEEP_FILE), "")["members"]
        kind = "sweep"
        problems = [f"{m['name']}: {line}" for m in members for line in verify_run(m["run_dir"])]
    else:
        raise UserError(f"{path} is neither a store ({META_FILE}), a run ({CONFIG_FILE}) nor a "
                        f"sweep ({SWEEP_FILE})")
    return {"path": str(path), "kind": kind, "ok": not problems, "problems": problems}


def add_arguments(parser) -> None:
    parser.add_argument("path", help="a store (DATA_DIR), a run (RUN_DIR) or a sweep directory")


def run(args) -> dict:
    report = check(args.path)
    for line in report["problems"]:
        print(f"{args.path}: {line}", file=sys.stderr)
    if report["problems"]:
        print(files.strict_json(report))
        raise UserError(f"{len(report['problems'])} damaged in {report['kind']} {args.path} "
                        "(listed above)")
    print(f"{args.path}: {report['kind']} intact", file=sys.stderr)
    return report
