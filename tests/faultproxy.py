"""A loopback TCP proxy that puts real network faults between an S3 client and the moto server.

Each HTTP request through the proxy gets one fate from a seeded schedule:
- "ok": forwarded, the answer streamed back;
- "slowdown": answered by the proxy with S3's `503 SlowDown` error, the upstream never sees it;
- "reset": the client connection is reset (RST) before an answer;
- "cut": the upstream answer's headers and half of its body are sent, then the connection closes;
- "stall": held `stall_s` seconds, then forwarded (a slow store, or one past the client's timeout).
`down=True` refuses every request (an outage) until it is set back to False; `down_after=N` sets it
after N requests (an outage that starts mid-run).

HTTP/1.1 keep-alive is honoured (botocore reuses connections); bodies are delimited by
Content-Length, which is what moto sends. Tests only: the proxy is not part of the product.
"""
from __future__ import annotations

import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

FATES = ("ok", "slowdown", "reset", "cut", "stall")
_SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    fault_rate: float = 0.0                 # share of requests that get a fault
    faults: tuple[str, ...] = ("slowdown", "reset", "cut", "stall")
    stall_s: float = 0.3
    seed: int = 0
    down: bool = False
    down_after: int | None = None           # go down for good after this many requests
    counts: dict[str, int] = field(default_factory=lambda: {f: 0 for f in (*FATES, "refused")})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    # ------------------------------------------------------------------ plumbing
    def _fate(self) -> str:
        with self._lock:
            if self.down_after is not None and sum(self.counts.values()) >= self.down_after:
                self.down = True
            if self.down:
                self.counts["refused"] += 1
                return "refused"
            fate = self._rng.choice(self.faults) if self._rng.random() < self.fault_rate else "ok"
            self.counts[fate] += 1
            return fate

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _read_message(conn: socket.socket, buf: bytearray, answers_head: bool = False) -> tuple[bytes, bytes] | None:
        """(head, body) of one HTTP message from conn (buf holds bytes already read); None at EOF."""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        end = buf.index(b"\r\n\r\n") + 4
        head = bytes(buf[:end])
        del buf[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if answers_head:  # the answer to a HEAD request has no body, whatever Content-Length says
            length = 0
        while len(buf) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        body = bytes(buf[:length])
        del buf[:length]
        return head, body

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        cbuf, ubuf = bytearray(), bytearray()
        try:
            while True:
                msg = self._read_message(client, cbuf)
                if msg is None:
                    return
                head, body = msg
                method = head.split(b" ", 1)[0]
                fate = self._fate()
                if fate in ("reset", "refused"):
                    self._reset(client)
                    return
                if fate == "slowdown":
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_SLOWDOWN) + _SLOWDOWN)
                    client.close()
                    return
                if fate == "stall":
                    time.sleep(self.stall_s)
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                upstream.sendall(head + body)
                answer = self._read_message(upstream, ubuf, answers_head=method == b"HEAD")
                if answer is None:
                    self._reset(client)
                    return
                rhead, rbody = answer
                if fate == "cut" and len(rbody) > 1:
                    client.sendall(rhead + rbody[: len(rbody) // 2])
                    client.close()
                    return
                client.sendall(rhead + rbody)
        except OSError:
            return
        finally:
            try:
                client.close()
            except OSError:
                pass
            if upstream is not None:
                upstream.close()
