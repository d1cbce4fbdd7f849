"""botocore's adaptive retry mode does the per-call retries, and S3Store counts them from
ResponseMetadata.RetryAttempts. Against a real HTTP server on 127.0.0.1 that throttles before it answers."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator.services.storage import S3Store, StorageConfig


class Throttling(BaseHTTPRequestHandler):
    fails = 0  # requests still to refuse with 503 SlowDown
    seen = 0

    def _reply(self, body: bytes = b"") -> None:
        type(self).seen += 1
        if type(self).fails > 0:
            type(self).fails -= 1
            msg = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(msg)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self._reply()

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply()

    def log_message(self, *a):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.slow
def test_botocore_retries_throttling_inside_a_call_and_the_store_counts_them(server):
    Throttling.fails, Throttling.seen = 2, 0
    store = S3Store(
        StorageConfig(endpoint_url=server, bucket="b", prefix="p", max_attempts=3, retry_deadline_s=0)
    )
    store.put("x.bin", b"abc")  # succeeds on botocore's third attempt
    assert Throttling.seen == 3 and store.botocore_retries == 2 and store.retries == 0
    assert store.exists("x.bin") and store.botocore_retries == 2  # a clean call adds nothing

    Throttling.fails, Throttling.seen = 10, 0  # more than the attempts: botocore gives up ...
    with pytest.raises(Exception) as e:
        store.put("y.bin", b"abc")
    assert "SlowDown" in str(e.value) or "503" in str(e.value)
    assert Throttling.seen == 3 and store.botocore_retries == 2 + 2  # ... after 3 attempts, 2 of them retries
