"""Damaged stores are refused, never fed on: a flipped byte fails its chunk's checksum, a
missing chunk is an error (not zeros), nonsense in meta.json or a truncated/extended chunk
file gives one line; stores written before checksums still read; every store has an id;
`verify_store` lists every damaged chunk. And imports leave nothing behind: SIGTERM cleans
up, and the temp dirs of killed processes are removed by the next writer (only those).

Each fault is injected into real files on disk, as a user's disk or a `rm` would.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sae_jax.cli import PREEMPTED_EXIT
from sae_jax.config import make_config
from sae_jax.data import staging
from sae_jax.data.importers import import_activations
from sae_jax.data.loader import STATS_BLOCK_ROWS, STATS_BLOCKS, BatchSource, batches
from sae_jax.data.store import (
    POSITIONS,
    ROWS,
    TOKEN_IDS,
    StoreWriter,
    open_store,
    verify_store,
)
from sae_jax.errors import UserError

OLD_STORE = Path(__file__).parent / "fixtures" / "old_store"  # written before checksums
OLD_ROWS = (np.arange(80, dtype=np.float32).reshape(20, 4) - 40) / 8


def make_store(path, n: int = 40, d: int = 3, chunk_rows: int = 8, **kwargs):
    """A store of n random rows with token ids and positions, in chunks of `chunk_rows`."""
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    with StoreWriter(path, d_in=d, chunk_rows=chunk_rows, with_tokens=True, **kwargs) as w:
        w.append(x, token_ids=np.arange(n), positions=np.stack([np.arange(n) // 5,
                                                                 np.arange(n) % 5], 1))
    return open_store(path), x


def old_store(tmp_path) -> Path:
    return Path(shutil.copytree(OLD_STORE, tmp_path / "old"))


def chunk_file(store_dir, name: str, k: int) -> Path:
    return Path(store_dir) / name / "c" / (f"{k}" if name == TOKEN_IDS else f"{k}/0")


def one_line_error(match: str):
    return pytest.raises(UserError, match=match)


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- checksums


def test_a_flipped_byte_fails_the_checksum_on_every_read(tmp_path):
    store, x = make_store(tmp_path / "s")
    path = chunk_file(store.path, ROWS, 2)
    data = bytearray(path.read_bytes())
    data[5] ^= 0x10  # one bit of row 16
    path.write_bytes(bytes(data))

    with one_line_error(r"store .*/s is damaged: rows/c/2/0 \(rows 16\.\.23\) fails its crc32c "
                        r"checksum.*sae-jax check") as e:
        open_store(store.path).span().read(0, 40)
    assert_one_line(e)
    with one_line_error(r"rows/c/2/0 \(rows 16\.\.23\) fails its crc32c checksum"):
        store.split(0.5)[0].read(10, 17)  # any read touching the chunk, through any span
    np.testing.assert_array_equal(store.span().read(0, 16), x[:16])  # the rest still reads
    assert store.checksummed and store.meta["checksum"] == "crc32c"


def test_checksums_cover_token_ids_and_positions(tmp_path):
    store, _ = make_store(tmp_path / "s")
    for name in (TOKEN_IDS, POSITIONS):
        path = chunk_file(store.path, name, 4)
        data = bytearray(path.read_bytes())
        data[0] ^= 1
        path.write_bytes(bytes(data))
        with one_line_error(rf"{name}/c/4.* \(rows 32\.\.39\) fails its crc32c checksum"):
            store.read(name, 30, 40)


# ---------------------------------------------------------------- missing chunks


@pytest.mark.parametrize("kind", ["new", "old"])
def test_a_missing_chunk_is_an_error_not_zeros(tmp_path, kind):
    path = make_store(tmp_path / "s")[0].path if kind == "new" else old_store(tmp_path)
    chunk_file(path, ROWS, 1).unlink()
    store = open_store(path)
    with one_line_error(r"store .* is damaged: rows/c/1/0 \(rows 8\.\.15\) is missing") as e:
        store.span().read(0, 20)
    assert_one_line(e)
    with one_line_error("rows/c/1/0 .* is missing"):  # a read inside the chunk, too
        store.span().read(9, 10)


def test_a_missing_chunk_on_an_object_store():
    """Object stores (`gs://`, here tensorstore's `memory://`) are checked the same way."""
    import tensorstore as ts

    from sae_jax.files import CONTEXT, kvstore_url

    with StoreWriter("memory://faults/s", d_in=3, chunk_rows=4) as w:
        w.append(np.ones((10, 3), np.float32))
    rows = ts.KvStore.open(kvstore_url("memory://faults/s/rows"), context=CONTEXT).result()
    rows.delete_range(ts.KvStore.KeyRange("c/1/0", "c/1/1")).result()
    with one_line_error(r"store memory://faults/s is damaged: rows/c/1/0 \(rows 4\.\.7\) is "
                        "missing"):
        open_store("memory://faults/s").span().read(0, 10)
    assert verify_store("memory://faults/s") == ["rows/c/1/0 (rows 4..7) is missing"]


def test_the_loader_stops_on_a_missing_chunk(tmp_path):
    """Training reads batches in Grain's prefetch thread: the error still arrives as one
    UserError line in the caller, not as zeros in a batch."""
    store, _ = make_store(tmp_path / "s", n=256, chunk_rows=16)
    chunk_file(store.path, ROWS, 7).unlink()
    source = BatchSource(store.span(), 32, seed=0, num_batches=20, block_rows=16)
    with one_line_error(r"rows/c/7/0 \(rows 112\.\.127\) is missing"):
        for _ in batches(source, 0):
            pass


def test_an_all_zero_chunk_is_stored_and_reads_back(tmp_path):
    """Chunks equal to the fill value are written too, so they are never 'missing'."""
    x = np.ones((24, 3), np.float32)
    x[8:16] = 0
    with StoreWriter(tmp_path / "s", d_in=3, chunk_rows=8) as w:
        w.append(x)
    assert chunk_file(tmp_path / "s", ROWS, 1).exists()
    np.testing.assert_array_equal(open_store(tmp_path / "s").span().read(0, 24), x)
    assert verify_store(tmp_path / "s") == []


# ---------------------------------------------------------------- old stores


def test_a_store_written_before_checksums_opens_and_reads(tmp_path):
    store = open_store(old_store(tmp_path))
    assert store.id is None and not store.checksummed and store.chunk_rows == 8
    np.testing.assert_array_equal(store.span().read(0, 20), OLD_ROWS)
    np.testing.assert_array_equal(store.read(TOKEN_IDS, 0, 20), np.arange(20) + 100)
    np.testing.assert_array_equal(store.read(POSITIONS, 18, 20), [[3, 3], [3, 4]])
    assert verify_store(store.path) == []


# ---------------------------------------------------------------- malformed stores


@pytest.mark.parametrize("key, value, match", [
    ("chunk_rows", 0, "chunk_rows must be a positive integer, got 0"),
    ("chunk_rows", -8, "chunk_rows must be a positive integer, got -8"),
    ("chunk_rows", 8.5, "chunk_rows must be a positive integer, got 8.5"),
    ("chunk_rows", "8", "chunk_rows must be a positive integer, got '8'"),
    ("chunk_rows", True, "chunk_rows must be a positive integer, got True"),
    ("chunk_rows", 4096, "says rows is chunks of 4096 rows, the rows array is chunks of 8"),
    ("chunk_rows", 16, "says rows is chunks of 16 rows, the rows array is chunks of 8"),
    ("d_in", 0, "d_in must be a positive integer, got 0"),
    ("n_rows", -40, "n_rows must be a positive integer, got -40"),
    ("n_rows", 41, "says rows is 41x3, the rows array is 40x3"),
    ("dtype", "float64", "dtype must be one of float32, bfloat16, got 'float64'"),
    ("dtype", "bfloat16", "says rows is bfloat16, the rows array is float32"),
    ("id", 7, "id must be a non-empty string, got 7"),
])
def test_nonsense_in_meta_json_is_one_line(tmp_path, key, value, match):
    store, _ = make_store(tmp_path / "s")
    meta_path = Path(store.path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, key: value}))
    with one_line_error(match) as e:
        open_store(store.path)
    assert_one_line(e)
    assert verify_store(store.path) == [str(e.value)]


def test_a_token_array_of_the_wrong_length_is_refused(tmp_path):
    store, _ = make_store(tmp_path / "s")
    other, _ = make_store(tmp_path / "other", n=24)
    shutil.rmtree(Path(store.path) / TOKEN_IDS)
    shutil.copytree(Path(other.path) / TOKEN_IDS, Path(store.path) / TOKEN_IDS)
    with one_line_error("meta.json says token_ids is 40, the token_ids array is 24"):
        open_store(store.path)


@pytest.mark.parametrize("kind", ["new", "old"])
def test_a_truncated_chunk_file_is_one_line(tmp_path, kind):
    path = make_store(tmp_path / "s")[0].path if kind == "new" else old_store(tmp_path)
    chunk = chunk_file(path, ROWS, 2)
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with one_line_error(rf"rows/c/2/0 \(rows 16\.\.\d+\) is truncated \({size - 3} of {size} "
                        "bytes\\)") as e:
        open_store(path).span().read(0, 20)
    assert_one_line(e)


def test_an_extended_chunk_file_is_one_line_on_an_old_store(tmp_path):
    path = old_store(tmp_path)
    with chunk_file(path, ROWS, 0).open("ab") as f:
        f.write(b"junk")
    with one_line_error(r"rows/c/0/0 \(rows 0\.\.7\) has 4 bytes more than the 128 it should "
                        "have") as e:
        open_store(path).span().read(0, 8)
    assert_one_line(e)


def test_an_extended_chunk_file_reads_its_checked_data_and_verify_reports_it(tmp_path):
    """The checksum still matches the chunk's data (tensorstore ignores the tail), so reads
    are correct; `verify_store` reports the file for what it is."""
    store, x = make_store(tmp_path / "s")
    with chunk_file(store.path, ROWS, 0).open("ab") as f:
        f.write(b"junk")
    np.testing.assert_array_equal(store.span().read(0, 8), x[:8])
    assert verify_store(store.path) == ["rows/c/0/0 (rows 0..7) has 4 bytes more than the 100 "
                                        "it should have"]


# ---------------------------------------------------------------- identity


def test_every_store_has_its_own_id(tmp_path):
    a, _ = make_store(tmp_path / "a")
    b, _ = make_store(tmp_path / "b")
    np.save(tmp_path / "x.npy", np.ones((5, 3), np.float32))
    c = import_activations(tmp_path / "x.npy", tmp_path / "c")
    ids = [a.id, b.id, c.id]
    assert len(set(ids)) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert open_store(a.path).id == a.id == json.loads(
        (Path(a.path) / "meta.json").read_text())["id"]


def test_reading_an_array_the_store_lacks_is_one_line(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((5, 3), np.float32))
    store = import_activations(tmp_path / "x.npy", tmp_path / "s")
    assert store.array_names == [ROWS]
    with one_line_error("store .* has no token_ids"):
        store.read(TOKEN_IDS, 0, 5)


def test_provenance_meta_cannot_overwrite_the_layout(tmp_path):
    with StoreWriter(tmp_path / "s", d_in=3, meta={"id": "mine", "n_rows": 99}) as w:
        w.append(np.ones((4, 3), np.float32))
    store = open_store(tmp_path / "s")
    assert store.n_rows == 4 and store.id != "mine"


# ---------------------------------------------------------------- verify_store


def test_verify_store_lists_every_damaged_chunk(tmp_path):
    store, _ = make_store(tmp_path / "s")
    assert verify_store(store.path) == []
    rows_2 = chunk_file(store.path, ROWS, 2)
    data = bytearray(rows_2.read_bytes())
    data[-9] ^= 0xFF
    rows_2.write_bytes(bytes(data))
    chunk_file(store.path, ROWS, 4).unlink()
    tokens_1 = chunk_file(store.path, TOKEN_IDS, 1)
    tokens_1.write_bytes(tokens_1.read_bytes()[:10])
    with chunk_file(store.path, POSITIONS, 3).open("ab") as f:
        f.write(b"!")
    assert verify_store(store.path) == [
        "rows/c/2/0 (rows 16..23) fails its crc32c checksum (its bytes changed since it was "
        "written)",
        "rows/c/4/0 (rows 32..39) is missing",
        "token_ids/c/1 (rows 8..15) is truncated (10 of 36 bytes)",
        "positions/c/3/0 (rows 24..31) has 1 bytes more than the 68 it should have",
    ]


def test_verify_store_on_no_store_or_a_damaged_array(tmp_path):
    assert verify_store(tmp_path / "nothing") == [
        f"no activation store at {tmp_path / 'nothing'} (missing meta.json); create one with "
        "`sae-jax import` or `sae-jax harvest`"]
    store, _ = make_store(tmp_path / "s")
    (Path(store.path) / POSITIONS / "zarr.json").write_text("{")
    (problem,) = verify_store(store.path)
    assert problem.startswith(f"cannot open the positions array of store {store.path}: ")


# ---------------------------------------------------------------- temp dirs


def test_a_writer_removes_temp_dirs_of_dead_processes_only(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now belongs to no process
    host = staging.this_host()
    names = {"dead": f".a.tmp-{host}-{dead.pid}-abcd_123",
             "live": f".b.tmp-{host}-{os.getpid()}-abcd_123",
             "other_host": f".c.tmp-not-{host}-{dead.pid}-abcd_123",
             "unknown_owner": ".d.k2j3h4_x"}  # no pid in the name: never removed
    for name in names.values():
        (tmp_path / name / "rows").mkdir(parents=True)
    make_store(tmp_path / "new")
    left = sorted(os.listdir(tmp_path))
    assert left == sorted([names["live"], names["other_host"], names["unknown_owner"], "new"])
    assert names["dead"] in capsys.readouterr().err


def test_temp_dir_names_carry_host_and_pid(tmp_path):
    with StoreWriter(tmp_path / "s", d_in=3) as w:
        w.append(np.ones((2, 3), np.float32))
        assert Path(w.path).name.startswith(f".s.tmp-{staging.this_host()}-{os.getpid()}-")
        assert staging.stale_temp_dirs(tmp_path) == []  # this process is alive


# ---------------------------------------------------------------- the real entry point


def _cli_env() -> dict:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "PYTHONUNBUFFERED": "1"}


def _sae_jax() -> list[str]:
    script = Path(sys.executable).parent / "sae-jax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sae_jax"]


@pytest.fixture(scope="module")
def big_npy(tmp_path_factory) -> Path:
    """~300 MB of activations, so an import takes long enough to be signalled midway."""
    path = tmp_path_factory.mktemp("big") / "x.npy"
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(600_000, 128))
    block = np.random.default_rng(0).standard_normal((50_000, 128)).astype(np.float32)
    for start in range(0, len(rows), len(block)):
        rows[start:start + len(block)] = block
    rows.flush()
    return path


def _import_then_signal(src: Path, parent: Path, signum: int) -> subprocess.CompletedProcess:
    """Runs `sae-jax import SRC PARENT/store` and sends `signum` once rows are on disk."""
    proc = subprocess.Popen([*_sae_jax(), "import", str(src), str(parent / "store")],
                            env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not list(parent.glob(".store.*/rows/c/*")):  # the hidden temp dir has rows
        assert proc.poll() is None, f"import ended before the signal: {proc.communicate()}"
        assert time.time() < deadline, "no chunk was written in 120 s"
        time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.entry
def test_sigterm_during_import_leaves_nothing(tmp_path, big_npy):
    parent = tmp_path / "stores"
    parent.mkdir()
    out = _import_then_signal(big_npy, parent, signal.SIGTERM)
    assert out.returncode == PREEMPTED_EXIT, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"sae-jax: import stopped by SIGTERM; nothing was written to {parent / 'store'} (rerun "
        "the command to import)"]
    assert os.listdir(parent) == []


@pytest.mark.entry
def test_kill_9_during_import_is_cleaned_up_by_the_next_import(tmp_path, big_npy):
    parent = tmp_path / "stores"
    parent.mkdir()
    out = _import_then_signal(big_npy, parent, signal.SIGKILL)
    assert out.returncode == -signal.SIGKILL
    (left,) = os.listdir(parent)  # a kill -9 cannot be caught: its temp dir stays...
    assert left.startswith(".store.")
    np.save(tmp_path / "small.npy", np.ones((10, 4), np.float32))
    import_activations(tmp_path / "small.npy", parent / "next")
    assert os.listdir(parent) == ["next"]  # ...until the next import into the same folder


def _chunk_outside_stats_sample(n_train: int, chunk_rows: int) -> int:
    """A chunk of the training rows that `loader.stats_sample` never reads, so that the
    damage is first met by the training loop itself."""
    starts = np.unique(np.linspace(0, n_train - STATS_BLOCK_ROWS, STATS_BLOCKS).astype(int))
    read = {k for s in starts for k in range(s // chunk_rows,
                                             (s + STATS_BLOCK_ROWS - 1) // chunk_rows + 1)}
    return next(k for k in range(n_train // chunk_rows) if k not in read)


@pytest.mark.entry
def test_train_on_a_store_with_a_deleted_chunk_fails_with_one_line(tmp_path):
    n, chunk_rows = 120_000, 256
    store, _ = make_store(tmp_path / "data", n=n, d=16, chunk_rows=chunk_rows)
    n_train = len(store.split(make_config([]).holdout)[0])
    k = _chunk_outside_stats_sample(n_train, chunk_rows)
    chunk_file(store.path, ROWS, k).unlink()
    out = subprocess.run(
        [*_sae_jax(), "train", store.path, str(tmp_path / "run"), "arch=topk", "width=32", "k=4",
         "steps=40", "batch_size=4096", "log_every=10", "mesh=data:8,model:1"],
        env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("sae-jax:")]
    assert errors == [
        f"sae-jax: error: store {store.path} is damaged: rows/c/{k}/0 (rows {k * chunk_rows}.."
        f"{(k + 1) * chunk_rows - 1}) is missing; `sae-jax check {store.path}` lists every "
        "damaged chunk"]


# ---------------------------------------------------------------- bench


def test_bench_reports_read_speed_with_and_without_checksums():
    from sae_jax.planning.bench_io import bench_store_checksums

    out = bench_store_checksums(d_in=16, n_rows=8192, seed=0, repeat=1)
    assert out["store_read_crc32c_gib_per_s"] > 0 and out["store_read_unchecked_gib_per_s"] > 0
    assert out["crc32c_read_ratio"] == pytest.approx(
        out["store_read_crc32c_gib_per_s"] / out["store_read_unchecked_gib_per_s"])
