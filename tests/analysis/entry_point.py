"""Running `sae-jax` the way a user does: the installed entry point, in a subprocess, with its
progress bars on and 8 simulated CPU devices, reading the JSON result line or the one-line
error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def sae_jax(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    """`sae-jax ARGS...` as a subprocess (no --quiet: progress bars stay on)."""
    exe = Path(sys.executable).parent / "sae-jax"
    cmd = [str(exe) if exe.exists() else shutil.which("sae-jax"), *map(str, args)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def json_result(out: subprocess.CompletedProcess) -> dict:
    """The command's result: its last stdout line, strict JSON."""
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The command failed with exit status 2 and exactly one line on stderr (no traceback)."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("sae-jax: error: "), lines[0]
    return lines[0]
