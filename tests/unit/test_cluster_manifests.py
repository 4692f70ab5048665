"""Parse-and-check tests for cluster/: the launcher YAML (against Ray's own schema), the KubeRay
manifests, the Dockerfile, the GPU pins, the runtime env's excludes (with Ray's own matcher) and the
submit helper (with a stand-in `ray` CLI). Nothing here starts Ray or reaches a network."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()


def _ray_pin() -> str:
    """The Ray release the package is built for: the single version pyproject's range allows."""
    req = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"]
               if Requirement(d).name == "ray")
    pins = [ln.split("==")[1] for ln in (ROOT / "constraints/cpu.txt").read_text().splitlines()
            if ln.startswith("ray==")]
    assert len(pins) == 1 and req.specifier.contains(pins[0])
    return pins[0]


RAY_VERSION = _ray_pin()


def _image_tag() -> str:
    match = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE)
    assert match, "the Dockerfile's header must show its build command and tag"
    return match.group(1)


def _gpu_pins() -> dict[str, str]:
    pins = {}
    for line in (CLUSTER / "constraints-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and "[" not in name, f"not a plain pin: {line!r}"
            pins[name.lower()] = version
    return pins


def _kuberay_cluster_specs() -> dict[str, dict]:
    raycluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    rayjob = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    return {"RayCluster": raycluster["spec"], "RayJob": rayjob["spec"]["rayClusterSpec"]}


def _containers(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return out


# ---------------------------------------------------------------------------------- image + pins
def test_image_tag_names_package_ray_and_python():
    version = PYPROJECT["project"]["version"]
    assert _image_tag() == f"ray-fedit:{version}-ray{RAY_VERSION}-py311-gpu"
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-gpu$", DOCKERFILE,
                     re.M)


def test_dockerfile_installs_the_vllm_extra_with_the_gpu_pins():
    assert "vllm" in PYPROJECT["project"]["optional-dependencies"]
    assert re.search(r'pip install -c constraints/constraints-gpu\.txt "\.\[vllm\]"', DOCKERFILE)
    assert "COPY --chown=1000:100 cluster/constraints-gpu.txt constraints/assets.txt" in DOCKERFILE
    assert f"ray.__version__ == '{RAY_VERSION}'" in DOCKERFILE
    assert "ray-fedit --help" in DOCKERFILE  # the console script exists in the image
    assert "WORKDIR /app" in DOCKERFILE


def test_dockerfile_copies_only_what_exists_and_the_context_keeps():
    from ray._private.thirdparty.pathspec import PathSpec

    ignore = PathSpec.from_lines("gitwildmatch",
                                 (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines())
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert sources, "no COPY line found"
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY source {src} is missing from the repository"
        files = [path] if path.is_file() else [
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, src
        dropped = [str(f.relative_to(ROOT)) for f in files
                   if ignore.match_file(str(f.relative_to(ROOT)))]
        assert not dropped, f"the build context drops {dropped[:5]} that COPY {src} needs"
    assert ignore.match_file(".venv/bin/python") and ignore.match_file("runs/a/b.parquet")


def test_gpu_pins_satisfy_the_package_requirements():
    pins = _gpu_pins()
    assert pins["ray"] == RAY_VERSION
    assert {"vllm", "torch", "transformers", "peft"} <= set(pins)
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name.lower() in pins:
            assert req.specifier.contains(pins[req.name.lower()]), (dep, pins[req.name.lower()])


# ---------------------------------------------------------------------------------- runtime env
def _uploaded(tmp_path: Path, excludes: list[str]) -> set[str]:
    """What Ray would upload as the working dir, with Ray's own exclude matching."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: set[str] = set()

    def handler(path: Path) -> None:
        if path.is_file():
            files.add(str(path.relative_to(tmp_path)))

    _dir_travel(tmp_path, [_get_excludes(tmp_path, excludes)], handler, include_gitignore=False)
    return files


def test_runtime_env_excludes_environments_runs_caches_and_weights(tmp_path):
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert "working_dir" not in env  # cluster/submit.sh passes --working-dir .
    assert not [k for k in env.get("env_vars", {})
                if re.search(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD)(_|$)", k)]
    tree = {
        "ray_fedit/cli.py": True, "configs/quickstart.yaml": True, "cluster/submit.sh": True,
        "tests/assets/tiny.jsonl": True, "tests/assets/fixture.parquet": True,
        "README.md": True, "experiments/runs/notes.md": True,
        ".venv/bin/python": False, ".venv/lib/x/__init__.py": False, ".git/HEAD": False,
        "runs/quickstart/1/rounds.jsonl": False, "runs/q/1/data/benign.parquet": False,
        "ray_fedit/__pycache__/cli.cpython-311.pyc": False, ".cache/hub/model.bin": False,
        "weights/llama/model.safetensors": False, "adapter.safetensors": False,
        "models/x.gguf": False, "ray_fedit.egg-info/PKG-INFO": False, ".pytest_cache/v": False,
    }
    for rel in tree:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    uploaded = _uploaded(tmp_path, env["excludes"])
    assert uploaded == {rel for rel, keep in tree.items() if keep}


# ---------------------------------------------------------------------------------- launcher
def test_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_1x_a10g"]["min_wrokers"] = 0
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_launcher_has_a_cpu_head_and_gpu_workers():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {k: v for k, v in types.items() if v.get("resources", {}).get("GPU", 0) >= 1}
    assert {v["node_config"]["InstanceType"] for v in gpu_types.values()} >= {"g5.xlarge",
                                                                              "g5.12xlarge"}
    for node in gpu_types.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"]
    assert cfg["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def test_launcher_installs_the_package_and_enables_token_auth():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    setup = " ".join(cfg["setup_commands"])
    assert "-c ~/ray-fedit/cluster/constraints-gpu.txt" in setup and "[vllm]" in setup
    assert cfg["file_mounts"]["~/ray-fedit"] == "."
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    head_start = cfg["head_start_ray_commands"][-1]
    worker_start = cfg["worker_start_ray_commands"][-1]
    for cmd in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token ray start" in cmd and "--disable-usage-stats" in cmd
    port = re.search(r"--head --port=(\d+)", head_start).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH)
    assert {".venv", ".git", "runs"} <= set(cfg["rsync_exclude"])


# ---------------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_cluster_spec(kind):
    spec = _kuberay_cluster_specs()[kind]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-fedit-auth"}
    for _, container in _containers(spec):
        assert container["image"] == _image_tag()
        names = {e["name"] for e in container.get("env", [])}
        assert not names & {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}  # KubeRay sets them from the Secret
        assert all("value" not in e for e in container.get("env", []) if "TOKEN" in e["name"])
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        res = group["template"]["spec"]["containers"][0]["resources"]
        if res["limits"].get("nvidia.com/gpu", 0) >= 1:
            gpu_groups += 1
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert gpu_groups >= 1


def test_kuberay_volumes_use_the_shared_claim():
    claim = yaml.safe_load((KUBERAY / "storage.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"][
        "accessModes"]
    for spec in _kuberay_cluster_specs().values():
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}
            assert claims == {claim["metadata"]["name"]}
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert "/mnt/runs" in mounts


def test_rayjob_runs_a_valid_ray_fedit_command_and_cleans_up():
    from ray_fedit.cli import _parser

    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "ray-fedit"
    assert PYPROJECT["project"]["scripts"]["ray-fedit"] == "ray_fedit.cli:main"
    args = _parser().parse_args(argv[1:])  # a command the CLI accepts
    assert args.command in ("run", "sweep")
    target = args.sweep if args.command == "sweep" else args.config
    assert (ROOT / target).is_file(), f"the RayJob runs {target}, which is not in the repository"
    assert "output.root=/mnt/runs" in args.overrides
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"  # the image's WORKDIR, uploaded by the submitter


def test_no_manifest_carries_a_token():
    for path in [*CLUSTER.rglob("*.yaml"), CLUSTER / "Dockerfile", CLUSTER / "submit.sh"]:
        for doc in (yaml.safe_load_all(path.read_text()) if path.suffix == ".yaml" else []):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path
        assert not re.search(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[0-9a-f]{16,}", path.read_text())


# ---------------------------------------------------------------------------------- submit.sh
FAKE_RAY = """#!/usr/bin/env bash
echo "ARGS: $*"
echo "MODE: ${RAY_AUTH_MODE:-unset}"
echo "TOKEN_ENV: ${RAY_AUTH_TOKEN:+set}"
echo "TOKEN_PATH: ${RAY_AUTH_TOKEN_PATH:-unset}"
"""


def _submit_sh(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake-ray"
    fake.write_text(FAKE_RAY)
    fake.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {"PATH": "/usr/bin:/bin", "HOME": str(home), "RAY_BIN": str(fake)}
    return subprocess.run(["bash", "cluster/submit.sh", *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_submit_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(CLUSTER / "submit.sh")]).returncode == 0


def test_submit_sh_builds_the_job_command(tmp_path):
    out = _submit_sh(tmp_path, ["--address", "http://127.0.0.1:1234", "--no-wait", "--",
                                "run", "configs/quickstart.yaml", "federation.rounds=2"],
                     RAY_AUTH_TOKEN="0123456789abcdef" * 4)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()[0].removeprefix("ARGS: ")
    assert args == ("job submit --address http://127.0.0.1:1234 --working-dir . --runtime-env "
                    "cluster/runtime_env.yaml --no-wait -- ray-fedit run configs/quickstart.yaml "
                    "federation.rounds=2")
    assert "MODE: token" in out.stdout and "TOKEN_ENV: set" in out.stdout
    assert "0123456789abcdef" not in out.stdout + out.stderr


def test_submit_sh_finds_the_default_token_file_without_reading_it_out(tmp_path):
    token_file = tmp_path / "home" / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("fedcba9876543210" * 4)
    out = _submit_sh(tmp_path, ["sweep", "configs/sweeps/x.yaml"])
    assert out.returncode == 0, out.stderr
    assert f"TOKEN_PATH: {token_file}" in out.stdout and "MODE: token" in out.stdout
    assert "TOKEN_ENV: \n" in out.stdout + "\n"
    assert "fedcba9876543210" not in out.stdout + out.stderr
    assert "--address http://127.0.0.1:8265 " in out.stdout  # the default address


def test_submit_sh_warns_without_token_and_refuses_bad_commands(tmp_path):
    out = _submit_sh(tmp_path, ["doctor"])
    assert out.returncode == 0 and "no token" in out.stderr and "MODE: unset" in out.stdout
    disabled = _submit_sh(tmp_path, ["doctor"], RAY_AUTH_MODE="disabled")
    assert "no token" not in disabled.stderr and "MODE: disabled" in disabled.stdout
    bad = _submit_sh(tmp_path, ["train", "x.yaml"])
    assert bad.returncode == 2 and "not a ray-fedit command" in bad.stderr and not bad.stdout
    missing = _submit_sh(tmp_path, ["doctor"], RAY_AUTH_TOKEN_PATH=str(tmp_path / "nope"))
    assert missing.returncode == 2 and not missing.stdout
