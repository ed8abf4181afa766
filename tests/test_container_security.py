"""The runner container is locked down, checked on the live container (docker inspect, and from inside it)
through the `forge` CLI, the real engine and the CPU image: no capabilities, no privilege gain, a read-only
root filesystem, a pids limit, a non-root user, no network; a hub token planted in the environment reaches
only the download, as a read-only secret file, and shows up nowhere else."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from forge.contract import paths
from forge.contract.plan_io import load_plan
from forge.host.launcher import PIDS_LIMIT, needs_download
from tests.conftest import EXAMPLES
from tests.test_end_to_end import _wait_for_step

PLANTED = f"hf_planted{uuid.uuid4().hex}"  # a hub token that must never show up anywhere Forge writes

# Run inside the live container by `docker exec`: what the runner process itself may do.
PROBE = r"""
import errno, json, os, socket
runner = next(pid for pid in os.listdir("/proc") if pid.isdigit()
              and open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[1:3] == [b"-m", b"forge.runner"])
status = dict(line.split(":\t", 1) for line in open(f"/proc/{runner}/status").read().splitlines() if ":\t" in line)
def writable(path):
    try:
        with open(os.path.join(path, ".forge-probe"), "w"):
            pass
        os.remove(os.path.join(path, ".forge-probe"))
        return "yes"
    except OSError as exc:
        return errno.errorcode[exc.errno]
def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
pids_max = next((open(p).read().strip() for p in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max")
                 if os.path.exists(p)), None)
tmp = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk("/tmp") for f in fs
          if os.path.isfile(os.path.join(d, f)))
threads = sum(len(os.listdir(f"/proc/{p}/task")) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps({key: status[key].strip() for key in ("Uid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                                        "NoNewPrivs")}
                 | {"writable": {p: writable(p) for p in ("/", "/etc", "/opt/forge", "/tmp", "/out", "/data/0")},
                    "interfaces": sorted(os.listdir("/sys/class/net")), "pids_max": pids_max,
                    "internet": connect("1.1.1.1", 53), "tmp_bytes": tmp, "threads": threads}))
"""


def forge(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forge.host", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "160", "HF_TOKEN": PLANTED, **(env or {})})


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, dict, str]:
    out, err = process.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    assert PLANTED not in out + err
    return process.returncode, json.loads(out.strip().splitlines()[-1]), err


def plan(workdir: Path, *extra: str) -> Path:
    data = workdir / "data"
    data.mkdir(parents=True)
    shutil.copy(EXAMPLES / "chat-sample.jsonl", data / "chat-sample.jsonl")
    planned = subprocess.run([sys.executable, "-m", "forge.host", "plan", "smoke", "--cpu", "--data",
                              "data/chat-sample.jsonl", *extra], cwd=workdir, capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    return workdir / "forge.yaml"


def assert_nowhere(root: Path) -> None:
    """The planted token is in no file under `root` (forge.yaml, events, run dirs, datasets, job files)."""
    leaks = [p for p in root.rglob("*") if p.is_file() and PLANTED.encode() in p.read_bytes()]
    assert not leaks, leaks


def assert_locked_down(attrs: dict) -> None:
    """What `docker inspect` says; the same settings for every step's container."""
    host = attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and not host["Privileged"]
    assert "no-new-privileges:true" in (host["SecurityOpt"] or [])
    assert host["ReadonlyRootfs"] is True and set(host["Tmpfs"]) == {"/tmp"}
    assert host["PidsLimit"] == PIDS_LIMIT
    user = attrs["Config"]["User"]
    assert user and user.split(":")[0] not in ("", "0", "root")
    assert PLANTED not in json.dumps(attrs)  # Env, Cmd, Labels, Mounts (sources too)


@pytest.mark.docker
def test_a_running_train_container_is_locked_down_and_offline(tmp_path, engine, model_cache):
    """prepare then train with a planted HF_TOKEN: the live train container has no capabilities, cannot gain
    any, cannot write outside /tmp and its mounts, has no network interface but loopback, a pids limit, and
    neither it nor any output holds the token (a bundled model needs none)."""
    config = plan(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["prepare"]["max_length"] = 128  # short rows, one a step: quick on a busy machine
    settings["train"].update(max_steps=500, save_every=500, micro_batch_size=1, gradient_accumulation=1)  # stopped
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    code, result, err = finish(forge("prepare", "--json", cwd=tmp_path))
    assert code == 0 and result["status"] == "ok", err

    process = forge("train", "--json", cwd=tmp_path)
    _wait_for_step(tmp_path, process, minimum=1)
    (container,) = engine.containers.list(filters={"label": "dev.forge.step=train"})
    container.reload()
    assert_locked_down(container.attrs)
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
    assert not any(env.startswith(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")) for env in container.attrs["Config"]["Env"])
    assert not any(m["Destination"].startswith(paths.SECRETS + "/hf") for m in container.attrs["Mounts"])
    probe = container.exec_run(["python", "-c", PROBE])
    assert probe.exit_code == 0, probe.output.decode()
    inside = json.loads(probe.output.decode().strip().splitlines()[-1])
    process.send_signal(signal.SIGTERM)
    code, result, err = finish(process)
    assert (code, result["status"]) == (75, "stopped"), err

    zero = "0" * 16
    assert inside["Uid"].split()[0] != "0"
    assert {k: inside[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), zero)
    assert inside["NoNewPrivs"] == "1"
    assert inside["writable"] == {"/": "EROFS", "/etc": "EROFS", "/opt/forge": "EROFS", "/tmp": "yes", "/out": "yes",
                                  "/data/0": "EROFS"}
    assert inside["interfaces"] == ["lo"] and inside["internet"] == "ENETUNREACH"
    assert inside["pids_max"] == str(PIDS_LIMIT) and inside["threads"] < PIDS_LIMIT
    print(f"inside the train container: {inside['threads']} threads, {inside['tmp_bytes']} bytes in /tmp")
    assert_nowhere(tmp_path)


class _FakeHub(BaseHTTPRequestHandler):
    """Holds each request until the test has looked at the fetch container, then answers "no such repo"."""

    seen: list[tuple[str, str | None]] = []
    asked = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        type(self).asked.set()
        type(self).release.wait(120)
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepositoryNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.mark.docker
def test_a_hub_download_alone_gets_network_and_the_token_as_a_read_only_file(tmp_path, engine):
    """A hub model not in the cache: a `fetch` container, with the engine's network, only the model cache and
    the token as a read-only file under /run/secrets (huggingface_hub sends it), downloads it before anything
    else runs. Here the hub says the repo does not exist: a model error, not retried, and no step container
    was ever started. The token is in no inspect field, file, event or line of output."""
    server = ThreadingHTTPServer(("0.0.0.0", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bridge = engine.networks.get("bridge").attrs["IPAM"]["Config"][0]  # the host, as the fetch container sees it
    gateway = bridge.get("Gateway") or str(next(ipaddress.ip_network(bridge["Subnet"]).hosts()))
    cache = tmp_path / "models"  # empty: the model must be downloaded
    work = tmp_path / "work"
    plan(work, "--model", "smollm2-360m-instruct")
    env = {"FORGE_MODEL_CACHE": str(cache), "HF_ENDPOINT": f"http://{gateway}:{server.server_port}",
           "FORGE_RETRY_DELAY": "0"}
    since = int(time.time()) - 1
    process = forge("prepare", "--json", "--retries", "2", cwd=work, env=env)
    try:
        assert _FakeHub.asked.wait(300), "the fetch never reached the hub"
        (fetch,) = engine.containers.list(filters={"label": "dev.forge.step=fetch"})
        fetch.reload()
        attrs = fetch.attrs
    finally:
        _FakeHub.release.set()
    code, result, err = finish(process)
    server.shutdown()

    assert_locked_down(attrs)
    assert attrs["HostConfig"]["NetworkMode"] in ("default", "bridge")
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert set(mounts) == {paths.MODEL_CACHE, paths.JOB_CONFIG, paths.HF_TOKEN}
    assert mounts[paths.HF_TOKEN]["RW"] is False and mounts[paths.MODEL_CACHE]["RW"] is True
    assert not Path(mounts[paths.HF_TOKEN]["Source"]).exists()  # removed with the container
    assert f"HF_TOKEN_PATH={paths.HF_TOKEN}" in attrs["Config"]["Env"]
    model_calls = [auth for path, auth in _FakeHub.seen if path.startswith("/api/models/")]
    assert model_calls and set(model_calls) == {f"Bearer {PLANTED}"}, _FakeHub.seen

    assert (code, result["error"]["code"], result["attempts"]) == (4, "model", 1), err
    created = [e["Actor"]["Attributes"]["dev.forge.step"] for e in engine.events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create", "label": f"dev.forge.output={(work / 'forge-out').resolve()}"})]
    assert created == ["fetch"]
    assert_nowhere(work)
    assert_nowhere(cache)


def test_only_a_hub_model_missing_from_the_cache_is_downloaded(tmp_path, monkeypatch):
    """The launcher's network decision: bundled and local models never; a hub model until its cache entry
    is complete (the runner writes the marker last, so a half-written one still counts as missing)."""
    cache = tmp_path / "models"
    monkeypatch.setenv("FORGE_MODEL_CACHE", str(cache))
    bundled = load_plan(plan(tmp_path / "bundled"))
    hub = load_plan(plan(tmp_path / "hub", "--model", "smollm2-360m-instruct"))
    assert not needs_download(bundled, tmp_path / "bundled")
    assert needs_download(hub, tmp_path / "hub")
    entry = cache / paths.model_cache_entry(hub.model.name)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    assert needs_download(hub, tmp_path / "hub")
    (entry / paths.MODEL_MARKER).write_text("{}")
    assert not needs_download(hub, tmp_path / "hub")
