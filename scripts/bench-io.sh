#!/usr/bin/env bash
# I/O benchmark against QEMU (results go to docs/benchmarks.md): virtio-blk sequential
# read/write MB/s and 4 KiB random-read IOPS inside the stock Debian guest, the same image
# read on the host, and guest-to-host TCP over a tap. Directly on a VT-x/AMD-V host, or
# inside the lab on a PVM host (compare ratios only: the lab emulates AMD-V with TCG).
# Usage: scripts/bench-io.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
target=${CARGO_TARGET_DIR:-target}
cargo rustc -q -p vmon-guest-tools --release --bin vmon-guest \
	--target-dir "$target/guest-tools" -- -C target-feature=+crt-static
kit=$(cargo run -q --release -p vmon -- kit)
bin=$(cargo bench -q -p vmon --bench linux_io --no-run --message-format=json 2>/dev/null |
	grep '"name":"linux_io"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
echo "== $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r), $(nproc) CPUs, KVM: $([ -e /sys/module/kvm_pvm ] && echo PVM || echo hardware)"
if [ -e /sys/module/kvm_pvm ]; then
	echo "(in the lab: QEMU TCG with emulated AMD-V; compare ratios only)"
	scripts/lab.sh --timeout 3000 --env VMON_KIT="$kit" -- "$bin" "$rounds"
else
	VMON_KIT=$kit "$bin" "$rounds"
fi
