"""The `sae-jax` command line.

Commands that produce results end their stdout with one JSON line so scripts can parse
them. Bad input exits with status 2 and a one-line `sae-jax: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from sae_jax.errors import UserError


def _cmd_import(args) -> dict:
    from sae_jax.data import import_npy

    store = import_npy(args.src, args.data_dir)
    return {"data_dir": str(store.path), **store.meta}


def _cmd_train(args) -> dict:
    from sae_jax.config import make_config
    from sae_jax.train import train

    cfg = make_config(args.overrides)
    return train(cfg, args.data_dir, args.run_dir, progress=not args.quiet)


def _cmd_eval(args) -> dict:
    from sae_jax.data import open_store
    from sae_jax.evaluate import evaluate
    from sae_jax.sae import load

    sae = load(args.run_dir)
    store = open_store(args.data_dir)
    if store.d_in != sae.d_in:
        raise UserError(f"store {args.data_dir} has d_in={store.d_in}, but the SAE in "
                        f"{args.run_dir} was trained on d_in={sae.d_in}")
    rows = store.rows if args.split == "all" else store.split(sae.config.holdout)[1]
    return {"step": sae.step, "split": args.split, **evaluate(sae, rows)}


def build_parser() -> argparse.ArgumentParser:
    from sae_jax.config import describe

    parser = argparse.ArgumentParser(prog="sae-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="copy an (N, d) float .npy into an activation store")
    p.add_argument("src", help="a .npy file of shape (N, d), float16/32/64 or bfloat16")
    p.add_argument("data_dir", help="new store directory")
    p.set_defaults(fn=_cmd_import)

    p = sub.add_parser("train", help="train (or resume) an SAE",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys:\n" + describe())
    p.add_argument("data_dir")
    p.add_argument("run_dir", help="run directory; an existing run is resumed")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained SAE; last line is JSON")
    p.add_argument("run_dir")
    p.add_argument("data_dir")
    p.add_argument("--split", choices=("heldout", "all"), default="heldout",
                   help="rows to evaluate on (default: the held-out tail of the store)")
    p.set_defaults(fn=_cmd_eval)
    return parser


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
    except KeyboardInterrupt:
        print("sae-jax: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
