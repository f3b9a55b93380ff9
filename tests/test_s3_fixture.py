"""The loopback S3 server is real: s3fs writes through HTTP and every request is logged."""
import fsspec


def test_s3fs_round_trip_is_logged(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/a/b.bin"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    with fs.open(url, "wb") as f:
        f.write(b"hello" * 1000)
    assert fs.cat(url) == b"hello" * 1000
    assert any(r.method == "PUT" for r in s3_server.requests)
    assert s3_server.gets("/a/b.bin"), "the read must reach the server as a GET"
