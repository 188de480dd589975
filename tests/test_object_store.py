"""A cache on object storage: extract, ls, knn, probe and resume against a real S3 server
(moto in server mode on loopback, started and stopped here)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from typer.testing import CliRunner

import probekit
from probekit.cli import app

moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 with an empty bucket; credentials as any client reads them."""
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    import boto3

    boto3.client("s3").create_bucket(Bucket="features")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no client left from another endpoint
    try:
        yield "s3://features/cache"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_extract_ls_knn_probe_on_an_s3_cache(s3: str, tmp_path: os.PathLike[str]) -> None:
    kw = dict(random_init=True, quiet=True, pool="mean", layers="last2", chunk_rows=8)
    local = probekit.extract("test_resnet", "synthetic:12", cache_dir=tmp_path, **kw)
    remote = probekit.extract("test_resnet", "synthetic:12", cache_dir=s3, **kw)
    assert remote.store_path.startswith("s3://features/cache/synthetic-12/")
    a, b = probekit.open_store(local.store_path), probekit.open_store(remote.store_path)
    for name in a.feature_names:
        np.testing.assert_array_equal(a.features("test", name), b.features("test", name))
    assert probekit.extract("test_resnet", "synthetic:12", cache_dir=s3, **kw).cache_hit

    runner = CliRunner()
    ls = runner.invoke(app, ["ls", "--cache-dir", s3])
    assert ls.exit_code == 0 and "synthetic:12" in ls.output and "yes" in ls.output, ls.output
    res = runner.invoke(app, ["knn", remote.store_path, "--k", "3,5"])
    assert res.exit_code == 0, res.output
    assert "records: s3://features/cache/synthetic-12/" in res.output
    want = probekit.knn(local.store_path, ks=[3, 5], write=False)
    got = probekit.knn(remote.store_path, ks=[3, 5])
    assert [r.value for r in got.records] == [r.value for r in want.records]
    probe = probekit.probe(remote.store_path, method="logreg")
    assert probe.path is not None and probe.path.startswith("s3://")

    # a run interrupted after some chunks resumes on the object store like on a disk
    group = b.group
    group["train/done"][1] = False
    b.update_meta(status="partial")
    again = probekit.extract("test_resnet", "synthetic:12", cache_dir=s3, **kw)
    chunks = sum(b.num_chunks(s) for s in b.splits)
    assert not again.cache_hit and again.resumed_chunks == chunks - 1
    c = probekit.open_store(remote.store_path)
    for name in a.feature_names:
        np.testing.assert_array_equal(a.features("train", name), c.features("train", name))
