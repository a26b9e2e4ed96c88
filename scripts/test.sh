#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs every test, FUSE mounts,
# Litestream and the servers included. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# pip puts console scripts (litestream, moto_server) here; make sure tests find them.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
cargo build --all-targets --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked -- --test-threads="${LITEFS_TEST_THREADS:-4}" 2>&1 | tee "$log" || status=$?
# cargo ends with the doc-test binary's line; close with the totals of every binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 }
     END { printf "totals: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
