#!/usr/bin/env bash
# Boot benchmarks against QEMU microvm (results go to docs/benchmarks.md):
#  1. tiny guest on this machine's /dev/kvm: time to first serial output, idle RSS;
#  2. stock Debian kernel + the default guest kit: time to the first userspace line and
#     RSS, directly on a VT-x/AMD-V host, or inside the lab on a PVM host.
# Usage: scripts/bench-boot.sh [TINY_RUNS [LINUX_RUNS]]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tiny_runs=${1:-20}
linux_runs=${2:-5}

bench_binary() {
	cargo bench -q -p vmon --bench "$1" --no-run --message-format=json 2>/dev/null |
		grep "\"name\":\"$1\"" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

echo "== $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r), $(nproc) CPUs, KVM: $([ -e /sys/module/kvm_pvm ] && echo PVM || echo hardware)"
cargo bench -q -p vmon --bench tiny_boot -- "$tiny_runs"

kit=$(cargo run -q --release -p vmon -- kit)
bin=$(bench_binary linux_boot)
if [ -e /sys/module/kvm_pvm ]; then
	echo "(in the lab: QEMU TCG with emulated AMD-V; compare ratios only)"
	scripts/lab.sh --env VMON_KIT="$kit" -- "$bin" "$linux_runs"
else
	VMON_KIT=$kit "$bin" "$linux_runs"
fi
