# shellcheck shell=bash
# Debian packages for the scripts that need some, sourced (`. scripts/lib/apt.sh`, from the repository root):
# `apt_install [APT-GET-INSTALL OPTIONS] PKG...` runs `apt-get update` once per script, then
# `apt-get install -y -qq`. As root (CI) directly; otherwise through sudo, since a developer's machine is not
# run as root, where the bare apt-get failed with "are you root?". `as_root CMD...` runs any command so.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "not root and no sudo: cannot run $*; run it as root, or install sudo" >&2
    return 69
  fi
}

APT_UPDATED=
apt_update() {
  if [ -z "$APT_UPDATED" ]; then
    as_root apt-get update -qq || return
    APT_UPDATED=1
  fi
}

apt_install() {
  apt_update || return
  # Through `env`: sudo resets the environment, so `DEBIAN_FRONTEND=... sudo apt-get` lost it and a
  # package's debconf question could wait on a terminal.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
