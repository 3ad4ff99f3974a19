#!/usr/bin/env bash
# Run INSIDE the lab (scripts/lab.sh --env VMON_KIT -- scripts/lab-stall-probe.sh): boots the
# default guest RUNS times (default 8) doing 4 KiB O_DIRECT random reads one at a time, and
# when a guest prints nothing for 16 s, records the evidence of a stalled lab CPU: the lab's
# per-CPU local timer interrupt counts (LOC) a second apart, where each vmon thread runs, and
# the lab's clockevent state (/proc/timer_list). docs/lab.md explains what it showed.
# Needs target/release/vmon and an initramfs with vmon-guest (/tmp/vmon-guest-initrd-*.img,
# which the Linux-tier tests leave behind).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${RUNS:-8}
initrd=$(ls -t /tmp/vmon-guest-initrd-*.img | head -1)
img=/dev/shm/stall-probe.img
head -c 512M /dev/urandom >"$img"
echo "lab cmdline: $(cat /proc/cmdline)"
cmd='(while sleep 3; do echo "W $(cat /proc/uptime) inflight=$(cat /sys/block/vda/inflight)" >&2; done) & for i in 1 2 3 4 5 6 7 8; do vmon-guest rand-read /dev/vda 4; done; kill %1'
for run in $(seq 1 "$runs"); do
	out=/dev/shm/stall-probe.$run
	echo "== run $run $(date +%T) $(grep LOC /proc/interrupts | tr -s ' ')"
	target/release/vmon run --kernel "$VMON_KIT/vmlinux" --initrd "$initrd" --cpus 2 --memory 1G \
		--disk path="$img" -- sh -c "$cmd" >"$out" 2>&1 &
	pid=$!
	last=0 same=0
	for _ in $(seq 1 60); do
		sleep 2
		kill -0 "$pid" 2>/dev/null || break
		n=$(wc -l <"$out")
		if [ "$n" = "$last" ]; then same=$((same + 1)); else same=0 last=$n; fi
		if [ "$same" -ge 8 ]; then
			echo "STALL after: $(tail -1 "$out")"
			for _ in 1 2 3; do
				echo "LOC $(date +%T.%N) $(grep LOC /proc/interrupts | tr -s ' ')"
				sleep 1
			done
			for t in /proc/$pid/task/*; do
				echo "$(cat "$t/comm") cpu=$(awk '{print $39}' "$t/stat") wchan=$(cat "$t/wchan")"
			done
			grep -E "^cpu:|expires_next|Clock Event Device|event_handler|next_event|mode:" /proc/timer_list
			kill -9 "$pid"
			break
		fi
	done
	wait "$pid"
	echo "exit $? after $(grep -c rand-read "$out") of 8 measurements"
done
rm -f "$img" /dev/shm/stall-probe.*
