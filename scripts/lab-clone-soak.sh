#!/usr/bin/env bash
# Run INSIDE the lab (scripts/lab.sh --env VMON_KIT --env MODE --env ROUNDS -- scripts/lab-clone-soak.sh):
# starts COUNT (default 10) Debian VMs at once, lets them run HOLD seconds (default 30), then
# reports how each one ended, for ROUNDS rounds (default 5). It exists to tell whether the
# occasional triple fault of a clone (docs/snapshot.md) is vmon's restore or the lab:
#   MODE=clones      every VM is `vmon restore` of one snapshot (256 MiB, read-only disk)
#   MODE=boots       every VM is a fresh `vmon run` of the same guest and disk
#   MODE=sequential  clones, but restored one after another, each waiting for the last to print
# Each VM reads its own disk once a second and prints what is there; a VM "failed" when it
# ended before HOLD seconds were over. Needs target/debug/vmon (or VMON=path).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${MODE:-clones} rounds=${ROUNDS:-5} count=${COUNT:-10} hold=${HOLD:-30}
vmon=${VMON:-target/debug/vmon}
work=/dev/shm/clone-soak
rm -rf "$work" && mkdir -p "$work"
identity() { # file text
	{ printf '%s' "$2"; head -c $((1048576 - ${#2})) /dev/zero | tr '\0' ' '; } >"$1"
}
script='while true; do dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | cut -c1-20 | head -1; sleep 1; done'
identity "$work/original.img" identity=original
for i in $(seq 1 "$count"); do identity "$work/vm$i.img" "identity=vm-$i"; done

if [ "$mode" != boots ]; then
	"$vmon" run --memory 256M --disk "path=$work/original.img,readonly=on" --api-socket "$work/api" \
		-- sh -c "$script" >"$work/original.out" 2>&1 &
	pid=$!
	for _ in $(seq 1 600); do
		[ "$(grep -c identity=original "$work/original.out")" -ge 2 ] && break
		sleep 0.2
	done
	"$vmon" ctl --api-socket "$work/api" snapshot "$work/snap" --stop || exit 1
	wait "$pid"
fi

failed=0 total=0
for round in $(seq 1 "$rounds"); do
	pids=()
	for i in $(seq 1 "$count"); do
		out=$work/vm$i.$round
		if [ "$mode" = boots ]; then
			"$vmon" run --memory 256M --disk "path=$work/vm$i.img,readonly=on" \
				-- sh -c "$script" >"$out" 2>"$out.err" &
		else
			"$vmon" restore "$work/snap" --disk-path "0=$work/vm$i.img" >"$out" 2>"$out.err" &
		fi
		pids+=($!)
		if [ "$mode" = sequential ]; then
			for _ in $(seq 1 300); do
				grep -q "identity=vm-$i" "$out" && break
				sleep 0.1
			done
		fi
	done
	sleep "$hold"
	for i in $(seq 1 "$count"); do
		total=$((total + 1))
		pid=${pids[$((i - 1))]}
		if kill -0 "$pid" 2>/dev/null; then
			kill -9 "$pid"
			wait "$pid" 2>/dev/null
			grep -q "identity=vm-$i" "$work/vm$i.$round" ||
				echo "round $round vm$i: running but never printed its identity: $(tail -c 300 "$work/vm$i.$round" | tr '\n' ' ')"
		else
			wait "$pid"
			echo "round $round vm$i: ended with status $?: $(tr '\n' ' ' <"$work/vm$i.$round.err" | cut -c1-300)"
			echo "  its console: $(grep -c "identity=vm-$i" "$work/vm$i.$round") identity lines, last: $(tail -c 200 "$work/vm$i.$round" | tr '\n' ' ')"
			failed=$((failed + 1))
		fi
	done
	echo "== $mode round $round done ($(date +%T)): $failed of $total ended early so far"
done
echo "RESULT mode=$mode vms=$total ended_early=$failed"
rm -rf "$work"
