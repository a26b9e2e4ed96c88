#!/usr/bin/env bash
# Builds litefs and mounts it with the embedded default config (config/litefs.yml:
# static lease, this node primary, local file archive). Ctrl-C unmounts cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
LITEFS_DEPS=run scripts/install-deps.sh
cargo build --release --locked
exec target/release/litefs mount "$@"
