"""A local HTTP server on 127.0.0.1 for download tests: serves a folder, honours Range requests, and
can answer a file with errors or cut a response short, once each time it is told to."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path


class Loopback:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.fail: dict[str, list[int]] = {}  # file name -> HTTP statuses answered before serving it
        self.truncate_once: dict[str, int] = {}  # file name -> bytes sent before the connection drops
        self.cut_unannounced: set[str] = set()  # names whose cut response has no Content-Length (a stream)
        self.ignore_range = False  # answer every request with the whole file (200), as some servers do
        self.requests: list[tuple[str, str | None, int]] = []  # (file name, Range header, status)
        loopback = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                loopback._answer(self, self.path.lstrip("/"))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler, name: str) -> None:
        # logged before anything is sent, so the client never sees a response that is not yet listed
        def log(status):
            self.requests.append((name, handler.headers.get("Range"), status))

        path = self.root / name
        if self.fail.get(name):
            status = self.fail[name].pop(0)
            log(status)
            handler.send_error(status)
            return
        if "/" in name or not path.is_file():
            log(404)
            handler.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        wanted = handler.headers.get("Range")
        if wanted and not self.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                log(416)
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            log(206)
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            log(200)
            handler.send_response(200)
        body = data[start:]
        cut = self.truncate_once.pop(name, None)
        if cut is None or name not in self.cut_unannounced:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if cut is not None:
            body = body[:cut]
            handler.close_connection = True
        handler.wfile.write(body)
        handler.wfile.flush()
