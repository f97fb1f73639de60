"""A loopback HTTP server for tool tests: answers with given statuses in turn, then 200, or with
the pages a test serves; it records every request, with the headers it came with."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Hit:
    path: str
    at: float
    """time.time() when the request arrived."""
    headers: dict[str, str] = field(default_factory=dict)
    """The request's headers, names in lower case."""


Page = Callable[[Hit], tuple[int, dict[str, str], bytes]]
"""Answers one request: status, headers and body."""


@contextmanager
def loopback_server(
    statuses: list[int], ok_body: Callable[[int], bytes] = lambda n: f"fetched on attempt {n}".encode(),
    *, page: Page | None = None, host: str = "127.0.0.1",
) -> Iterator[tuple[str, list[Hit]]]:
    """Yields the base URL and the requests it got. A 200 answers `ok_body(request number)`;
    `page`, when given, answers every request instead. `host` may be any loopback address
    (127.0.0.2 is another host name than 127.0.0.1 to an allowlist)."""
    hits: list[Hit] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            hit = Hit(self.path, time.time(), {name.lower(): value for name, value in self.headers.items()})
            hits.append(hit)
            headers: dict[str, str] = {}
            if page is not None:
                status, headers, body = page(hit)
            else:
                status = statuses.pop(0) if statuses else 200
                body = ok_body(len(hits)) if status == 200 else f"status {status}".encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
