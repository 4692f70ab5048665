"""`ray job submit` against a real local head with token authentication (Ray 2.60's default).

The test starts its own head on loopback from this venv (so the job's `python` and `ray-fedit` are
the venv's), on free ports (GCS, dashboard, dashboard agent, ...) and a private temp folder, with a
token only this test knows. It submits through cluster/submit.sh and plain `ray job submit`, then
stops exactly that head by its own processes (never `ray stop`, which would end every Ray instance
on the machine) and removes the `ray_current_cluster` file it wrote.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
VENV = VENV_BIN.parent

# What the submitted job runs (cluster/submit.sh prepends `ray-fedit`): the data and federation
# stages of the tiny-model pipeline; the test then checks the run directory the job wrote.
TINY_RUN_CONFIG = "tests/assets/tiny_run.yaml"


def job_command(runs_dir: Path) -> tuple[str, ...]:
    return ("run", TINY_RUN_CONFIG, "--stages", "prepare,federate", f"output.root={runs_dir}")


def check_job_result(text: str, runs_dir: Path) -> None:
    run_dirs = [p.parent for p in runs_dir.glob("*/*/manifest.json")]
    assert len(run_dirs) == 1, (list(runs_dir.rglob("*"))[:50], text[-3000:])
    run = run_dirs[0]
    for name in ("resolved_config.yaml", "manifest.json", "rounds.jsonl", "stages/federate.json",
                 "checkpoints/final/adapter_model.safetensors", "no_attack/rounds.jsonl"):
        assert (run / name).exists(), (name, sorted(p.name for p in run.iterdir()))
    rounds = [json.loads(ln) for ln in (run / "rounds.jsonl").read_text().splitlines() if ln]
    assert [r["round"] for r in rounds] == [1, 2], text[-3000:]


JOB_PROBE = r"""
import json, os, sys
import ray
import ray_fedit
ray.init()
@ray.remote
def square(x):
    return x * x
print("PROBE " + json.dumps({
    "prefix": sys.prefix, "executable": sys.executable, "cwd": os.getcwd(),
    "ray_fedit": ray_fedit.__file__, "listing": sorted(os.listdir(".")),
    "squares": ray.get([square.remote(i) for i in range(4)]),
    "auth_mode": os.environ.get("RAY_AUTH_MODE"),
}))
"""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_of(tmp: str) -> list[psutil.Process]:
    """Every process whose command line names this head's private temp folder, and its children."""
    found: dict[int, psutil.Process] = {}
    marker = tmp.rstrip("/") + "/"
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_head(tmp: str) -> int:
    procs = _processes_of(tmp)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


@pytest.fixture(scope="module")
def head():
    tmp = tempfile.mkdtemp(prefix="rfj", dir="/tmp")  # short: Ray's socket paths have a length cap
    token = secrets.token_hex(32)
    token_file = Path(tmp) / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV),
               RAY_TMPDIR=tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = _free_ports(7)
    temp_dir = Path(tmp) / "ray"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
           str(agent_grpc), "--runtime-env-agent-port", str(env_agent), "--metrics-export-port",
           str(metrics), "--ray-client-server-port", str(client), "--num-cpus", "2",
           "--num-gpus", "0", "--object-store-memory", str(200 * 2**20), "--disable-usage-stats",
           "--temp-dir", str(temp_dir)]
    started = time.monotonic()
    out = None
    try:
        out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        yield {"tmp": tmp, "env": env, "address": f"http://127.0.0.1:{dash}", "token": token,
               "temp_dir": temp_dir, "start_s": time.monotonic() - started}
    finally:
        stopped = _stop_head(tmp)  # this head's processes only: never `ray stop`
        address_file = temp_dir / "ray_current_cluster"
        had_address_file = address_file.exists()
        address_file.unlink(missing_ok=True)
        left = _processes_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert out is not None and out.returncode == 0
    assert stopped > 0 and had_address_file and not left, (stopped, had_address_file, left)


def _submit(cmd: list[str], env: dict[str, str], timeout: float = 240
            ) -> subprocess.CompletedProcess:
    """Run a submission, retrying while the dashboard agent is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=max(10.0, deadline - time.monotonic()))
        text = out.stdout + out.stderr
        starting = ("No available agent" in text or "Connection refused" in text
                    or "Failed to connect to Ray" in text)
        if out.returncode == 0 or not starting or time.monotonic() > deadline - 15:
            return out
        time.sleep(1.0)


def test_submit_helper_runs_ray_fedit_job_with_the_token(head):
    started = time.monotonic()
    runs_dir = Path(head["tmp"]) / "runs"
    out = _submit(["bash", "cluster/submit.sh", "--address", head["address"], "--",
                   *job_command(runs_dir)], head["env"], timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", text), text[-3000:]
    check_job_result(text, runs_dir)
    assert "auth: token" in out.stderr
    assert head["token"] not in text
    print(f"\nhead start {head['start_s']:.1f} s, submit.sh job {time.monotonic() - started:.1f} s")


def test_job_uses_the_venv_and_the_uploaded_working_dir(head):
    out = _submit([str(VENV_BIN / "ray"), "job", "submit", "--address", head["address"],
                   "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
                   "python", "-c", JOB_PROBE], head["env"])
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    probe = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("PROBE "))[6:])
    assert Path(probe["prefix"]).resolve() == VENV.resolve()  # the head's PATH gave the venv
    cwd = Path(probe["cwd"])
    assert str(head["temp_dir"]) in probe["cwd"] and cwd != ROOT  # unpacked from the upload
    assert Path(probe["ray_fedit"]).resolve().is_relative_to(cwd.resolve())  # uploaded code wins
    assert probe["squares"] == [0, 1, 4, 9] and probe["auth_mode"] == "token"
    listing = set(probe["listing"])
    assert {"ray_fedit", "cluster", "configs", "pyproject.toml"} <= listing
    assert not listing & {".venv", ".git", ".ci", "runs", "ray_fedit.egg-info"}, listing
    assert head["token"] not in text


def test_a_wrong_token_is_refused(head):
    env = {**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # wins over the token file
    out = subprocess.run(["bash", "cluster/submit.sh", "--address", head["address"], "--",
                          "doctor", "--address", "auto"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert re.search(r"401|[Uu]nauthori[sz]ed|[Aa]uthentication", text), text[-3000:]
    assert env["RAY_AUTH_TOKEN"] not in text and head["token"] not in text
