#!/usr/bin/env bash
# Bring a fresh Debian 12 machine (or an already set-up one, quickly) to a working
# vmcraft-tasks checkout: system tools, .venv, the project with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-utils libnbd-bin fdisk parted util-linux e2fsprogs xfsprogs btrfs-progs
  ntfs-3g dosfstools mtools fusefat fuse3 libhivex-bin redis-server libvirt-clients
  libxml2-utils debootstrap qemu-system-x86 seabios ipxe-qemu bubblewrap zstd cpio
  busybox-static lvm2 nbdkit nbdkit-plugin-python ovmf grub-efi-amd64-bin
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when the project's metadata changed since the last install.
stamp=.venv/.vmcraft-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the project into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
