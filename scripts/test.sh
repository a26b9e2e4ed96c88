#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs every test, FUSE mounts,
# Litestream and the servers included. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# pip puts console scripts (litestream, moto_server) here; make sure tests find them.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
cargo build --all-targets --locked
cargo test --locked -- --test-threads="${LITEFS_TEST_THREADS:-4}"
