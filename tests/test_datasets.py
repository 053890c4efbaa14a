"""Datasets from storage: listing, sharding, the worker's disk cache, against a real S3 server.

The S3 server is a real one on loopback (``tests/s3server.py``); its own request log is what
proves "the second run downloads nothing" and "two processes download an object once".
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import s3fs
from s3server import S3Server, s3_server

from gateway.protocol import DataError, DataRef, redact, resolve, shard
from worker._cache import DiskCache, parse_size
from worker._datasets import filesystem, materialize, version_token

pytestmark = pytest.mark.system

N_FILES = 20
JOIN_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    # One server per module (start-up costs ~0.5 s); every test uses its own bucket.
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3fs_(s3: S3Server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)


@pytest.fixture
def bucket(s3fs_: s3fs.S3FileSystem) -> Iterator[str]:
    """A fresh bucket with frames/frame_0000.png .. frame_0019.png and notes/readme.txt."""
    name = f"pilot-{uuid.uuid4().hex[:12]}"
    s3fs_.mkdir(name)
    contents = {f"{name}/frames/frame_{i:04d}.png": f"frame {i}".encode() for i in range(N_FILES)}
    contents[f"{name}/notes/readme.txt"] = b"not a frame"
    s3fs_.pipe(contents)
    yield name
    s3fs_.rm(name, recursive=True)


@pytest.fixture
def cache(tmp_path: Path) -> DiskCache:
    return DiskCache(tmp_path / "cache", parse_size("100MB"))


def frames(bucket: str) -> list[str]:
    return [f"s3://{bucket}/frames/frame_{i:04d}.png" for i in range(N_FILES)]


# --- resolve -------------------------------------------------------------------------------


def test_resolve_glob_lists_matching_files_sorted(s3: S3Server, bucket: str) -> None:
    ref = resolve("images", f"s3://{bucket}/frames/*.png", storage_options=s3.storage_options())
    assert ref.files == tuple(frames(bucket))
    assert ref.name == "images" and ref.mode == "local"


def test_resolve_prefix_lists_files_recursively(s3: S3Server, bucket: str) -> None:
    ref = resolve("all", f"s3://{bucket}", storage_options=s3.storage_options())
    assert ref.files == (*frames(bucket), f"s3://{bucket}/notes/readme.txt")
    sub = resolve("sub", f"s3://{bucket}/frames/", storage_options=s3.storage_options())
    assert sub.files == tuple(frames(bucket))


def test_resolve_single_file(s3: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/notes/readme.txt"
    assert resolve("one", url, storage_options=s3.storage_options()).files == (url,)


def test_resolve_missing_bucket_names_it(s3: S3Server) -> None:
    with pytest.raises(DataError, match=r"No files match.*bucket 'no-such-bucket-x' does not"):
        resolve("x", "s3://no-such-bucket-x/frames/*.png", storage_options=s3.storage_options())
    with pytest.raises(DataError, match="No files match s3://no-such-bucket-x/frames"):
        resolve("x", "s3://no-such-bucket-x/frames", storage_options=s3.storage_options())


def test_resolve_missing_object_or_empty_match(s3: S3Server, bucket: str) -> None:
    opts = s3.storage_options()
    with pytest.raises(DataError, match=f"No files match s3://{bucket}/frames/nope.png: check"):
        resolve("x", f"s3://{bucket}/frames/nope.png", storage_options=opts)
    with pytest.raises(DataError, match=r"No files match .*\*\.jpg: check the bucket and prefix"):
        resolve("x", f"s3://{bucket}/frames/*.jpg", storage_options=opts)


def test_resolve_bad_credentials_is_permission_error(s3: S3Server, bucket: str) -> None:
    if not s3.enforces_auth:
        pytest.skip("moto's server accepts any credentials")
    opts = s3.storage_options(secret="not-the-secret")
    with pytest.raises(DataError, match=r"Permission denied listing .*check the credentials"):
        resolve("x", f"s3://{bucket}/frames/*.png", storage_options=opts)


def test_resolve_uses_the_environment_for_credentials(
    s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    # fsspec caches instances by arguments, not by environment: start from a clean slate.
    s3fs.S3FileSystem.clear_instance_cache()
    ref = resolve("images", f"s3://{bucket}/frames/*.png")
    assert ref.storage_options is None and len(ref.files) == N_FILES


def test_resolve_backend_not_installed_names_the_package() -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(DataError, match=r"gs:// backend is not installed.*pip install gcsfs"):
        resolve("x", "gs://bucket/data/*.csv")


def test_resolve_unreachable_endpoint(s3: S3Server) -> None:
    # A port bound but not listening refuses connections, and nobody else can take it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        opts = s3.storage_options(
            endpoint_url=endpoint, config_kwargs={"retries": {"max_attempts": 1}}
        )
        with pytest.raises(DataError, match=r"Could not list s3://b/x/\*: .*check the endpoint"):
            resolve("x", "s3://b/x/*", storage_options=opts)


def test_resolve_unknown_scheme() -> None:
    with pytest.raises(DataError, match=r"Unknown storage scheme nosuch://"):
        resolve("x", "nosuch://bucket/data/*.csv")


def test_resolve_checks_name_and_mode_first() -> None:
    with pytest.raises(DataError, match="not a Python identifier"):
        resolve("my-images", "nosuch://x")
    with pytest.raises(DataError, match="Unknown data mode"):
        resolve("images", "nosuch://x", mode="stream")


def test_memory_and_file_urls(tmp_path: Path, cache: DiskCache) -> None:
    mem = fsspec.filesystem("memory")
    root = f"/pilot-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        mem.pipe(f"{root}/part-{i}.csv", f"row {i}\n".encode())
    ref = resolve("rows", f"memory://{root}/*.csv")
    assert ref.files == tuple(f"memory://{root}/part-{i}.csv" for i in range(3))
    assert [Path(p).read_text() for p in materialize(ref, cache)] == [
        f"row {i}\n" for i in range(3)
    ]
    mem.pipe(f"{root}/sub/deeper/part-9.csv", b"deep")
    assert len(resolve("rows", f"memory://{root}/*").files) == 3  # `*` stays at one level
    assert len(resolve("rows", f"memory://{root}/**/*.csv").files) == 4  # `**` descends

    for i in range(3):
        (tmp_path / "local" / "deep").mkdir(parents=True, exist_ok=True)
        (tmp_path / "local" / "deep" / f"{i}.txt").write_text(str(i))
    plain = resolve("texts", str(tmp_path / "local"))
    url = resolve("texts", f"file://{tmp_path}/local/deep/*.txt")
    assert plain.files == url.files
    assert url.files[0] == f"file://{tmp_path}/local/deep/0.txt"
    assert [Path(p).read_text() for p in materialize(url, cache)] == ["0", "1", "2"]


# --- DataRef and shard ---------------------------------------------------------------------


def test_repr_redacts_secrets() -> None:
    options = {"key": "AKIA123", "secret": "s3cr3t", "client_kwargs": {"region_name": "eu"}}
    options["client_kwargs"] |= {"aws_session_token": "T0K-VALUE", "endpoint_url": "http://x"}
    ref = DataRef("d", "s3://b/x", ("s3://b/x",), "local", options)
    text = repr(ref)
    for secret in ("AKIA123", "s3cr3t", "T0K-VALUE"):
        assert secret not in text
    assert "http://x" in text and "eu" in text and ref.has_secrets
    assert redact({"anon": True}) == {"anon": True}
    assert not DataRef("d", "s3://b/x", (), "local", {"anon": True}).has_secrets
    assert ref.storage_options == options  # redaction is only for display


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 20, 25])
def test_shard_is_even_contiguous_and_complete(count: int) -> None:
    files = [f"f{i:02d}" for i in range(N_FILES)]
    shards = [shard(files, i, count) for i in range(count)]
    assert [f for s in shards for f in s] == files  # contiguous, in order, nothing lost
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shards == [shard(files, i, count) for i in range(count)]  # deterministic


def test_shard_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="count"):
        shard(["a"], 0, 0)
    with pytest.raises(ValueError, match="index"):
        shard(["a"], 3, 3)


# --- materialize against S3 ----------------------------------------------------------------


def test_materialize_twice_downloads_once(s3: S3Server, bucket: str, cache: DiskCache) -> None:
    ref = resolve("images", f"s3://{bucket}/frames/*.png", storage_options=s3.storage_options())
    parts = [materialize(ref.sharded(i, 4), cache) for i in range(4)]
    paths = [p for part in parts for p in part]
    assert [Path(p).read_bytes() for p in paths] == [f"frame {i}".encode() for i in range(N_FILES)]
    assert Path(paths[3]).name == "frame_0003.png"  # the object's own name, for the user
    assert s3.get_count(bucket) == N_FILES

    again = materialize(ref, DiskCache(cache.root, cache.max_bytes))
    assert again == paths
    assert s3.get_count(bucket) == N_FILES  # the server served no GET the second time


def test_changed_object_is_fetched_again(
    s3: S3Server, s3fs_: s3fs.S3FileSystem, bucket: str, cache: DiskCache
) -> None:
    url = f"s3://{bucket}/notes/readme.txt"
    ref = resolve("doc", url, storage_options=s3.storage_options())
    (first,) = materialize(ref, cache)
    s3fs_.pipe(url, b"new text")
    (second,) = materialize(ref, cache)
    assert Path(second).read_bytes() == b"new text" and first != second
    assert s3.get_count(bucket, "notes/readme.txt") == 2


def test_open_mode_downloads_nothing(s3: S3Server, bucket: str, cache: DiskCache) -> None:
    ref = resolve(
        "images", f"s3://{bucket}/frames/*.png", mode="open", storage_options=s3.storage_options()
    )
    files = materialize(ref.sharded(1, 2), cache)
    assert all(isinstance(f, fsspec.core.OpenFile) for f in files)
    assert cache.total_bytes() == 0 and s3.get_count(bucket) == 0
    with files[0] as handle:
        assert handle.read() == b"frame 10"


def test_vanished_file_names_its_url(
    s3: S3Server, s3fs_: s3fs.S3FileSystem, bucket: str, cache: DiskCache
) -> None:
    ref = resolve("images", f"s3://{bucket}/frames/*.png", storage_options=s3.storage_options())
    s3fs_.rm(f"{bucket}/frames/frame_0002.png")
    with pytest.raises(DataError, match=f"s3://{bucket}/frames/frame_0002.png no longer exists"):
        materialize(ref, cache)


def _materialize_in_child(
    ref: DataRef,
    root: str,
    barrier: multiprocessing.synchronize.Barrier,
    out: multiprocessing.Queue,
) -> None:
    cache = DiskCache(Path(root), parse_size("1GB"))
    # Connect first (a HEAD, not a GET), so that the fetches after the barrier overlap.
    fs, path = filesystem(ref.files[0], ref.storage_options or {})
    fs.info(path)
    barrier.wait(timeout=JOIN_TIMEOUT_S)
    out.put((materialize(ref, cache), cache.stats()))


def test_two_processes_download_an_object_once(
    s3: S3Server, s3fs_: s3fs.S3FileSystem, bucket: str, tmp_path: Path
) -> None:
    # Big enough that one download is still running when the other process asks for it.
    url = f"s3://{bucket}/big.bin"
    s3fs_.pipe(url, os.urandom(16 * 2**20))
    ref = resolve("blob", url, storage_options=s3.storage_options())
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_materialize_in_child, args=(ref, str(tmp_path / "c"), barrier, out))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=JOIN_TIMEOUT_S) for _ in procs]
    for proc in procs:
        proc.join(timeout=JOIN_TIMEOUT_S)
        assert proc.exitcode == 0
    (paths_a, stats_a), (paths_b, stats_b) = results
    assert paths_a == paths_b
    assert s3.get_count(bucket, "big.bin") == 1
    assert (stats_a.misses + stats_b.misses, stats_a.hits + stats_b.hits) == (1, 1)
    assert Path(paths_a[0]).read_bytes() == s3fs_.cat(url)


def test_materialize_with_worker_environment_credentials(
    s3: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job carries no credentials; the (spawned) worker process finds them in its env.
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    ref = resolve("images", f"s3://{bucket}/frames/frame_000[0-4].png")
    assert ref.storage_options is None
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(1), ctx.Queue()
    proc = ctx.Process(target=_materialize_in_child, args=(ref, str(tmp_path), barrier, out))
    proc.start()
    paths, stats = out.get(timeout=JOIN_TIMEOUT_S)
    proc.join(timeout=JOIN_TIMEOUT_S)
    assert proc.exitcode == 0 and stats.misses == 5
    assert Path(paths[4]).read_bytes() == b"frame 4"


# --- the disk cache ------------------------------------------------------------------------


def _writer(payload: bytes, calls: list[str]):
    def fetch(dest: str) -> None:
        calls.append(dest)
        Path(dest).write_bytes(payload)

    return fetch


def test_cache_evicts_least_recently_used_within_bound(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    calls: list[str] = []
    paths = []
    for i in range(10):
        paths.append(cache.get(f"memory://d/{i}", _writer(b"x" * 1000, calls), "v1"))
        cache.release()
    assert cache.total_bytes() == 10_000 and all(p.exists() for p in paths)
    cache.get("memory://d/0", _writer(b"", calls), "v1")  # a hit: 0 is now the most recent
    cache.release()
    for i in range(10, 30):
        paths.append(cache.get(f"memory://d/{i}", _writer(b"x" * 1000, calls), "v1"))
        cache.release()
        assert cache.total_bytes() <= 10_000
    assert paths[0].exists() is False  # used early, then 20 newer entries pushed it out
    assert all(p.exists() for p in paths[-8:])
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes_fetched) == (1, 30, 30_000)
    assert stats.evictions == 30 - len([p for p in paths if p.exists()])
    assert len(calls) == 30


def test_cache_keeps_recently_used_entry(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    calls: list[str] = []
    paths = [cache.get(f"file:///d/{i}", _writer(b"x" * 1000, calls), "v") for i in range(10)]
    cache.release()
    cache.get("file:///d/0", _writer(b"", calls), "v")  # touch the oldest
    cache.release()
    cache.get("file:///d/10", _writer(b"x" * 1000, calls), "v")
    # Down to 90% of the bound: the two least recently used (1 and 2) went, 0 stayed.
    assert [p.exists() for p in paths[:4]] == [True, False, False, True]


def test_cache_does_not_evict_entries_in_use(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=2_500)
    calls: list[str] = []
    held = [cache.get(f"s3://b/{i}", _writer(b"x" * 1000, calls), "v") for i in range(5)]
    assert all(p.exists() for p in held) and cache.total_bytes() == 5_000
    cache.release()
    cache.get("s3://b/5", _writer(b"x" * 1000, calls), "v")
    assert cache.total_bytes() <= 2_500


def test_cache_failed_fetch_leaves_nothing(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)

    def broken(dest: str) -> None:
        Path(dest).write_bytes(b"partial")
        raise ConnectionError("network down")

    with pytest.raises(ConnectionError):
        cache.get("s3://b/k", broken, "v")
    assert cache.total_bytes() == 0 and list((tmp_path / "tmp").iterdir()) == []
    calls: list[str] = []
    assert cache.get("s3://b/k", _writer(b"ok", calls), "v").read_bytes() == b"ok"


def _get_in_child(root: str, url: str, ready: multiprocessing.synchronize.Event, out) -> None:
    cache = DiskCache(Path(root), max_bytes=10_000)
    calls: list[str] = []
    ready.set()
    path = cache.get(url, _writer(b"child", calls), "v")
    out.put((str(path), len(calls), cache.stats()))


def test_cache_second_process_waits_for_the_first(tmp_path: Path) -> None:
    # This process downloads, and while its fetch is running (holding the key's lock) two
    # other processes ask for the same entry: they must reuse this download, never fetch.
    cache = DiskCache(tmp_path, max_bytes=10_000)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    readies = [ctx.Event() for _ in range(2)]
    procs = [
        ctx.Process(target=_get_in_child, args=(str(tmp_path), "s3://b/k", ev, out))
        for ev in readies
    ]

    def slow_fetch(dest: str) -> None:
        for proc in procs:
            proc.start()
        for ev in readies:
            assert ev.wait(timeout=JOIN_TIMEOUT_S)
        Path(dest).write_bytes(b"parent")

    path = cache.get("s3://b/k", slow_fetch, "v")
    results = [out.get(timeout=JOIN_TIMEOUT_S) for _ in procs]
    for proc in procs:
        proc.join(timeout=JOIN_TIMEOUT_S)
    assert all(r[:2] == (str(path), 0) for r in results)
    assert path.read_bytes() == b"parent"


def test_parse_size() -> None:
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5tb") == 1_500_000_000_000
    assert parse_size("4096") == 4096 == parse_size("4096B")
    assert parse_size("2KiB") == 2048 and parse_size("1TiB") == 2**40
    for bad in ("", "GB", "12 parsecs", "-1GB"):
        with pytest.raises(ValueError, match="units: B, KB"):
            parse_size(bad)


def test_version_token_prefers_etag_then_mtime_then_size() -> None:
    assert version_token({"ETag": '"abc"', "size": 3}) == "etag:abc"
    assert version_token({"mtime": 1.5, "size": 3}) == "mtime:1.5:size:3"
    assert version_token({"size": 3}) == "size:3"
