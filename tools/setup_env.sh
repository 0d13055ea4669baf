#!/usr/bin/env bash
# Create or update the CPU virtual environment used by the tests, CI and the CPU demo.
#
#   bash tools/setup_env.sh [VENV_DIR]        (default: .venv in the repository root)
#
# Idempotent: a stamp file records the hash of this script and of setup.py; when neither has
# changed since the last successful run the script returns in well under a second.
#
# Why not plain `pip install -e .[test]`: megatron-core 0.19 declares Python >= 3.12 but its
# cp311 wheel works, so it is installed with --no-deps --ignore-requires-python together with
# the few dependencies it really imports (numpy, packaging, psutil, and triton, which
# transformer/moe/ops/paged_stash.py imports unconditionally). torch is pinned to the CPU build
# 2.13.0; any other torch spec would pull a multi-GB CUDA build.
#
# Also, for tests/platform/test_slurm.py (a real single-node Slurm cluster): Debian's slurm-wlm
# and munge, installed only when missing, only as root with apt-get (CI, containers), ~10 s.
# FINEVIT_NO_SLURM=1 skips this; without Slurm that test is skipped and says why.
set -euo pipefail

install_test_slurm() {
  if [[ -n "${FINEVIT_NO_SLURM:-}" ]] || command -v slurmctld >/dev/null 2>&1 \
      || [[ -x /usr/sbin/slurmctld ]]; then
    return 0
  fi
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_env: Slurm is not installed (installing it needs root and apt-get):" \
         "tests/platform/test_slurm.py will be skipped"
    return 0
  fi
  echo "setup_env: installing Slurm and munge for the launcher test (apt-get)"
  if ! { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }; then
    echo "setup_env: the Slurm install failed: tests/platform/test_slurm.py will be skipped"
  fi
}
install_test_slurm

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-"$repo/.venv"}
python=${PYTHON:-python3}

stamp="$venv/.megatron_finevit_setup"
want=$(cat "$repo/tools/setup_env.sh" "$repo/setup.py" | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup_env: $venv is up to date"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "setup_env: creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

"${pip[@]}" install -q --upgrade pip setuptools wheel
echo "setup_env: installing torch 2.13.0 (CPU)"
"${pip[@]}" install -q torch==2.13.0
echo "setup_env: installing megatron-core 0.19.2 (cp311 wheel, --no-deps --ignore-requires-python)"
"${pip[@]}" install -q numpy packaging psutil 'triton==3.*' einops
"${pip[@]}" install -q --no-deps --ignore-requires-python megatron-core==0.19.2
echo "setup_env: installing megatron_finevit (editable) with its test and deepspeed extras"
# torch stays pinned so that no dependency resolution can replace the CPU build. DS_BUILD_OPS=0:
# DeepSpeed builds no C++ ops at install (the CPU engine uses torch's AdamW and gloo).
DS_BUILD_OPS=0 "${pip[@]}" install -q -e "$repo[test,deepspeed]" torch==2.13.0

echo "$want" >"$stamp"
echo "setup_env: done ($venv)"
