"""Listing image objects: local paths, globs, memory:// and a real S3 server."""
from __future__ import annotations

import fsspec
import pytest

from tasks.enumerate import list_images, plan_table, read_plan, write_plan
from tasks.storage import InputNotFoundError


def test_local_prefix_lists_images_recursively(image_dir):
    objs = list(list_images(str(image_dir)))
    names = sorted(o.uri.rsplit("/", 1)[-1] for o in objs)
    assert "notes.txt" not in names
    assert "china.jpg" in names and "sample-000.jpg" in names and "empty.jpg" in names
    assert all(o.uri.startswith("file://") for o in objs)
    assert all(o.size is not None and o.mtime is not None for o in objs)
    expected = [p for p in image_dir.rglob("*") if p.is_file() and p.suffix != ".txt"]
    assert len(objs) == len(expected)


def test_glob_and_single_file(image_dir, tmp_path):
    jpgs = list(list_images(str(image_dir / "photos" / "*.jpg")))
    assert sorted(o.uri.rsplit("/", 1)[-1] for o in jpgs) == ["china.jpg", "flower.jpg", "rocket.jpg"]
    one = list(list_images(str(image_dir / "photos" / "china.jpg")))
    assert len(one) == 1 and one[0].size == (image_dir / "photos" / "china.jpg").stat().st_size
    # a file named as the input is taken whatever its extension (it ran 0 images, exit 0)
    (tmp_path / "scan.heic").write_bytes(b"x")
    (named,) = list(list_images(str(tmp_path / "scan.heic")))
    assert named.uri == f"file://{tmp_path}/scan.heic"


def test_a_folder_or_file_whose_name_has_glob_characters_is_taken_as_named(tmp_path, photos):
    import shutil

    folder = tmp_path / "shoot [2024]"  # as a glob, [2024] would match one character, not this folder
    folder.mkdir()
    shutil.copy(photos / "china.jpg", folder / "a*.jpg")
    shutil.copy(photos / "flower.jpg", folder / "b.jpg")
    assert sorted(o.uri.rsplit("/", 1)[-1] for o in list_images(str(folder))) == ["a*.jpg", "b.jpg"]
    assert [o.uri.rsplit("/", 1)[-1] for o in list_images(str(folder / "a*.jpg"))] == ["a*.jpg"]
    # and --include / --exclude are relative to that folder, as to any other
    from tasks.inputs import list_inputs
    from tasks.settings import ScoreSettings

    picked = list_inputs(ScoreSettings(input=str(folder), output="o", include=["b.jpg"]))
    assert [o.uri.rsplit("/", 1)[-1] for o in picked] == ["b.jpg"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        list(list_images(str(tmp_path / "missing")))


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/enum-test/a.PNG": b"x", "/enum-test/b.txt": b"y", "/enum-test/sub/c.jpeg": b"z"})
    uris = sorted(o.uri for o in list_images("memory://enum-test"))
    assert uris == ["memory:///enum-test/a.PNG", "memory:///enum-test/sub/c.jpeg"]


def test_s3_listing_records_etags(s3fs_client, s3_bucket, s3_server, photos):
    s3fs_client.put(str(photos / "china.jpg"), f"{s3_bucket}/in/x/china.jpg")
    s3fs_client.pipe(f"{s3_bucket}/in/readme.md", b"no")
    objs = list(list_images(f"s3://{s3_bucket}/in/", {"endpoint_url": s3_server}))
    assert [o.uri for o in objs] == [f"s3://{s3_bucket}/in/x/china.jpg"]
    assert objs[0].etag and '"' not in objs[0].etag and objs[0].mtime is not None


def test_s3_reads_on_64_connections_unless_the_user_says_otherwise(s3fs_client, s3_bucket, s3_server, photos):
    """botocore's 10 connections made a batch of 128 objects 13 round trips (docs/benchmarks.md)."""
    from tasks.storage import S3_POOL_CONNECTIONS, filesystem, read_many

    s3fs_client.put(str(photos / "china.jpg"), f"{s3_bucket}/pool/china.jpg")
    uri = f"s3://{s3_bucket}/pool/china.jpg"
    ours, _ = filesystem(uri, {"endpoint_url": s3_server})
    theirs, _ = filesystem(uri, {"endpoint_url": s3_server,
                                 "config_kwargs": {"max_pool_connections": 7, "user_agent_extra": "deit-test"}})
    for fs in (ours, theirs):
        assert read_many(fs, [uri])[uri] == (photos / "china.jpg").read_bytes()
    assert ours.s3.meta.config.max_pool_connections == S3_POOL_CONNECTIONS == 64
    assert theirs.s3.meta.config.max_pool_connections == 7 and theirs.s3.meta.config.user_agent_extra == "deit-test"


def test_plan_round_trip(tmp_path, image_dir):
    plan_uri = str(tmp_path / "run" / "plan.parquet")
    n = write_plan(plan_table(list(list_images(str(image_dir)))), plan_uri)
    table = read_plan(plan_uri)
    assert table.num_rows == n > 0
    assert table.column_names == ["uri", "source_size", "source_etag", "source_mtime"]
    assert write_plan(plan_table([]), str(tmp_path / "empty.parquet")) == 0
    assert read_plan(str(tmp_path / "empty.parquet")).num_rows == 0


def test_a_listing_the_store_throttles_is_retried(tmp_path, monkeypatch):
    """s3fs raises OSError from the store's error: re-raised "from" itself, the cause that says
    SlowDown was lost, and the plan step failed at once instead of retrying (found in review)."""
    from botocore.exceptions import ClientError

    from tasks import storage
    from tasks.enumerate import list_images

    def throttled(*args, **kwargs):
        try:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                              "ListObjectsV2")
        except ClientError as exc:
            raise OSError("Please reduce your request rate.") from exc  # as s3fs translates it

    fs, _ = storage.filesystem(str(tmp_path))
    monkeypatch.setattr(fs, "isdir", throttled)
    with pytest.raises(OSError) as err:
        list(list_images(str(tmp_path)))
    assert storage.is_transient(err.value)


def test_keys_with_an_empty_segment_are_listed(s3fs_client, s3_bucket, s3_server):
    """fs.walk shows the prefix 'p//' as a nameless folder it never enters (found in review)."""
    import boto3

    from tasks.enumerate import list_images

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = ["p/a.jpg", "p//lead.jpg", "p//q/r.jpg", "p/d/y.jpg", "p/dbl//x.jpg"]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    listed = [o.uri for o in list_images(f"s3://{s3_bucket}/p", {"endpoint_url": s3_server})]
    assert sorted(listed) == sorted(f"s3://{s3_bucket}/{k}" for k in keys) and len(set(listed)) == len(keys)
    from tasks.storage import read_uris

    assert read_uris(listed, {"endpoint_url": s3_server}) == [b"x"] * len(keys)  # and read as listed


def test_a_name_that_is_not_utf8_is_listed_escaped_planned_and_read(tmp_path, photos):
    """One such file failed the whole run at planning (Parquet strings are UTF-8)."""
    from tasks.storage import read_uris

    jpeg = (photos / "china.jpg").read_bytes()
    (tmp_path / "ok.jpg").write_bytes(jpeg)
    with open(bytes(tmp_path) + b"/caf\xe9 \xff.jpg", "wb") as fh:  # Latin-1 bytes, as an old camera card has
        fh.write(jpeg)
    objs = list(list_images(str(tmp_path)))
    uris = sorted(o.uri for o in objs)
    assert uris == [f"file://{tmp_path}/caf\\xe9 \\xff.jpg", f"file://{tmp_path}/ok.jpg"]
    assert plan_table(objs).num_rows == 2  # writable: this raised UnicodeEncodeError
    assert read_uris(uris, {}) == [jpeg, jpeg]  # the escaped name reads the file it names


def test_fifos_and_devices_become_read_errors_instead_of_blocking(tmp_path, photos):
    import os

    from tasks.storage import read_uris

    os.mkfifo(tmp_path / "pipe.jpg")  # a read would wait for a writer for ever
    os.symlink("/dev/zero", tmp_path / "zero.jpg")  # a read would never end
    (tmp_path / "ok.jpg").write_bytes((photos / "china.jpg").read_bytes())
    got = dict(zip(["ok", "pipe", "zero"], read_uris([f"file://{tmp_path}/{n}.jpg" for n in ("ok", "pipe", "zero")], {})))
    assert isinstance(got["ok"], bytes)
    for name in ("pipe", "zero"):
        assert isinstance(got[name], OSError) and not isinstance(got[name], FileNotFoundError)
        assert "not a regular file" in str(got[name]) and f"{name}.jpg" in str(got[name])


def test_a_subfolder_that_cannot_be_listed_fails_the_listing_naming_it(tmp_path, photos, monkeypatch):
    """fsspec's walk leaves such a folder out silently below the top level; its images would be lost.

    The permission error is injected (tests may run as root, whom chmod does not stop).
    """
    from fsspec.implementations.local import LocalFileSystem

    for folder in ("a", "b/locked"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.jpg").write_bytes((photos / "china.jpg").read_bytes())
    real_ls = LocalFileSystem.ls

    def ls(self, path, *args, **kwargs):
        if path.rstrip("/").endswith("/b/locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_ls(self, path, *args, **kwargs)

    assert len(list(list_images(str(tmp_path)))) == 2
    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    with pytest.raises(PermissionError, match=r"cannot list folder .*/b/locked under the input \(Permission denied\)"):
        list(list_images(str(tmp_path)))
