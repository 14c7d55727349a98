#!/usr/bin/env bash
# Install everything memtrace needs on a Debian 12/13 machine: system packages (QEMU, compilers,
# libraries for the plugin, tools for the guest image), a Python venv with the package and its
# test tools. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86          # the emulator (TCG plugins enabled in Debian's build)
  gcc gcc-12 make binutils pkg-config   # plugin, guest-agent module (Debian's 6.1 kernel: gcc-12)
  libglib2.0-dev libzstd-dev libxxhash-dev libelf1
  dpkg-dev debian-archive-keyring       # apt-get source for qemu-plugin.h; pinned guest packages
  cpio zstd xz-utils kmod  # initramfs, kernel module tools
  mmdebstrap e2fsprogs qemu-utils  # disk roots: built Debian roots, ext4 images, qcow2 overlays
  python3-venv
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing packages: ${missing[*]} (run as root or install them with apt-get)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# setuptools says on every editable install that a folder named like a package could shadow
# it; ours are mapped (memtrace.* -> traces/, analyses/, ...), so that note is noise here
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e '.[test,plot,study]'
echo "setup: done (.venv ready)"
