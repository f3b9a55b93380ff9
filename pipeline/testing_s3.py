"""A real S3 API on loopback (moto's server) for `lmim bench pipeline --s3-loopback`.

The test suite's fixture (`tests/s3server.py`) lives outside the installed packages; the
benchmark needs the same thing from an installed `lmim`, so it reuses that module's design here:
moto's WSGI app behind werkzeug, wrapped to log every request (method, path, Range header), so
requests per shard can be counted. Needs `moto[server]` (a dev extra).
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None


@dataclass
class LoopbackS3:
    endpoint_url: str
    requests: list[LoggedRequest] = field(default_factory=list)
    _server: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, substring: str = "") -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and substring in r.path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}, "key": "bench", "secret": "bench"}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_loopback_s3() -> LoopbackS3:
    try:
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    except ImportError:
        raise SystemExit("--s3-loopback needs moto's server: pip install 'moto[server]' (or lmim[dev]).") from None
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = LoopbackS3(endpoint_url=f"http://127.0.0.1:{port}")
    app = DomainDispatcherApplication(create_backend_app)

    def logging_app(environ, start_response):
        with info._lock:
            info.requests.append(LoggedRequest(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                               environ.get("HTTP_RANGE")))
        return app(environ, start_response)

    server = make_server("127.0.0.1", port, logging_app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    info._server = server
    return info
