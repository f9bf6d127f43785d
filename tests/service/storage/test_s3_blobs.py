"""S3BlobStore against a real S3 endpoint (SeaweedFS, tests/infra.py): the BlobStore contract, the marker that
makes a pair of files atomic for readers, leftovers of interrupted writes, and an endpoint that goes away."""

from __future__ import annotations

import threading
import time
import uuid

import boto3
import pytest
from infra import SeaweedS3Server, ServerUnavailable, free_port, make_s3_blobs

from service.storage.interfaces import BlobStore, StorageUnavailableError
from service.storage.s3_blobs import MARKER, S3BlobStore

FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00weights" * 1000}
SHA, SHA2 = "ab" * 32, "cd" * 32


@pytest.fixture
def blobs(s3_settings):
    store = make_s3_blobs(s3_settings)
    yield store
    store.close()


def raw_client(settings):
    return boto3.client("s3", endpoint_url=settings["endpoint_url"], region_name=settings["region"],
                        aws_access_key_id=settings["access_key_id"],
                        aws_secret_access_key=settings["secret_access_key"])


def test_is_a_blob_store(blobs):
    assert isinstance(blobs, BlobStore)


def test_put_get_exists_list_delete(blobs):
    assert not blobs.exists(SHA) and list(blobs.list()) == []
    with pytest.raises(FileNotFoundError):
        blobs.get(SHA, "adapter_config.json")
    before = time.time()
    assert blobs.put(SHA, FILES) is True
    assert blobs.put(SHA, FILES) is False  # content-addressed: the same bytes are already there
    assert blobs.exists(SHA)
    assert {f: blobs.get(SHA, f) for f in FILES} == FILES
    with pytest.raises(FileNotFoundError):
        blobs.get(SHA, "other.bin")
    listed = dict(blobs.list())
    assert list(listed) == [SHA] and before - 60 < listed[SHA] < time.time() + 60
    blobs.delete(SHA)
    blobs.delete(SHA)  # idempotent
    assert not blobs.exists(SHA) and list(blobs.list()) == []
    with pytest.raises(FileNotFoundError):
        blobs.get(SHA, "adapter_config.json")


def test_a_blob_without_its_marker_is_invisible_and_collected_after_the_grace(blobs, s3_settings):
    s3 = raw_client(s3_settings)
    prefix = f"{blobs.prefix}/{SHA2[:2]}/{SHA2}/"
    s3.put_object(Bucket=blobs.bucket, Key=prefix + "adapter_config.json", Body=b"{}")  # a writer died here
    blobs.put(SHA, FILES)
    assert not blobs.exists(SHA2) and [s for s, _ in blobs.list()] == [SHA]
    with pytest.raises(FileNotFoundError):
        blobs.get(SHA2, "adapter_config.json")
    assert blobs.collect_temporary(3600) == 0  # maybe still being written
    assert blobs.collect_temporary(0) == 1
    assert s3.list_objects_v2(Bucket=blobs.bucket, Prefix=prefix).get("KeyCount", 0) == 0
    assert blobs.exists(SHA)  # complete blobs are never touched
    assert blobs.put(SHA2, FILES) is True


def test_a_put_over_leftover_files_completes_the_blob(blobs, s3_settings):
    s3 = raw_client(s3_settings)
    key = f"{blobs.prefix}/{SHA2[:2]}/{SHA2}/adapter_model.safetensors"
    s3.put_object(Bucket=blobs.bucket, Key=key, Body=FILES["adapter_model.safetensors"])
    assert blobs.put(SHA2, FILES) is True  # the existing file answers 412, which means "already there"
    assert {f: blobs.get(SHA2, f) for f in FILES} == FILES
    objects = s3.list_objects_v2(Bucket=blobs.bucket, Prefix=f"{blobs.prefix}/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in objects) == sorted([*FILES, MARKER])


def test_concurrent_puts_of_one_blob_write_it_once(s3_settings):
    first = make_s3_blobs(s3_settings)
    second = S3BlobStore(first.url, **{k: v for k, v in s3_settings.items() if k != "bucket"})
    results, barrier = [], threading.Barrier(4)

    def put(store):
        barrier.wait()
        results.append(store.put(SHA, FILES))

    threads = [threading.Thread(target=put, args=(s,)) for s in (first, second, first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert second.get(SHA, "adapter_model.safetensors") == FILES["adapter_model.safetensors"]


def test_a_delete_elsewhere_is_seen(s3_settings):
    first = make_s3_blobs(s3_settings)
    second = S3BlobStore(first.url, **{k: v for k, v in s3_settings.items() if k != "bucket"})
    first.put(SHA, FILES)
    assert second.get(SHA, "adapter_config.json") == FILES["adapter_config.json"]
    first.delete(SHA)
    assert not second.exists(SHA)
    with pytest.raises(FileNotFoundError):
        second.get(SHA, "adapter_config.json")


def test_bad_digests_and_names_are_refused(blobs):
    for sha in ("../x", "AB" * 32, "ab" * 31):
        with pytest.raises(ValueError):
            blobs.put(sha, FILES)
    with pytest.raises(ValueError):
        blobs.get(SHA, "../x")
    with pytest.raises(ValueError):
        blobs.put(SHA, {MARKER: b""})


def test_the_bucket_is_created_at_open(s3_settings):
    bucket = f"lora-new-{uuid.uuid4().hex[:8]}"
    store = S3BlobStore(f"s3://{bucket}", **{k: v for k, v in s3_settings.items() if k != "bucket"})
    assert store.put(SHA, FILES) and dict(store.list()).keys() == {SHA}
    raw_client(s3_settings).head_bucket(Bucket=bucket)


def test_wrong_url_is_refused():
    with pytest.raises(ValueError, match="s3://"):
        S3BlobStore("http://bucket/x")


def test_unreachable_endpoint_is_storage_unavailable():
    with pytest.raises(StorageUnavailableError) as err:
        S3BlobStore("s3://b/p", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                    access_key_id="k", secret_access_key="s", timeout_s=1)
    assert err.value.component == "blobs"


def test_endpoint_stopped_then_restarted_under_a_live_client(tmp_path):
    server = SeaweedS3Server(tmp_path)
    try:
        server.start()
    except ServerUnavailable as exc:
        pytest.skip(f"SeaweedFS cannot run here: {exc}")
    try:
        store = make_s3_blobs(server.settings, timeout_s=1)
        store.put(SHA, FILES)
        server.stop()
        for call in (lambda: store.get(SHA, "adapter_config.json"), lambda: store.exists(SHA),
                     lambda: store.put(SHA2, FILES), lambda: list(store.list())):
            with pytest.raises(StorageUnavailableError) as err:
                call()
            assert err.value.component == "blobs"
        server.start()  # same port, same data
        assert store.get(SHA, "adapter_model.safetensors") == FILES["adapter_model.safetensors"]
        assert store.put(SHA2, FILES) is True
    finally:
        server.stop()
