"""A real Hub-API server on loopback for tests: `olah` serving local git repositories.

olah (PyPI) is a Hugging Face mirror; its ``mirrors-path`` setting (TOML config only, no CLI flag)
serves git repositories laid out as ``<mirrors-path>/<repo_type>/<org>/<name>`` (repo_type
``models``/``datasets``/``spaces``) through the same endpoints as the Hub (``/api/models/...``,
``/<org>/<name>/resolve/<rev>/<file>``). With ``offline = true`` it never contacts huggingface.co.
It does not accept uploads, so repos are committed with git directly; the loopback proxy below also
answers the few write endpoints that ``huggingface_hub``'s ``create_repo`` / ``upload_folder`` use
(repo creation, YAML validation, pre-upload, commit), committing the uploaded files to the served git
repo, so that pushes can be tested and read back through olah.

One difference from the Hub matters to clients: olah answers a request for a file that a repo does
not have with ``401 RepoNotFound`` (``500`` when asked at a commit sha), where the Hub answers
``404 EntryNotFound``. transformers probes
for optional files (``adapter_config.json`` whenever peft is installed, processor configs), treats a
404 as "not there" and a 401 as a fatal error. So the tests talk to olah through a small loopback proxy
(:class:`_HubSemanticsProxy`) that forwards everything unchanged except that it turns olah's 401 / 500
for a file missing from the served git repo into the Hub's 404.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_RESOLVE = re.compile(r"^/(?:(?P<kind>datasets|spaces)/)?(?P<org>[^/]+)/(?P<name>[^/]+)/resolve/[^/]+/(?P<file>.+)$")
_WRITE = re.compile(r"^/api/models/(?P<org>[^/]+)/(?P<name>[^/]+)/(?P<action>preupload|commit)/[^/?]+")
_PUSH_NAMESPACE = "bimask-user"  # the namespace of a repo created without one (the token's user on the Hub)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate"}


@dataclass
class LocalHub:
    """A running olah server: its endpoint URL and the folder holding its repos."""

    endpoint: str
    mirrors: str

    def add_model_repo(self, repo_id: str, folder: str) -> str:
        """Commit the files of ``folder`` as model repo ``repo_id`` (``org/name``); returns the commit sha."""
        return self._commit(repo_id, folder, "models")

    def add_dataset_repo(self, repo_id: str, folder: str) -> str:
        """Commit the files of ``folder`` as dataset repo ``repo_id``; returns the commit sha.

        olah ignores HTTP ``Range`` on mirrored files, so keep every parquet file <= 64 KiB (pyarrow
        reads the last 64 KiB first), and load with ``revision="main"`` (without one, olah answers the
        repo-info request with 401).
        """
        return self._commit(repo_id, folder, "datasets")

    def _commit(self, repo_id: str, folder: str, repo_type: str) -> str:
        org, name = repo_id.split("/")
        repo = os.path.join(self.mirrors, repo_type, org, name)
        shutil.copytree(folder, repo)
        return _git_commit(repo)

    def repo_files(self, repo_id: str) -> list[str]:
        """The files committed to model repo ``repo_id`` (pushed or added), sorted."""
        repo = os.path.join(self.mirrors, "models", *repo_id.split("/"))
        out = subprocess.run(["git", "ls-files"], cwd=repo, check=True, capture_output=True, text=True)
        return sorted(out.stdout.split())


def _git_commit(repo: str, message: str = "Add model") -> str:
    """Commit everything in the git work tree ``repo`` (initialised if needed); returns the commit sha."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    if not os.path.isdir(os.path.join(repo, ".git")):
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, env=env, check=True, capture_output=True)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "--allow-empty", "-m", message]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True)
    return sha.stdout.strip()


def _missing_file(mirrors: str, path: str) -> bool:
    """Whether ``path`` is a ``.../resolve/<rev>/<file>`` request for a file the served repo lacks."""
    match = _RESOLVE.match(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
    if match is None:
        return False
    repo = os.path.join(mirrors, match["kind"] or "models", match["org"], match["name"])
    return os.path.isdir(repo) and not os.path.exists(os.path.join(repo, match["file"]))


class _HubSemanticsProxy(http.server.ThreadingHTTPServer):
    """Forwards requests to olah; a 401 or 500 for a file missing from the served repo becomes the Hub's 404."""

    daemon_threads = True

    def __init__(self, port: int, upstream_port: int, mirrors: str) -> None:
        self.upstream_port, self.mirrors = upstream_port, mirrors
        super().__init__(("127.0.0.1", port), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubSemanticsProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test server
        return

    def _answer(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _write(self, body: bytes) -> bool:
        """Answer a Hub write request (create repo, validate YAML, pre-upload, commit); False for others."""
        path = urllib.parse.urlsplit(self.path).path
        endpoint = f"http://{self.headers.get('Host')}"
        if path == "/api/repos/create":
            request = json.loads(body)
            org, name = request.get("organization") or _PUSH_NAMESPACE, request["name"]
            os.makedirs(os.path.join(self.server.mirrors, "models", org, name), exist_ok=True)
            self._answer(200, {"url": f"{endpoint}/{org}/{name}", "name": f"{org}/{name}"})
            return True
        if path == "/api/validate-yaml":
            self._answer(200, {"errors": [], "warnings": []})
            return True
        match = _WRITE.match(path)
        if match is None:
            return False
        repo = os.path.join(self.server.mirrors, "models", match["org"], match["name"])
        if match["action"] == "preupload":  # every file goes inline (base64) in the commit, none to LFS
            files = json.loads(body)["files"]
            self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
            return True
        message = "Upload"
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                message = item["value"].get("summary") or message
            elif item["key"] == "file":
                target = os.path.join(repo, item["value"]["path"])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(base64.b64decode(item["value"]["content"]))
            elif item["key"] in ("deletedFile", "deletedFolder"):
                shutil.rmtree(os.path.join(repo, item["value"]["path"]), ignore_errors=True)
            else:
                self._answer(400, {"error": f"the loopback Hub does not take {item['key']!r} commit items"})
                return True
        sha = _git_commit(repo, message)
        self._answer(200, {"commitOid": sha, "commitUrl": f"{endpoint}/{match['org']}/{match['name']}/commit/{sha}",
                           "pullRequestUrl": None})
        return True

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.command == "POST" and self._write(body or b""):
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, reason, out_headers = response.status, response.reason, response.getheaders()
        finally:
            upstream.close()
        # olah answers 401 for a missing file at a branch, 500 at a commit sha (transformers asks at the sha
        # of the files it already read); the Hub answers 404 for both.
        if status in (401, 500) and _missing_file(self.server.mirrors, self.path):
            data = b'{"error": "Entry not found"}'
            status, reason = 404, "Not Found"
            out_headers = [("Content-Type", "application/json"), ("X-Error-Code", "EntryNotFound"),
                           ("X-Error-Message", "Entry not found")]
        self.send_response(status, reason)
        keep_length = self.command == "HEAD" and status != 404  # a HEAD answer announces the GET's length
        for key, value in out_headers:
            if key.lower() not in _HOP_BY_HOP and (keep_length or key.lower() != "content-length"):
                self.send_header(key, value)
        if not keep_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = _forward


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _olah_command() -> list[str]:
    cli = shutil.which("olah-cli", path=os.path.dirname(sys.executable)) or shutil.which("olah-cli")
    return [cli] if cli else [sys.executable, "-m", "olah.server"]


@contextmanager
def serve_local_repos(root: str, startup_timeout: float = 60.0) -> Iterator[LocalHub]:
    """Start olah on a free loopback port serving the git repos under ``root/mirrors``; stop it on exit."""
    mirrors = os.path.join(root, "mirrors")
    os.makedirs(os.path.join(mirrors, "models"), exist_ok=True)
    port = free_port()
    config = os.path.join(root, "olah.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'repos-path = "{os.path.join(root, "cache")}"\n'
            f'mirrors-path = ["{mirrors}"]\n'
            "[accessibility]\n"
            "offline = true\n"
        )
    log = open(os.path.join(root, "olah.log"), "wb")
    proc = subprocess.Popen(
        [*_olah_command(), "--config", config, "--log-path", os.path.join(root, "logs")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"olah exited with code {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(endpoint + "/api/models/none/none/revision/main", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # any HTTP answer (404 here) means the server is up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"olah did not answer on {endpoint} within {startup_timeout:.0f} s") from None
                time.sleep(0.25)
        proxy = _HubSemanticsProxy(free_port(), port, mirrors)
        thread = threading.Thread(target=proxy.serve_forever, daemon=True)
        thread.start()
        try:
            yield LocalHub(endpoint=f"http://127.0.0.1:{proxy.server_address[1]}", mirrors=mirrors)
        finally:
            proxy.shutdown()
            proxy.server_close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def use_endpoint(monkeypatch: object, endpoint: str) -> None:
    """Point this process's Hub clients at ``endpoint``: ``HF_ENDPOINT`` for code that reads it at call time,
    and ``huggingface_hub``'s constants, which it read once at import (transformers' and timm's downloads).

    Offline mode (``HF_HUB_OFFLINE=1``) is switched off too: the loopback server needs no network.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # type: ignore[attr-defined]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # type: ignore[attr-defined]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # type: ignore[attr-defined]
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # type: ignore[attr-defined]
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",  # type: ignore[attr-defined]
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
