"""A real Hub-API server on loopback for tests: `olah` serving local git repositories.

olah (PyPI) is a Hugging Face mirror; its ``mirrors-path`` setting (TOML config only, no CLI flag)
serves git repositories laid out as ``<mirrors-path>/<repo_type>/<org>/<name>`` (repo_type
``models``/``datasets``/``spaces``) through the same endpoints as the Hub (``/api/models/...``,
``/<org>/<name>/resolve/<rev>/<file>``). With ``offline = true`` it never contacts huggingface.co.
It does not accept uploads, so repos are committed with git directly.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


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
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "Add model"]):
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True)
        return sha.stdout.strip()


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
        yield LocalHub(endpoint=endpoint, mirrors=mirrors)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
