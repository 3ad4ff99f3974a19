#!/usr/bin/env bash
# Run INSIDE the lab (scripts/lab.sh --env VMON_KIT -- scripts/lab-net-probe.sh): repeats the
# I/O benchmark's guest workload (benches/linux_io.rs: sequential and random disk reads, a
# sequential write, then the network brought up and TCP sent to a receiver on the host end
# of a tap) RUNS times (default 12) with the guest's kernel console kept, to catch the
# triple fault that twice ended a benchmark guest just as its network came up
# (docs/benchmarks.md, sessions 4 and 9). For each run: how it ended, and for a run that
# did not end well, the last console lines.
# Needs VMON (default target/release/vmon), TOOL (the host's vmon-guest, default
# target/guest-tools/release/vmon-guest) and an initramfs with vmon-guest
# (/tmp/vmon-guest-initrd-*.img, which the Linux-tier tests leave behind).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${RUNS:-12}
vmon=${VMON:-target/release/vmon}
tool=${TOOL:-target/guest-tools/release/vmon-guest}
initrd=$(ls -t /tmp/vmon-guest-initrd-*.img | head -1)
img=/dev/shm/net-probe.img
ns=netprobe$$
head -c 1024M /dev/urandom >"$img"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add tapv mode tap
ip -n "$ns" addr add 10.0.9.1/24 dev tapv
ip -n "$ns" link set tapv up
cmd='vmon-guest seq-read /dev/vda 768; vmon-guest rand-read /dev/vda 4; vmon-guest seq-write /dev/vda 256; ip link set eth0 up && ip addr add 10.0.9.2/24 dev eth0 && vmon-guest tcp-send 10.0.9.1:5201 512'
bad=0
for run in $(seq 1 "$runs"); do
	out=/dev/shm/net-probe.$run
	ip netns exec "$ns" "$tool" tcp-recv 5201 >/dev/null 2>&1 &
	recv=$!
	start=$(date +%s)
	timeout 300 ip netns exec "$ns" "$vmon" run --kernel "$VMON_KIT/vmlinux" --initrd "$initrd" \
		--cpus 2 --memory 1G --disk path="$img" --net tap=tapv \
		--cmdline "console=ttyS0 reboot=k,panic_warm panic=-1 i8042.noaux loglevel=7" \
		-- sh -c "$cmd" >"$out" 2>&1
	status=$?
	kill "$recv" 2>/dev/null
	wait "$recv" 2>/dev/null
	echo "== run $run: exit $status in $(($(date +%s) - start)) s: $(grep -E 'seq-read|tcp-send' "$out" | tr '\n' ' ')"
	if [ "$status" != 0 ] || grep -q "triple fault" "$out"; then
		bad=$((bad + 1))
		echo "--- last 40 lines of run $run ---"
		tail -40 "$out"
	fi
done
echo "== $bad of $runs runs did not end well"
ip netns del "$ns"
rm -f "$img" /dev/shm/net-probe.*
