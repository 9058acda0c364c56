"""A minimal Hugging Face hub on 127.0.0.1, enough for huggingface_hub's downloads.

Serves repositories from local directories: the model-info API (with the
commit sha and file list) and ``resolve`` downloads with the headers
huggingface_hub reads (X-Repo-Commit, ETag, Content-Length). Used with
``HF_ENDPOINT`` so the real download code path runs without network.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LocalHub:
    """Repositories served by the running server; each repo has one commit."""

    def __init__(self):
        self.repos: dict[str, tuple[str, Path]] = {}  # repo_id -> (sha, directory)
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, directory: Path) -> str:
        """Publish ``directory`` as ``repo_id``; returns its commit sha."""
        digest = hashlib.sha1()
        for f in sorted(directory.iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
        sha = digest.hexdigest()
        self.repos[repo_id] = (sha, directory)
        return sha

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def lookup(self, repo_id: str, revision: str) -> tuple[str, Path] | None:
        repo = self.repos.get(repo_id)
        if repo is None or revision not in ("main", repo[0]):
            return None
        return repo


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)(?:/revision/(?P<rev>[^/?]+))?/?(?:\?.*)?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/?]+)")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


def _handler(hub: LocalHub) -> type:
    """A request handler class that serves ``hub``."""
    return type("Handler", (_HubHandler,), {"hub": hub})


class _HubHandler(BaseHTTPRequestHandler):
    """The hub's HTTP API as huggingface_hub calls it: model info, file tree, file downloads."""

    hub: LocalHub

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        self.hub.requests.append(f"{self.command} {self.path}")
        if self.path.startswith("/api/models?"):
            return self._send(200, b"[]", {"Content-Type": "application/json"}, body)
        if m := _RESOLVE.match(self.path):
            return self._file(m["repo"], m["rev"], m["file"], body)
        if m := _TREE.match(self.path):
            return self._tree(m["repo"], m["rev"], body)
        if m := _INFO.match(self.path):
            return self._info(m["repo"], m["rev"] or "main", body)
        self._send(404, b"not found", {}, body)

    def _tree(self, repo: str, rev: str, body: bool):
        found = self.hub.lookup(repo, rev)
        if not found:
            return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
        entries = [{"type": "file", "path": f.name, "size": f.stat().st_size,
                    "oid": hashlib.sha1(f.read_bytes()).hexdigest()}
                   for f in sorted(found[1].iterdir())]
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)

    def _info(self, repo: str, rev: str, body: bool):
        found = self.hub.lookup(repo, rev)
        if not found:
            return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
        sha, directory = found
        info = {"id": repo, "modelId": repo, "sha": sha, "private": False,
                "siblings": [{"rfilename": f.name} for f in sorted(directory.iterdir())]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, repo: str, rev: str, name: str, body: bool):
        found = self.hub.lookup(repo, rev)
        path = found[1] / name if found else None
        if not path or not path.is_file():
            return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
        data = path.read_bytes()
        headers = {"X-Repo-Commit": found[0], "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        self._send(200, data, headers, body)

    def _send(self, status: int, data: bytes, headers: dict, body: bool):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
