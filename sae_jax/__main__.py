"""`python -m sae_jax` is the `sae-jax` command."""

import sys

from sae_jax.cli import main

sys.exit(main())
