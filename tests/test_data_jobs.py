"""Datasets, shipped files and result files, end to end: a real S3 server on loopback, a real
gateway, real workers with their own disk caches, and the client's own listing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from s3server import S3Server, s3_server

import pilot
from tests_support import TEST_TIMEOUTS, KernelDriver

pytestmark = pytest.mark.system

N_FILES = 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        fs = s3fs.S3FileSystem(**server.storage_options())
        fs.mkdir("frames")
        for i in range(N_FILES):
            fs.pipe(f"frames/f{i:02d}.png", f"frame {i}".encode() * 1000)
        fs.mkdir("results")
        yield server


@pytest.fixture(scope="module")
def cluster(s3: S3Server) -> Iterator[pilot.LocalCluster]:
    # The workers get their own credentials from their environment, never from the job.
    with pilot.LocalCluster(workers=2, env=s3.env(), timeouts=TEST_TIMEOUTS) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: pilot.LocalCluster, s3: S3Server) -> Iterator[pilot.Client]:
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())  # the notebook lists with its own credentials too
    try:
        yield cluster.client()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_shard(partition: int, images: list[str]) -> list[tuple[str, bool, str]]:
    """(file name, is a local file, the number the file holds) for each file of the shard."""
    return [
        (os.path.basename(p), os.path.isfile(p), Path(p).read_text().split("frame ")[1])
        for p in images
    ]


def test_partitions_see_their_shard_as_local_cached_paths(client: pilot.Client) -> None:
    job = client.map(read_shard, range(4), chunk=1, data={"images": "s3://frames/*.png"})
    shards = job.results
    assert [len(s) for s in shards] == [5, 5, 5, 5]
    names = [name for shard in shards for name, _, _ in shard]
    assert names == [f"f{i:02d}.png" for i in range(N_FILES)], "contiguous, in order"
    assert all(is_local for shard in shards for _, is_local, _ in shard)
    assert [number for shard in shards for _, _, number in shard] == [
        str(i) for i in range(N_FILES)
    ]


def test_rerun_downloads_nothing(client: pilot.Client, s3: S3Server) -> None:
    data = {"images": "s3://frames/*.png"}
    client.map(read_shard, range(4), chunk=1, data=data).wait(60)
    before = s3.get_count("frames")
    client.map(read_shard, range(4), chunk=1, data=data).wait(60)
    assert s3.get_count("frames") == before, "a rerun reads every file from the caches"


def first_bytes(item: int, images: list) -> list[bytes]:
    out = []
    for f in images:
        with f as fh:
            out.append(fh.read(7))
    return out


def test_open_mode_gives_open_files(client: pilot.Client) -> None:
    job = client.map(
        first_bytes, range(2), chunk=1, data={"images": "s3://frames/f0*.png"}, data_mode="open"
    )
    assert job.results == [
        [f"frame {i}".encode() for i in range(5)],
        [f"frame {i}".encode() for i in range(5, 10)],
    ]


def count_all(item: int, images: list[str]) -> int:
    return len(images)


def test_without_sharding_every_item_sees_every_file(client: pilot.Client) -> None:
    job = client.map(
        count_all, range(3), chunk=1, data={"images": "s3://frames/"}, shard_data=False
    )
    assert job.results == [N_FILES] * 3


def test_missing_bucket_fails_before_any_task(client: pilot.Client) -> None:
    before = len(client.jobs(500))
    with pytest.raises(pilot.DataError, match="nosuchbucket"):
        client.map(count_all, range(2), data={"images": "s3://nosuchbucket/*.png"})
    assert len(client.jobs(500)) == before, "nothing was submitted"


def test_unknown_scheme_says_what_to_install(client: pilot.Client) -> None:
    with pytest.raises(pilot.DataError, match="pip install"):
        client.map(count_all, range(2), data={"images": "gs://bucket/x/*.png"})


def test_secrets_are_never_put_in_a_job(client: pilot.Client, s3: S3Server) -> None:
    with pytest.raises(pilot.ConfigError, match="credentials"):
        client.map(
            count_all,
            range(2),
            data={"images": "s3://frames/*.png"},
            storage_options=s3.storage_options(),
        )


def hold(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_file_vanishing_mid_job_fails_only_its_items(client: pilot.Client, s3: S3Server) -> None:
    fs = s3fs.S3FileSystem(**s3.storage_options())
    fs.pipe("frames/extra/a.png", b"a")
    fs.pipe("frames/extra/b.png", b"b")
    gate = client.map(hold, [1.0, 1.0], chunk=1)  # both workers busy: the next job waits
    job = client.map(
        count_all, range(2), chunk=1, data={"images": "s3://frames/extra/*.png"}, retries=0
    )
    fs.rm("frames/extra/b.png")
    gate.wait(60)
    with pytest.raises(pilot.TaskError, match=r"b\.png"):
        job.wait(60)
    assert list(job.outcomes()) == [0], "the other item succeeded"


def uses_shipped(item: int) -> str:
    return Path("scene.blend").read_text() + f":{item}"


def test_shipped_file_is_in_the_working_directory(client: pilot.Client, tmp_path: Path) -> None:
    scene = tmp_path / "scene.blend"
    scene.write_text("the scene")
    job = client.map(uses_shipped, range(2), chunk=1, ship=[scene])
    assert job.results == ["the scene:0", "the scene:1"]
    puts = client.status().counters.get("blob_puts", 0)
    assert client.map(uses_shipped, [5], ship=[scene]).results == ["the scene:5"]
    assert client.status().counters.get("blob_puts", 0) == puts, "shipped once"


def writes_output(item: int) -> int:
    out = pilot.output_dir() / f"out-{item}.txt"
    out.write_text(f"result {item}")
    return item


def test_result_files_come_back_as_local_paths(client: pilot.Client, tmp_path: Path) -> None:
    job = client.map(writes_output, range(3), chunk=1)
    job.wait(60)
    files = job.files(tmp_path)
    assert sorted(files) == [0, 1, 2]
    for item, paths in files.items():
        assert Path(paths[0]).read_text() == f"result {item}"


def test_result_files_to_a_url(client: pilot.Client, s3: S3Server) -> None:
    job = client.map(writes_output, range(2), chunk=1, results="s3://results/run1")
    job.wait(60)
    files = job.files()
    fs = s3fs.S3FileSystem(**s3.storage_options())
    for item, urls in files.items():
        assert urls[0].startswith("s3://results/run1/")
        assert fs.cat(urls[0]) == f"result {item}".encode()


def test_gateway_relays_no_dataset_bytes(client: pilot.Client, s3: S3Server) -> None:
    fs = s3fs.S3FileSystem(**s3.storage_options())
    for i in range(8):
        fs.pipe(f"frames/big/{i}.bin", os.urandom(1 << 20))
    before = client.status().counters
    client.map(count_all, range(4), chunk=1, data={"images": "s3://frames/big/"}).wait(60)
    after = client.status().counters
    relayed = sum(after.get(k, 0) - before.get(k, 0) for k in ("bytes_in", "bytes_out"))
    assert 0 < relayed < (8 << 20) // 20, f"the gateway carried {relayed} bytes"


def test_magic_data_partitions(cluster: pilot.LocalCluster, s3: S3Server, tmp_path) -> None:
    k = KernelDriver(env={"PILOT_HOME": str(cluster.home), "IPYTHONDIR": str(tmp_path), **s3.env()})
    try:
        k.run("%load_ext pilot_magics")
        ex = k.run(
            "%%distribute --data images=s3://frames/*.png --partitions 4 --gather counts\n"
            "len(images)"
        )
        assert ex.status == "ok", ex.stderr
        out = k.run("counts").of("execute_result")[0]["content"]["data"]["text/plain"]
        assert out == "[5, 5, 5, 5]"
        ex = k.run("%%distribute --data images=s3://nosuchbucket/x --partitions 2\nlen(images)")
        assert ex.status == "error" and "nosuchbucket" in ex.reply["content"]["evalue"]
    finally:
        k.shutdown()
