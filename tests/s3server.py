"""A real S3 API on loopback: moto's server app behind werkzeug, with a request log.

Tests count requests per shard through `S3Server.requests`, so the WSGI app is wrapped in a
small middleware that records each request's method, path and query before moto answers it.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class S3Request:
    method: str
    path: str
    query: str
    range: str | None


@dataclass
class S3Server:
    endpoint_url: str
    requests: list[S3Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def gets(self, key_substring: str = "") -> list[S3Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and key_substring in r.path]

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server() -> tuple[S3Server, object]:
    """Start moto's S3 server on a free loopback port; returns (server info, werkzeug server)."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    port = _free_port()
    info = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    app = DomainDispatcherApplication(create_backend_app)

    def counting_app(environ, start_response):
        with info._lock:
            info.requests.append(S3Request(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                           environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE")))
        return app(environ, start_response)

    server = make_server("127.0.0.1", port, counting_app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return info, server


# The standard AWS variables, so s3fs, boto3 and DALI's AWS SDK all reach the loopback server.
def aws_env(endpoint_url: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "S3_USE_VIRTUAL_ADDRESSING": "0",  # DALI's S3 client: path-style addressing on loopback
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
