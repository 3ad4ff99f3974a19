#!/usr/bin/env bash
# A release binary linked statically (glibc included): it runs on hosts whatever their
# glibc, and starting it maps one file with no dynamic-loader work. vmon uses nothing that
# static glibc cannot do (no NSS lookups, no dlopen). Measured 2026-11-22, tiny snapshot
# benchmark, two runs each way (`VMON_BIN=... cargo bench -p vmon --bench snapshot -- 7`):
# `vmon --version` 1.11–1.21 ms static against 1.44–1.58 ms dynamic, but restore to the
# next console line did not measurably change (3.68–4.27 ms static, 3.72–3.79 ms dynamic
# at 256 MiB: the machine's noise is larger than the difference).
#
# `--target` keeps build scripts and proc macros dynamic (a static target cannot load them).
# Prints the binary's path.
# Usage: scripts/build-release.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
	cargo build -q --release -p vmon --target "$triple"
bin="${CARGO_TARGET_DIR:-target}/$triple/release/vmon"
ldd "$bin" 2>&1 | grep -q "statically linked" || { echo "build-release: $bin is not static" >&2; exit 1; }
echo "$bin"
