#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs every test, FUSE mounts,
# Litestream and the servers included. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# pip puts console scripts (litestream, moto_server) here; make sure tests find them.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
# The FUSE control file system lets tests abort the connection of a litefs that was
# killed while a request was in flight; without it such a mount can hang its reader.
if [ -d /sys/fs/fuse/connections ] && ! mountpoint -q /sys/fs/fuse/connections; then
  mount -t fusectl fusectl /sys/fs/fuse/connections || echo "test: fusectl not mounted" >&2
fi
# FUSE over io_uring (Linux 6.14+): new mounts are served from per-CPU rings, as in
# production once root enables it; tests/it/fuse_uring.rs checks both transports.
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ]; then
  echo Y > "$uring" || echo "test: cannot enable FUSE over io_uring" >&2
fi
cargo build --all-targets --locked
threads="${LITEFS_TEST_THREADS:-4}"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  # Per-test time limits live in .config/nextest.toml; the whole run is bounded too.
  timeout --kill-after=60 "${LITEFS_TEST_TIMEOUT:-3000}" \
    cargo nextest run --locked --no-fail-fast --test-threads="$threads" || status=$?
  cargo test --locked --doc || status=$?
else
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  timeout --kill-after=60 "${LITEFS_TEST_TIMEOUT:-3000}" \
    cargo test --locked -- --test-threads="$threads" 2>&1 | tee "$log" || status=$?
  awk '/^test result:/ { p += $4; f += $6; s += $8 }
       END { printf "totals: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
fi
if [ "$status" -ne 0 ]; then
  echo "test: FAILED (status $status); FUSE mounts left:" >&2
  grep fuse /proc/mounts >&2 || true
fi
exit "$status"
