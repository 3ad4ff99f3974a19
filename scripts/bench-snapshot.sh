#!/usr/bin/env bash
# Snapshot/restore benchmarks (results go to docs/benchmarks.md, "Snapshot and restore"):
#  1. tiny guest on this machine's /dev/kvm: snapshot pause, restore to the next console
#     line (256 MiB and 4 GiB), 10 clones' memory against 10 boots;
#  2. stock Debian guest holding all its memory: the same figures, directly on a VT-x/AMD-V
#     host, or inside the lab on a PVM host (12 GiB lab: a 4 GiB guest plus its snapshot).
# Usage: scripts/bench-snapshot.sh [TINY_RUNS [LINUX_RUNS]]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tiny_runs=${1:-5}
linux_runs=${2:-3}
target=${CARGO_TARGET_DIR:-target}
echo "== $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r), $(nproc) CPUs, KVM: $([ -e /sys/module/kvm_pvm ] && echo PVM || echo hardware)"
cargo bench -q -p vmon --bench snapshot -- "$tiny_runs"

cargo rustc -q -p vmon-guest-tools --release --bin vmon-guest \
	--target-dir "$target/guest-tools" -- -C target-feature=+crt-static
kit=$(cargo run -q --release -p vmon -- kit)
bin=$(cargo bench -q -p vmon --bench linux_snapshot --no-run --message-format=json 2>/dev/null |
	grep '"name":"linux_snapshot"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
if [ -e /sys/module/kvm_pvm ]; then
	echo "(in the lab: QEMU TCG with emulated AMD-V; compare ratios only)"
	scripts/lab.sh --memory 12288 --timeout 3000 --env VMON_KIT="$kit" -- "$bin" "$linux_runs"
else
	VMON_KIT=$kit "$bin" "$linux_runs"
fi
