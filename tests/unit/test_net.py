"""The one network client (cwbuild.net) against a local HTTP server: retries, sizes, idempotence, errors."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from cwbuild import net
from cwbuild.errors import NetworkError

FAST = net.Options(timeout=5, retries=2, backoff=0.01)


class _Handler(http.server.BaseHTTPRequestHandler):
    script: ClassVar[list[int]] = []  # statuses to answer, in order; then 200
    seen: ClassVar[list[str]] = []

    def _answer(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        status = self.script.pop(0) if self.script else 200
        body = b"x" * 5000 if self.path == "/big" else f"{status}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    _Handler.script, _Handler.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_get_retries_overload_then_succeeds(url: str) -> None:
    _Handler.script = [503, 502]
    assert net.fetch(url + "/x?secret=1", options=FAST) == b"200"
    assert len(_Handler.seen) == 3


def test_retry_budget_is_bounded(url: str) -> None:
    _Handler.script = [503, 503, 503, 503]
    assert net.request("GET", url + "/x", options=FAST).status == 503
    assert len(_Handler.seen) == 3
    _Handler.script = [404]
    with pytest.raises(NetworkError, match="HTTP 404"):
        net.fetch(url + "/missing", options=FAST)


def test_post_is_not_repeated_after_a_server_error(url: str) -> None:
    _Handler.script = [500, 500]
    assert net.request("POST", url + "/p", body=b"{}", options=FAST).status == 500
    assert _Handler.seen == ["POST /p"]
    _Handler.script = [503]
    assert net.request("POST", url + "/p", body=b"{}", options=FAST).status == 200  # 503: not processed


def test_response_size_is_bounded(url: str) -> None:
    with pytest.raises(NetworkError, match="larger than 1000"):
        net.fetch(url + "/big", options=net.Options(max_bytes=1000))


def test_errors_name_the_url_without_query(url: str) -> None:
    port = url.rsplit(":", 1)[1]
    with pytest.raises(NetworkError) as err:
        net.fetch("http://127.0.0.1:1/path?token=hunter2", options=FAST)
    assert "hunter2" not in err.value.message
    assert "127.0.0.1:1/path" in err.value.message
    with pytest.raises(NetworkError, match="not an http"):
        net.fetch(f"file:///etc/passwd?{port}")
    assert net.redact_url("https://user:pw@host:8443/a?b=c") == "https://host:8443/a"
