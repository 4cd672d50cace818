"""A real HTTP server on loopback serving a test's folder and recording the paths asked for."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records each request's path on the server (`server.requests`)."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        super().do_GET()

    def do_HEAD(self) -> None:
        self.server.requests.append(self.path)
        super().do_HEAD()

    def log_message(self, *args) -> None:
        pass


@dataclass
class HttpServer:
    folder: Path  # what it serves
    url: str
    requests: list[str]  # paths asked for, in order

    def __iter__(self):  # `served, base = http_server`
        return iter((self.folder, self.url))


@pytest.fixture
def http_server(tmp_path) -> Iterator[HttpServer]:
    """A real HTTP server on loopback serving tmp_path/served, recording the paths asked for."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(RecordingHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpServer(served, f"http://127.0.0.1:{server.server_address[1]}", server.requests)
    server.shutdown()
    server.server_close()
    thread.join()
