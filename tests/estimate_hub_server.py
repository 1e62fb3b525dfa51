"""A local stand-in for the Hugging Face Hub: serves files of local directories under /{repo}/resolve/{rev}/{file}
with the headers huggingface_hub expects (ETag, X-Repo-Commit) and HTTP Range support; records every request."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, range)
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _not_found(self, code: str):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, head: bool):
                rng = self.headers.get("Range")
                server.requests.append((self.command, self.path, rng))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"]:  # /api/models/{o}/{n}/tree/{rev}: the listing
                    repo = "/".join(parts[2:4])
                    if repo not in server.repos:
                        return self._not_found("RepoNotFound")
                    files = [
                        {"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40}
                        for p in sorted(server.repos[repo].iterdir())
                    ]
                    body = json.dumps(files).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._not_found("RepoNotFound")
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                if repo not in server.repos:
                    return self._not_found("RepoNotFound")
                path = server.repos[repo] / filename
                if not path.is_file():
                    return self._not_found("EntryNotFound")
                data = path.read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                status, body = 200, data
                if rng and rng.startswith("bytes="):
                    a, b = rng[6:].split("-")
                    start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status, body = 206, data[start : end + 1]
                self.send_response(status)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                    server.bytes_sent += len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
