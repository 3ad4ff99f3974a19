#!/usr/bin/env bash
# Run INSIDE the lab (scripts/lab.sh --env VMON_KIT -- scripts/lab-net-probe.sh): repeats the
# I/O benchmark's guest workload (benches/linux_io.rs: sequential and random disk reads, a
# sequential write, then the network brought up and TCP sent to a receiver on the host end
# of a tap) RUNS times (default 12) with the guest's kernel console kept, to catch the
# triple fault that twice ended a benchmark guest just as its network came up
# (docs/benchmarks.md, sessions 4 and 9). For each run: how it ended, and for a run that
# did not end well, the last console lines.
# Needs VMON (default target/release/vmon; lab.sh passes it with --env VMON), TOOL (the
# host's vmon-guest, default target/guest-tools/release/vmon-guest) and an initramfs with
# vmon-guest (/tmp/vmon-guest-initrd-*.img, which the Linux-tier tests leave behind).
# VMM=qemu runs the same guest under QEMU q35 (the benchmark's peer) instead, to tell a
# fault of the lab from one of vmon; VMM=both runs them in turns, so their tcp-send figures
# compare within one lab session. VMM may also list several, in the order of each turn,
# each `vmon`, `vmon:NET-OPTIONS[:FLAG...]` (NET-OPTIONS added to vmon's --net, each FLAG to
# its command line: `vmon:bps=50M`, `vmon::--huge-pages=off`) or `qemu`, to compare
# settings of vmon in one session. GUEST_ARGS adds guest kernel arguments (for example
# irqaffinity=0, to keep every device interrupt on vCPU 0). WORK=net leaves out the disk
# phase. KVM_STATS=1 samples the lab kernel's KVM statistics of the running VM (debugfs)
# and prints what the network phase cost: exits, interrupt injections and halts, in all
# and per MiB sent, and the guest's own interrupt counts per source during the transfer.
# They are counts, not times, so they compare across VMMs without the lab's timing noise.
# KVM_STATS=2 also counts the network phase's exits by reason, its MSR accesses by MSR and
# its in-kernel MMIO writes (ioeventfds: queue notifies) by address, with the lab kernel's
# histogram triggers on KVM's tracepoints (SVM exit codes: 0x60 host interrupt, 0x64
# interrupt window, 0x78 HLT, 0x7b port I/O, 0x7c MSR, 0x400 nested page fault).
# With KVM_STATS, the probe also prints the CPU time each of the VMM's threads (by name),
# the receiver and the whole lab spent in the transfer, from their schedstat and
# /proc/stat: a VMM whose own threads take more CPU per MiB leaves less to the guest's
# vCPUs on the lab's two CPUs. It prints the guest's own view of the same stretch too:
# its CPU time by kind (user, system, softirq, steal, from its /proc/stat), TCP's segment
# and retransmission counters and eth0's packets.
# PERF=1 (with KVM_STATS) also profiles the VMM process for 4 s of the network phase
# (perf's cpu-clock: TCG has no PMU) and prints its top functions per thread.
# LAB_THP=always|madvise|never sets the lab kernel's transparent huge pages first.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
runs=${RUNS:-12}
vmon=${VMON:-target/release/vmon}
tool=${TOOL:-target/guest-tools/release/vmon-guest}
# shellcheck disable=SC2012 # our own file names, newest first
initrd=$(ls -t /tmp/vmon-guest-initrd-*.img | head -1)
img=/dev/shm/net-probe.img
ns=netprobe$$
head -c 1024M /dev/urandom >"$img"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add tapv mode tap
ip -n "$ns" addr add 10.0.9.1/24 dev tapv
ip -n "$ns" link set tapv up
net_mib=512
cmd="echo net-start; ip link set eth0 up && ip addr add 10.0.9.2/24 dev eth0 && vmon-guest tcp-send 10.0.9.1:5201 $net_mib"
if [ "${KVM_STATS:-0}" != 0 ]; then
	# The guest's own interrupt counts around the transfer, to name what the exits were.
	# tcp-go and tcp-end mark the transfer alone, for the CPU times (mark_cpu); the guest then
# waits 2 s, so they are read before the VMM exits.
	cmd="echo net-start; ip link set eth0 up && ip addr add 10.0.9.2/24 dev eth0 && sed 's/^/irq-before /' /proc/interrupts && grep '^cpu' /proc/stat | sed 's/^/stat-before /' && grep -A1 '^Tcp:' /proc/net/snmp | sed 's/^/snmp-before /' && grep eth0 /proc/net/dev | sed 's/^/dev-before /' && echo tcp-go && vmon-guest tcp-send 10.0.9.1:5201 $net_mib && echo tcp-end && grep '^cpu' /proc/stat | sed 's/^/stat-after /' && grep -A1 '^Tcp:' /proc/net/snmp | sed 's/^/snmp-after /' && grep eth0 /proc/net/dev | sed 's/^/dev-after /' && sleep 2 && sed 's/^/irq-after /' /proc/interrupts"
fi
if [ "${WORK:-all}" != net ]; then
	cmd="vmon-guest seq-read /dev/vda 768; vmon-guest rand-read /dev/vda 4; vmon-guest seq-write /dev/vda 256; $cmd"
fi
# halt_*: how the vCPUs waited for interrupts, KVM polling (halt_poll_*_ns, CPU time the lab
# spends) or sleeping (halt_wait_ns).
kvm_stats="exits irq_injections halt_exits mmio_exits io_exits irq_exits irq_window_exits signal_exits
	halt_attempted_poll halt_successful_poll halt_poll_success_ns halt_poll_fail_ns halt_wait_ns"
if [ "${KVM_STATS:-0}" != 0 ] && ! [ -d /sys/kernel/debug/kvm ]; then
	mount -t debugfs none /sys/kernel/debug || exit 2
fi
# KVM tracepoint:histogram keys, for KVM_STATS=2.
hists="kvm_exit:exit_reason.hex kvm_page_fault:error_code.hex kvm_msr:ecx.hex,write kvm_mmio:type,gpa.hex"
tracing=/sys/kernel/tracing
# Adds (""), clears (:clear) or removes (!) the histogram triggers.
hist_triggers() {
	local h
	for h in $hists; do
		if [ "$1" = "!" ]; then
			echo "!hist:keys=${h#*:}:sort=hitcount.descending" >"$tracing/events/kvm/${h%%:*}/trigger"
		else
			echo "hist:keys=${h#*:}:sort=hitcount.descending$1" >>"$tracing/events/kvm/${h%%:*}/trigger"
		fi
	done
}
if [ -n "${LAB_THP:-}" ]; then
	# The lab kernel's transparent huge page mode (always, madvise, never), for the run.
	echo "$LAB_THP" >/sys/kernel/mm/transparent_hugepage/enabled || exit 2
fi
if [ "${KVM_STATS:-0}" = 2 ]; then
	if ! [ -d $tracing/events/kvm ]; then
		mount -t tracefs none $tracing || exit 2
	fi
	hist_triggers "" || exit 2
fi
# The histograms, one line per key: "event key... count".
read_hists() {
	local h
	for h in $hists; do
		sed -n "s/^{ \(.*\) } *hitcount: *\([0-9]*\)\$/${h%%:*} \1 \2/p" "$tracing/events/kvm/${h%%:*}/hist" |
			tr -s ' '
	done
}
# CPU time in ms so far: "thread NAME ms" and "wakes NAME N" (times it slept) per thread of
# the VMM (pid $1), "recv ms" for the
# receiver, and "lab-busy ms" / "lab-idle ms" from /proc/stat (jiffies of 10 ms).
cpu_times() {
	local t name ns
	for t in /proc/"$1"/task/*; do
		name=$(tr ' ' _ <"$t/comm" 2>/dev/null) || continue
		read -r ns _ 2>/dev/null <"$t/schedstat" || continue
		echo "thread $name $((ns / 1000000))"
		# How often it slept and was woken (voluntary context switches): each wake-up is a
		# trip through the lab kernel's scheduler, which TCG makes dear.
		awk -v n="$name" '$1 == "voluntary_ctxt_switches:" { print "wakes", n, $2 }' "$t/status" 2>/dev/null
	done
	t=$(pgrep -n -f "tcp-recv 5201") && read -r ns _ 2>/dev/null <"/proc/$t/schedstat" &&
		echo "recv - $((ns / 1000000))"
	awk '$1 == "cpu" { print "lab busy", ($2 + $3 + $4 + $7 + $8) * 10; print "lab idle", ($5 + $6) * 10 }' /proc/stat
}
# CPU times (cpu_times) when the guest's console ($2) says the transfer starts (tcp-go) and
# when it says it ended (tcp-end), to $1.go and $1.end. A loop of its own that looks every
# 50 ms: sample_kvm's rounds take up to a second or more in the CPU-bound lab, and its
# window missed up to a third of a transfer.
mark_cpu() {
	local pid
	until grep -q '^tcp-go' "$2" 2>/dev/null; do sleep 0.05; done
	pid=$(pgrep -n -f "^($vmon|qemu-system-x86_64) ")
	[ -n "$pid" ] || return
	cpu_times "$pid" >"$1.go"
	until grep -q '^tcp-end' "$2" 2>/dev/null; do sleep 0.05; done
	cpu_times "$pid" >"$1.end"
}
# Writes the running VM's KVM statistics to $1 every 0.2 s, and to $1.start the first time
# the guest's console ($2) says the network phase starts (clearing the histograms then,
# and writing them to $1.hist at each sample after).
sample_kvm() {
	local vm now pid
	while sleep 0.2; do
		pid=$(pgrep -n -f "^($vmon|qemu-system-x86_64) ")
		[ -n "$pid" ] && cpu_times "$pid" >"$1.cpu"
		for vm in /sys/kernel/debug/kvm/*-*/; do
			[ -r "$vm/exits" ] || continue
			now=""
			for f in $kvm_stats; do now+="$(cat "$vm/$f" 2>/dev/null || echo 0) "; done
			echo "$now" >"$1"
			if [ -f "$1.start" ] && [ "${KVM_STATS:-0}" = 2 ]; then
				read_hists >"$1.hist.new" && mv "$1.hist.new" "$1.hist"
			fi
			if ! [ -f "$1.start" ] && grep -q '^net-start' "$2"; then
				[ "${KVM_STATS:-0}" = 2 ] && hist_triggers :clear
				echo "$now" >"$1.start"
				cp "$1.cpu" "$1.cpu.start" 2>/dev/null
				if [ "${PERF:-0}" = 1 ] && [ -n "$pid" ]; then
					perf record -q -e cpu-clock -F 1000 -g -p "$pid" -o "$1.perf" -- sleep 4 \
						>/dev/null 2>&1 &
				fi
			fi
		done
	done
}
vmm=${VMM:-vmon}
guest_args=${GUEST_ARGS:-}
cmd64=$(printf %s "$cmd" | base64 -w0)
# CONSOLE replaces the kernel console arguments; the I/O benchmark's are
# "console=ttyS1 quiet" (its kernel log on the second UART, warnings only).
append="${CONSOLE:-console=ttyS0 loglevel=7} reboot=k,panic_warm panic=-1 i8042.noaux $guest_args vmon.cmd=$cmd64 vmon.tty=0"
# The command line that runs the guest under VMM $1.
launch() {
	case $1 in
	vmon | vmon:*)
		local net_options flags
		IFS=: read -r _ net_options flags <<<"$1"
		# shellcheck disable=SC2206 # FLAGs are split at colons, on purpose
		flags=(${flags//:/ })
		launch=("$vmon" run --kernel "$VMON_KIT/vmlinux" --initrd "$initrd" --cpus 2
			--memory 1G --disk path="$img" --net "tap=tapv${net_options:+,$net_options}"
			"${flags[@]}" --cmdline "$append")
		;;
	qemu)
		# shellcheck disable=SC2054 # QEMU's option values are comma lists
		# debug-threads names QEMU's threads, for the CPU times per thread.
		launch=(qemu-system-x86_64 -name probe,debug-threads=on -M q35 -enable-kvm -cpu host,-arch-capabilities -smp 2
			-m 1G -nodefaults -no-user-config -display none -monitor none -serial stdio
			-kernel "$VMON_KIT/vmlinux" -initrd "$initrd" -append "$append"
			-device virtio-blk-pci,drive=d0
			-drive if=none,id=d0,file="$img",format=raw,cache=writeback,aio=threads
			-netdev tap,id=n0,ifname=tapv,script=no,downscript=no
			-device virtio-net-pci,netdev=n0
			-serial file:/dev/shm/net-probe.ttyS1 -no-reboot
			# Says why QEMU ends: reason 6 is the guest powering off, 7 a reset (a
			# triple fault, silent otherwise, or a reboot).
			-trace qemu_system_shutdown_request)
		;;
	esac
}
case $vmm in
both) vmms=(vmon qemu) ;;
*)
	read -ra vmms <<<"$vmm"
	for v in "${vmms[@]}"; do
		case $v in
		vmon | vmon:* | qemu) ;;
		*)
			echo "lab-net-probe: VMM must list vmon, vmon:NET-OPTIONS or qemu, or be both; not '$v'" >&2
			exit 2
			;;
		esac
	done
	;;
esac
echo "== ${vmms[*]} (vmon: $vmon), guest arguments: ${guest_args:-none}, lab halt_poll_ns: $(cat /sys/module/kvm/parameters/halt_poll_ns 2>/dev/null)"
declare -A bad tcp
for run in $(seq 1 "$runs"); do
	# With both, they take turns, so that a slow stretch of the lab hits both alike.
	for v in "${vmms[@]}"; do
		launch "$v"
		out=/dev/shm/net-probe.$v.$run
		ip netns exec "$ns" "$tool" tcp-recv 5201 >/dev/null 2>&1 &
		recv=$!
		start=$(date +%s)
		sampler=""
		if [ "${KVM_STATS:-0}" != 0 ]; then
			rm -f "$out.kvm" "$out.kvm.start" "$out.kvm.hist" "$out.kvm.cpu" "$out.kvm.cpu.start"
			rm -f "$out.mark.go" "$out.mark.end"
			sample_kvm "$out.kvm" "$out" &
			sampler=$!
			mark_cpu "$out.mark" "$out" &
			sampler+=" $!"
		fi
		timeout 300 ip netns exec "$ns" "${launch[@]}" </dev/null >"$out" 2>&1
		status=$?
		if [ -f /dev/shm/net-probe.ttyS1 ]; then
			sed 's/^/ttyS1: /' /dev/shm/net-probe.ttyS1 >>"$out"
			rm -f /dev/shm/net-probe.ttyS1
		fi
		kill "$recv" $sampler 2>/dev/null
		wait "$recv" $sampler 2>/dev/null
		if [ -n "$sampler" ] && [ -f "$out.kvm.start" ] && [ -f "$out.kvm" ]; then
			read -ra before <"$out.kvm.start"
			read -ra after <"$out.kvm"
			i=0
			line=""
			for f in $kvm_stats; do
				d=$((after[i] - before[i]))
				line+="$f $d ($((d / net_mib))/MiB) "
				i=$((i + 1))
			done
			echo "== $v run $run, KVM during the network phase: $line"
			if [ -f "$out.kvm.hist" ]; then
				for h in $hists; do
					echo "== $v run $run, ${h%%:*} by ${h#*:}: $(awk -v ev="${h%%:*}" '
						$1 == ev && shown < 8 {
							k = ""; for (i = 2; i < NF; i++) if ($i !~ /:$/) k = k $i
							printf "%s=%s ", k, $NF; shown++
						}' "$out.kvm.hist")"
				done
			fi
			if [ -f "$out.mark.go" ] && [ -f "$out.mark.end" ]; then
				# Summed per thread name (QEMU's pool threads share one), after minus before;
				# a thread that ended in between is left out.
				echo "== $v run $run, CPU ms during the transfer (tcp-go to tcp-end): $(awk '
					FNR == NR { b[$1 " " $2] += $3; next }
					{ a[$1 " " $2] += $3 }
					END { for (k in a) if (k in b && a[k] - b[k] > 0) printf "%s %d; ", k, a[k] - b[k] }' \
					"$out.mark.go" "$out.mark.end" | sed 's/thread //g')"
			elif [ -f "$out.kvm.cpu.start" ]; then
				# As above, over the sampler's coarser window.
				echo "== $v run $run, CPU ms during the network phase: $(awk '
					FNR == NR { b[$1 " " $2] += $3; next }
					{ a[$1 " " $2] += $3 }
					END { for (k in a) if (k in b && a[k] - b[k] > 0) printf "%s %d; ", k, a[k] - b[k] }' \
					"$out.kvm.cpu.start" "$out.kvm.cpu" | sed 's/thread //g')"
			fi
			while pgrep -x perf >/dev/null; do sleep 0.5; done
			if [ -f "$out.kvm.perf" ]; then
				echo "== $v run $run, profile of the VMM in the network phase (share of samples):"
				perf report -i "$out.kvm.perf" --no-children --sort comm,sym --stdio -g none \
					2>/dev/null | grep -E '^ +[0-9]' | head -40
			fi
			# Per interrupt source, summed over the guest's CPUs: counts after minus before
			# (the first line of /proc/interrupts names the CPUs).
			echo "== $v run $run, guest interrupts during the transfer: $(awk '
				$1 == "irq-before" || $1 == "irq-after" {
					if ($2 ~ /^CPU/) next
					n = 0; for (i = 3; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
					name = $2; for (j = i; j <= NF; j++) name = name "_" $j
					if ($1 == "irq-before") b[name] = n; else a[name] = n
				}
				END { for (k in a) if (a[k] - b[k] > 0) printf "%s %d; ", k, a[k] - b[k] }' "$out")"
			# Where the guest's own CPUs spent the transfer (its /proc/stat, in ms): what a
			# vCPU thread's time was spent on, from inside.
			echo "== $v run $run, guest CPU ms during the transfer, both vCPUs: $(awk '
				($1 == "stat-before" || $1 == "stat-after") && $2 == "cpu" {
					for (i = 3; i <= 10; i++) v[$1, i] = $i
				}
				END {
					split("user nice system idle iowait irq softirq steal", f, " ")
					for (i = 3; i <= 10; i++) printf "%s %d; ", f[i - 2], (v["stat-after", i] - v["stat-before", i]) * 10
				}' "$out")"
			# TCP's own counters (segments out, retransmitted, in) and the interface's
			# packets, from inside the guest: lost packets show as retransmissions.
			echo "== $v run $run, guest TCP and eth0 during the transfer: $(awk '
				($1 == "snmp-before" || $1 == "snmp-after") && $2 == "Tcp:" {
					if ($3 ~ /^[A-Za-z]/) { for (i = 3; i <= NF; i++) name[i] = $i; next }
					for (i = 3; i <= NF; i++) tcp[$1, name[i]] = $i
				}
				($1 == "dev-before" || $1 == "dev-after") {
					sub(/eth0:/, "eth0: "); n = split($0, f, " ")
					rxp[$1] = f[4]; txp[$1] = f[12]; rxd[$1] = f[6]; txd[$1] = f[14]
				}
				END {
					split("OutSegs RetransSegs InSegs InErrs OutRsts", k, " ")
					for (i = 1; i <= 5; i++) printf "%s %d; ", k[i], tcp["snmp-after", k[i]] - tcp["snmp-before", k[i]]
					printf "eth0 rx packets %d, tx packets %d, rx drop %d, tx drop %d", rxp["dev-after"] - rxp["dev-before"], txp["dev-after"] - txp["dev-before"], rxd["dev-after"] - rxd["dev-before"], txd["dev-after"] - txd["dev-before"]
				}' "$out")"
		fi
		echo "== $v run $run: exit $status in $(($(date +%s) - start)) s: $(grep -hoE '^(seq-read|tcp-send) .*|qemu_system_shutdown_request reason=[0-9]+' "$out" | tr '\n' ' ')"
		tcp[$v]+="$(sed -n 's/^tcp-send \([0-9.]*\) MB.*/\1/p' "$out") "
		# QEMU exits 0 after a triple fault (-no-reboot): a run ended well only when the
		# guest finished its last step.
		if [ "$status" != 0 ] || grep -q "triple fault" "$out" || ! grep -q "^tcp-send" "$out"; then
			bad[$v]=$((${bad[$v]:-0} + 1))
			echo "--- last 40 lines of $v run $run ---"
			tail -40 "$out"
		fi
	done
done
for v in "${vmms[@]}"; do
	median=$(tr ' ' '\n' <<<"${tcp[$v]}" | grep . | sort -n | awk '{a[NR]=$1} END {if (NR) print (NR % 2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
	echo "== $v: ${bad[$v]:-0} of $runs runs did not end well; tcp-send MB/s: ${tcp[$v]}(median ${median:-none})"
done
ip netns del "$ns"
[ "${KVM_STATS:-0}" = 2 ] && hist_triggers "!"
rm -f "$img" /dev/shm/net-probe.*
