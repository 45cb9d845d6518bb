"""A Hugging Face hub on 127.0.0.1 for tests: serves checkpoint folders as repositories, over HTTP, with the
endpoints and headers huggingface_hub's downloads use, and records every request.

- ``GET /api/models/OWNER/NAME/revision/REV``: ``{"id", "sha", "siblings": [{"rfilename"}]}``
- ``HEAD`` / ``GET /OWNER/NAME/resolve/REV/FILE``: the file, with ``X-Repo-Commit``, ``ETag`` (its sha256),
  ``Content-Length``, and ``Range: bytes=N-`` answered 206 (a resumed download)
- errors as the hub sends them: 404 with ``X-Error-Code`` RepoNotFound, RevisionNotFound or EntryNotFound

``cut[file] = n`` makes the next GET of ``file`` stop after ``n`` bytes and drop the connection, once.
Start it with ``with FakeHub({"owner/name": folder}) as hub:``; ``hub.endpoint`` is its URL.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass(frozen=True)
class Request:
    method: str
    repo: str
    file: str  # "" for API calls
    range: str | None


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        # one commit per repository, derived from its name (stable across test runs)
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in self.repos}
        self.requests: list[Request] = []
        self.cut: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, repo: str | None = None) -> list[str]:
        """Files fetched with GET (in order), of ``repo`` or of any."""
        with self._lock:
            return [r.file for r in self.requests if r.method == "GET" and r.file and repo in (None, r.repo)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # an idle kept-alive connection is closed (its thread ends) after this many seconds

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _error(self, code: str, status: int = 404, commit: str | None = None) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool) -> None:
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/?]+)(\?.*)?", self.path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)(\?.*)?", self.path)
                match = api or resolve
                repo, rev = (match.group(1), match.group(2)) if match else ("", "")
                file = resolve.group(3) if resolve else ""
                with hub._lock:
                    hub.requests.append(Request(self.command, repo, file, self.headers.get("Range")))
                if repo not in hub.repos:
                    return self._error("RepoNotFound", 401)
                commit = hub.commits[repo]
                if rev not in ("main", commit):
                    return self._error("RevisionNotFound")
                folder = hub.repos[repo]
                if api:
                    data = json.dumps({"id": repo, "sha": commit,
                                       "siblings": [{"rfilename": p.name} for p in sorted(folder.iterdir())]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return None
                path = folder / file
                if "/" in file or not path.is_file():
                    return self._error("EntryNotFound", commit=commit)
                data = path.read_bytes()
                start = 0
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if ranged:
                    start = int(ranged.group(1))
                self.send_response(206 if ranged else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return None
                with hub._lock:
                    cut = hub.cut.pop(file, None)
                if cut is not None:
                    self.wfile.write(data[start : start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                self.wfile.write(data[start:])
                return None

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

        return Handler
