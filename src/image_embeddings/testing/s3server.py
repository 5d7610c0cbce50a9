"""Start a local S3-compatible server (MinIO) on loopback, for tests and for manual runs."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MINIO_HINT = "build it with `make setup` (go install github.com/minio/minio into .tools/bin)"


@dataclass
class S3Server:
    """A running MinIO process and how to reach it."""

    endpoint: str
    access_key: str
    secret_key: str
    data_dir: Path
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """Environment variables that the AWS default credential chains (boto3, S3A) read."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # type: ignore[no-untyped-def]
        """Return a boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))

    def stop(self) -> None:
        """Stop the server."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def find_minio() -> str:
    """Return the MinIO binary: ``$MINIO_BIN``, ``.tools/bin/minio`` of this checkout, or one on PATH."""
    candidates = [os.environ.get("MINIO_BIN", ""),
                  str(Path(__file__).resolve().parents[3] / ".tools" / "bin" / "minio"),
                  shutil.which("minio") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"MinIO server binary not found; {MINIO_HINT}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reserved_port() -> int:
    """A free TCP port below the kernel's ephemeral range, for a server that starts later: the kernel never hands
    it to another process's outgoing connection meanwhile, as it may a port :func:`free_port` returned."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.sample(range(10000, max(low, 10001)), k=min(200, max(low - 10000, 1))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def start(data_dir: str | Path, port: int | None = None, timeout_s: float = 60.0, access_key: str | None = None,
          secret_key: str | None = None) -> S3Server:
    """Start MinIO on 127.0.0.1 (fresh random credentials unless given) and wait until it answers."""
    binary = find_minio()
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    console = free_port()
    access_key = access_key or "test" + secrets.token_hex(4)
    secret_key = secret_key or secrets.token_hex(16)
    env = {**os.environ, "MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key,
           "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}
    log_file = open(data.parent / f"minio-{port}.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [binary, "server", str(data), "--address", f"127.0.0.1:{port}", "--console-address",
         f"127.0.0.1:{console}", "--quiet"], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"MinIO exited with code {process.returncode}; see {log_file.name}")
        try:
            with urllib.request.urlopen(endpoint + "/minio/health/ready", timeout=2) as response:
                if response.status == 200:
                    return S3Server(endpoint, access_key, secret_key, data, process)
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"MinIO did not become ready within {timeout_s}s; see {log_file.name}")
