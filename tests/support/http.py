"""A loopback HTTP server for tool tests: answers with given statuses in turn, then 200."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Hit:
    path: str
    at: float
    """time.time() when the request arrived."""


@contextmanager
def loopback_server(
    statuses: list[int], ok_body: Callable[[int], bytes] = lambda n: f"fetched on attempt {n}".encode()
) -> Iterator[tuple[str, list[Hit]]]:
    """Yields the base URL and the requests it got. A 200 answers `ok_body(request number)`."""
    hits: list[Hit] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            hits.append(Hit(self.path, time.time()))
            status = statuses.pop(0) if statuses else 200
            body = ok_body(len(hits)) if status == 200 else f"status {status}".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
