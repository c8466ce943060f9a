"""Storage locations: resolution, safe joins, atomic small-file I/O, S3 on a loopback server."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import storage
from pipelines.io.storage import Location, StorageOptions, redact, resolve, safe_relpath
from tests.s3server import S3Server

# --- resolve ---------------------------------------------------------------------------------


def test_plain_relative_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("out/run1/")
    assert loc.path == str(tmp_path / "out" / "run1")
    assert loc.uri == (tmp_path / "out" / "run1").as_uri()
    assert loc.is_local


def test_file_uri_and_plain_absolute_path_agree(tmp_path: Path):
    by_uri = resolve(f"file://{tmp_path}/a")
    by_localhost = resolve(f"file://localhost{tmp_path}/a")
    by_path = resolve(f"{tmp_path}/a")
    assert by_uri.path == by_localhost.path == by_path.path == f"{tmp_path}/a"
    assert by_uri.uri == by_path.uri == f"file://{tmp_path}/a"


def test_file_uri_percent_encoding_round_trips(tmp_path: Path):
    loc = resolve(str(tmp_path / "with space"))
    assert "%20" in loc.uri
    assert resolve(loc.uri).path == str(tmp_path / "with space")


def test_s3_uri_is_normalised():
    loc = resolve("s3://my-bucket/some/prefix/")
    assert loc.uri == "s3://my-bucket/some/prefix"
    assert loc.path == "my-bucket/some/prefix"
    assert not loc.is_local
    assert resolve("s3://my-bucket").path == "my-bucket"


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "gs://bucket/x",
        "http://example.com/x",
        "hdfs://namenode/x",
        "s3://",
        "s3://Bad_Bucket!/x",
        "s3://bucket/a/../b",
        "s3://bucket/a//b",
        "s3://bucket/x?versionId=1",
        "file://otherhost/tmp/x",
    ],
)
def test_unsupported_or_malformed_uris_are_refused(uri: str):
    with pytest.raises(ValueError):
        resolve(uri)


def test_credentials_in_uri_are_refused_without_echoing_them():
    with pytest.raises(ValueError) as info:
        resolve("s3://AKIAFAKE:verysecretvalue@bucket/x")
    assert "verysecretvalue" not in str(info.value)


def test_options_fall_back_to_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    loc = resolve("s3://bucket/x")
    assert loc.options == StorageOptions(endpoint_url="http://127.0.0.1:9", region="eu-west-3")
    explicit = resolve("s3://bucket/x", StorageOptions(endpoint_url="http://127.0.0.1:10"))
    assert explicit.options.endpoint_url == "http://127.0.0.1:10"
    assert explicit.options.region == "eu-west-3"


def test_options_without_environment(monkeypatch: pytest.MonkeyPatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert resolve("s3://bucket").options == StorageOptions()


@pytest.mark.parametrize("endpoint", ["ftp://host", "127.0.0.1:9000", "http://user:pw@host"])
def test_bad_endpoints_are_refused(endpoint: str):
    with pytest.raises(ValueError) as info:
        resolve("s3://bucket", StorageOptions(endpoint_url=endpoint))
    assert "pw@" not in str(info.value)


# --- child / safe joins ----------------------------------------------------------------------


def test_child_joins_parts_and_segments(tmp_path: Path):
    s3 = resolve("s3://bucket/run")
    assert s3.child("shards", "part-0.parquet").uri == "s3://bucket/run/shards/part-0.parquet"
    assert s3.join("shards/part-0.parquet") == "bucket/run/shards/part-0.parquet"
    local = resolve(str(tmp_path))
    assert local.join("masks", "a.png") == f"{tmp_path}/masks/a.png"
    assert local.child("masks").options == local.options


@pytest.mark.parametrize(
    "parts", [("..",), ("a", "..", "b"), ("/etc/passwd",), ("",), ("a//b",), ("a\\b",), (".",)]
)
def test_child_refuses_traversal(parts: tuple[str, ...]):
    with pytest.raises(ValueError):
        resolve("s3://bucket/run").child(*parts)
    with pytest.raises(ValueError):
        resolve("/tmp/run").child(*parts)


def test_safe_relpath_requires_parts():
    with pytest.raises(ValueError):
        safe_relpath()
    assert safe_relpath("a/b", "c") == "a/b/c"


def test_location_pickles():
    loc = resolve("s3://bucket/x", StorageOptions(endpoint_url="http://127.0.0.1:1"))
    assert pickle.loads(pickle.dumps(loc)) == loc


# --- credentials never shown -----------------------------------------------------------------


def test_redact_scrubs_env_secrets_and_key_value_patterns(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-abcdef")
    text = (
        "failed: s3cr3t-value-123 tok-abcdef aws_secret_access_key=zzz1 "
        "X-Amz-Signature=deadbeef password: hunter2 https://u:pw123@host/x key=shards/a"
    )
    out = redact(text)
    for secret in ("s3cr3t-value-123", "tok-abcdef", "zzz1", "deadbeef", "hunter2", "pw123"):
        assert secret not in out
    assert "key=shards/a" in out  # object keys stay readable


def test_repr_has_no_credentials(monkeypatch: pytest.MonkeyPatch):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    loc = resolve("s3://bucket/x")
    assert secret not in repr(loc)
    assert secret not in repr(loc.options)
    assert os.environ["AWS_ACCESS_KEY_ID"] not in repr(loc)


# --- local small-file I/O --------------------------------------------------------------------


def test_local_atomic_write_and_read(tmp_path: Path):
    loc = resolve(str(tmp_path / "out"))
    storage.write_bytes_atomic(loc, "a/b.json", b"{}")
    storage.write_bytes_atomic(loc, "a/b.json", b'{"x": 1}')
    assert storage.read_bytes(loc, "a/b.json") == b'{"x": 1}'
    assert loc.fs.size(loc.join("a/b.json")) == 8
    assert os.listdir(tmp_path / "out" / "a") == ["b.json"]  # no temporary files left
    with pytest.raises(FileNotFoundError, match="not found"):
        storage.read_bytes(loc, "missing.json")
    with pytest.raises(ValueError, match="more than"):
        storage.read_bytes(loc, "a/b.json", max_bytes=3)


def test_local_upload_and_remove_tree(tmp_path: Path):
    src = tmp_path / "model.bin"
    src.write_bytes(b"x" * 1000)
    loc = resolve(str(tmp_path / "out"))
    assert storage.upload_file(loc, "model/model.bin", str(src)) == 1000
    assert (tmp_path / "out" / "model" / "model.bin").read_bytes() == b"x" * 1000
    storage.remove_tree(loc)
    assert not storage.exists(loc)


# --- S3 on the loopback server ---------------------------------------------------------------


def test_s3_round_trip_with_fsspec(s3_bucket: str, s3_server: S3Server):
    loc = resolve(s3_bucket).child("run")
    storage.write_bytes_atomic(loc, "dir/hello.txt", b"hello")
    assert storage.read_bytes(loc, "dir/hello.txt") == b"hello"
    assert loc.fs.size(loc.join("dir/hello.txt")) == 5
    assert storage.exists(loc, "dir")
    bucket = s3_bucket.removeprefix("s3://")
    assert (s3_server.bucket_dir(bucket) / "run" / "dir" / "hello.txt").read_bytes() == b"hello"
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(loc, "dir/missing.txt")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
    storage.remove_tree(loc)
    assert not storage.exists(loc, "dir/hello.txt")


def test_s3_parquet_through_pickled_pyarrow_fs(s3_bucket: str):
    loc = resolve(s3_bucket).child("tables")
    fs = pickle.loads(pickle.dumps(loc.pyarrow_fs()))  # as a Ray worker receives it
    table = pa.table({"image_id": ["a", "b"], "height": pa.array([3, 4], pa.int32())})
    pq.write_table(table, loc.join("t.parquet"), filesystem=fs)
    assert pq.read_table(loc.join("t.parquet"), filesystem=fs).equals(table)
    assert loc.fs.size(loc.join("t.parquet")) == fs.get_file_info(loc.join("t.parquet")).size


def test_s3_write_survives_server_restart(s3_bucket: str, s3_server: S3Server):
    loc = resolve(s3_bucket)
    storage.write_bytes_atomic(loc, "before.bin", b"1")
    s3_server.stop()
    restarter = threading.Timer(1.0, s3_server.start)
    restarter.start()
    try:
        storage.write_bytes_atomic(loc, "during.bin", b"2" * 100_000)  # retried until it is up
    finally:
        restarter.join()
    assert storage.read_bytes(loc, "before.bin") == b"1"
    assert storage.read_bytes(loc, "during.bin") == b"2" * 100_000


def test_s3_wrong_credentials_error_is_redacted(s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-this-test")
    storage._s3_fs.cache_clear()
    try:
        loc = resolve(s3_bucket, StorageOptions(region="eu-central-1"))  # a fresh client
        with pytest.raises(Exception) as info:
            storage.read_bytes(loc, "x")
        assert "wrong-secret-for-this-test" not in redact(str(info.value))
    finally:
        storage._s3_fs.cache_clear()


def test_location_dataclass_is_frozen():
    loc = Location(uri="s3://b", path="b")
    with pytest.raises(AttributeError):
        loc.uri = "s3://c"  # type: ignore[misc]


@pytest.mark.slow
def test_ray_data_round_trip_on_s3(s3_bucket: str, ray_session: None):
    """Ray Data workers reach the loopback server through the pickled filesystem."""
    import ray

    loc = resolve(s3_bucket).child("ray")
    fs = loc.pyarrow_fs()
    items = [{"image_id": f"img{i}", "height": i} for i in range(20)]
    ray.data.from_items(items).repartition(2).write_parquet(loc.join("shards"), filesystem=fs)
    names = loc.fs.ls(loc.join("shards"), detail=False)
    assert len(names) >= 1 and all(n.endswith(".parquet") for n in names)
    rows = ray.data.read_parquet(names, filesystem=fs).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(i["image_id"] for i in items)


def test_read_many_retries_storage_errors_and_raises_when_they_persist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    loc = resolve(str(tmp_path))
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the backoff, not what is tested
    fs = loc.fs
    real_cat, real_cat_file = fs.cat, fs.cat_file
    failures = {"a": 2}  # `a` fails in the batch and once more alone, then reads

    def flaky_cat(paths, on_error="raise"):
        got = real_cat(paths, on_error=on_error)
        return {p: ConnectionError("reset") if p.endswith("/a") else v for p, v in got.items()}

    def flaky_cat_file(path, *args, **kwargs):
        name = path.rsplit("/", 1)[-1]
        if failures.get(name, 0) > 1:
            failures[name] -= 1
            raise ConnectionError("reset by peer")
        return real_cat_file(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat", flaky_cat)
    monkeypatch.setattr(fs, "cat_file", flaky_cat_file)
    got = storage.read_many(loc, ["a", "b", "missing"])
    assert got["a"] == b"A" and got["b"] == b"B"  # the transient error was retried
    assert isinstance(got["missing"], FileNotFoundError)  # a missing file is data, not an error
    failures["a"] = 99  # the store stays down for `a`: an error, never a missing file
    with pytest.raises(ConnectionError):
        storage.read_many(loc, ["a", "b"])
