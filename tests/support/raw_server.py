"""A real TCP server that answers bytes no HTTP server library would send: garbage, a
body that lies about its encoding, an answer too large to hold.

    server = RawServer(lambda request: [b"HTTP/1.1 abc\\r\\n\\r\\n"])
    ... point a client at server.url("/hook") ...
    server.close()

It runs on 127.0.0.1 (a free port) in a background thread. For each connection it reads
the request (one `recv`), sends the chunks `answer(request)` gives, and closes the
connection. A client that hangs up early (it read what it wanted) ends that answer.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable


class RawServer:
    def __init__(self, answer: Callable[[bytes], Iterable[bytes]]) -> None:
        self._answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn, contextlib.suppress(OSError):
                request = conn.recv(65536)
                for chunk in self._answer(request):
                    conn.sendall(chunk)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.sock.close()
