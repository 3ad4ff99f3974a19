#!/usr/bin/env bash
# Run a command inside the hardware-virtualization lab: a QEMU TCG VM that
# emulates AMD-V, so that kvm_amd gives it a real /dev/kvm (our machines' own
# /dev/kvm is PVM, where stock Linux cannot boot). The lab boots Debian's stock
# kernel, mounts the host's root read-only over 9p (host /tmp read-write) and
# runs the command chrooted there, in the caller's directory. See docs/lab.md.
set -euo pipefail

lab_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=guest-kit.sh disable=SC1091
source "$lab_here/guest-kit.sh"
# shellcheck disable=SC2034 # used by the kit_* helpers
KIT_LOG=lab

# Bump when the lab build changes in a way the init and modules do not show.
LAB_FORMAT=1
LAB_MODULES=(
	virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
	netfs fscache 9pnet 9pnet_virtio 9p irqbypass kvm ccp kvm_amd
	tun veth bridge stp llc
)
# Variables always passed into the lab when set (besides PATH and HOME), and
# every VMON_* variable.
LAB_PASS_ENV=(LANG LC_ALL RUST_BACKTRACE RUST_LOG XDG_CACHE_HOME)

lab_usage() {
	cat <<'EOF'
usage: lab.sh [OPTIONS] -- COMMAND [ARG...]
       lab.sh --build-only [--cache DIR] [--force]
Boots the lab VM (QEMU TCG with emulated AMD-V, real /dev/kvm inside), runs
COMMAND there as root in the host's root filesystem (read-only; /tmp is the
host's /tmp, read-write) from the current directory, streams its stdout and
stderr, and exits with its status (125 if the lab failed to report one).
  --cpus N          lab vCPUs (default 2)
  --memory MIB      lab memory in MiB (default 6144)
  --timeout SECS    kill the lab after SECS seconds (default 1800)
  --kernel-args A   extra lab kernel command-line arguments (default: $VMON_LAB_KERNEL_ARGS)
  --env NAME[=VAL]  pass NAME (from this environment, or set to VAL); repeatable.
                    PATH, HOME, VMON_IN_LAB=1, TMPDIR=/tmp, every VMON_* and
                    LANG LC_ALL RUST_BACKTRACE RUST_LOG XDG_CACHE_HOME are
                    always passed
  --verbose         report lab timings and show the lab console on failure
  --build-only      build the lab kernel/initramfs (if needed) and print its dir
  --cache DIR       cache directory (default as for guest-kit.sh)
  --force           rebuild the lab kernel/initramfs
EOF
}

# The lab's /init (busybox sh).
lab_init_text() {
	cat <<'VMON_LAB_INIT_EOF'
#!/bin/sh
# vmon lab init: load KVM and 9p, mount the host root, run the command given
# by vmonlab.dir=DIR (DIR/run.sh, written by scripts/lab.sh), record its
# status in DIR/status and power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
kver=$(uname -r)
while read -r name path; do
	insmod "/lib/modules/$kver/$path" 2>/dev/null ||
		echo "lab-init: cannot load $name"
done <"/lib/modules/$kver/vmon.load"
ip link set lo up 2>/dev/null

dir=''
for tok in $(cat /proc/cmdline); do
	case $tok in
	vmonlab.dir=*) dir=${tok#vmonlab.dir=} ;;
	esac
done

o=trans=virtio,version=9p2000.L,msize=524288
mkdir -p /host
if ! mount -t 9p -o "$o,cache=loose,ro" hostroot /host ||
	! mount -t 9p -o "$o" hosttmp /host/tmp; then
	echo "lab-init: cannot mount the host over 9p"
	poweroff -f
fi
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t tmpfs -o mode=755 tmpfs /host/run

if [ -n "$dir" ] && [ -f "/host$dir/run.sh" ]; then
	echo "lab-init: running $dir/run.sh"
	chroot /host /usr/bin/env -i /bin/bash --noprofile --norc "$dir/run.sh" \
		</dev/null >>"/host$dir/out" 2>>"/host$dir/err"
	echo $? >"/host$dir/status.tmp" && mv "/host$dir/status.tmp" "/host$dir/status"
else
	echo "lab-init: no command (vmonlab.dir=$dir)"
fi
poweroff -f
VMON_LAB_INIT_EOF
}

lab_recipe() {
	kit_recipe "lab-format=$LAB_FORMAT" "${LAB_MODULES[*]}" "$(lab_init_text)"
}

# lab_build CACHE FORCE: prints the lab directory.
lab_build() {
	kit_ensure "$1/lab" "$(lab_recipe)" "$(lab_init_text)" lab-initramfs.cpio.gz "$2" \
		"${LAB_MODULES[@]}"
}

# lab_pump FILE OFFSET_VAR: copies FILE's bytes past the offset held in
# OFFSET_VAR to stdout and advances the offset.
lab_pump() {
	local -n off=$2
	local size
	size=$(stat -c %s "$1" 2>/dev/null || echo 0)
	if ((size > off)); then
		dd if="$1" bs=64K iflag=skip_bytes,count_bytes skip="$off" count=$((size - off)) \
			status=none || true
		off=$size
	fi
}

# Strip SeaBIOS/terminal escape sequences and carriage returns.
lab_clean_console() {
	sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' -e 's/\r//g' "$1"
}

# Globals for the EXIT trap: the running QEMU and the shared directory.
LAB_QEMU_PID=''
LAB_TMP=''
lab_cleanup() {
	[[ -z $LAB_QEMU_PID ]] || kill "$LAB_QEMU_PID" 2>/dev/null || true
	[[ -z $LAB_TMP ]] || rm -rf "$LAB_TMP"
}

lab_main() {
	local cpus=2 memory=6144 timeout=1800 verbose=0 build_only=0 force=0 cache=''
	local kernel_args=${VMON_LAB_KERNEL_ARGS-}
	local -a envs=()
	while [[ $# -gt 0 ]]; do
		case $1 in
		--cpus | --memory | --timeout | --env | --cache | --kernel-args)
			[[ $# -ge 2 ]] || kit_die "$1 needs a value"
			case $1 in
			--cpus) cpus=$2 ;;
			--memory) memory=$2 ;;
			--timeout) timeout=$2 ;;
			--env) envs+=("$2") ;;
			--cache) cache=$2 ;;
			--kernel-args) kernel_args=$2 ;;
			esac
			shift 2
			;;
		--verbose)
			verbose=1
			shift
			;;
		--build-only)
			build_only=1
			shift
			;;
		--force)
			force=1
			shift
			;;
		-h | --help)
			lab_usage
			return 0
			;;
		--)
			shift
			break
			;;
		-*) kit_die "unknown option '$1' (see --help)" ;;
		*) break ;;
		esac
	done
	local n
	for n in "$cpus" "$memory" "$timeout"; do
		[[ $n =~ ^[1-9][0-9]*$ ]] || kit_die "'$n' is not a positive number"
	done
	[[ $build_only -eq 1 || $# -gt 0 ]] || kit_die "no command given (see --help)"

	[[ -n $cache ]] || cache=$(kit_default_cache)
	mkdir -p "$cache" || kit_die "cannot create $cache"
	cache=$(cd -P "$cache" && pwd)
	local lab
	lab=$(lab_build "$cache" "$force")
	if [[ $build_only -eq 1 ]]; then
		printf '%s\n' "$lab"
		return 0
	fi
	command -v qemu-system-x86_64 >/dev/null ||
		kit_die "qemu-system-x86_64 not found: apt-get install qemu-system-x86"

	# The command, its environment and its results live in a directory under
	# the host's /tmp, which the lab mounts read-write at the same path.
	local dir
	dir=$(mktemp -d /tmp/vmon-lab.XXXXXX)
	LAB_TMP=$dir
	trap lab_cleanup EXIT
	chmod 755 "$dir"
	: >"$dir/out"
	: >"$dir/err"
	{
		printf '#!/bin/bash\n'
		printf ': >%q\n' "$dir/started"
		printf 'export %q\n' "PATH=$PATH" "HOME=${HOME:-/root}" VMON_IN_LAB=1 TMPDIR=/tmp
		local v
		for v in "${LAB_PASS_ENV[@]}" $(compgen -e VMON_ || true); do
			[[ $v == VMON_IN_LAB ]] && continue
			[[ -n ${!v+x} ]] && printf 'export %q\n' "$v=${!v}"
		done
		for v in "${envs[@]}"; do
			if [[ $v == *=* ]]; then
				printf 'export %q\n' "$v"
			elif [[ -n ${!v+x} ]]; then
				printf 'export %q\n' "$v=${!v}"
			fi
		done
		printf 'cd %q || { echo "lab: cannot cd to %q in the lab" >&2; exit 125; }\n' "$PWD" "$PWD"
		printf 'exec'
		printf ' %q' "$@"
		printf '\n'
	} >"$dir/run.sh"

	local model=passthrough
	[[ $EUID -eq 0 ]] || model=none
	local start now started_at=''
	trap 'exit 130' INT
	trap 'exit 143' TERM

	start=$(date +%s.%N)
	qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC,+svm,+npt \
		-smp "$cpus" -m "$memory" -nodefaults -no-user-config -display none \
		-no-reboot -serial "file:$dir/console.log" \
		-kernel "$lab/vmlinuz" -initrd "$lab/lab-initramfs.cpio.gz" \
		-append "console=ttyS0 quiet panic=-1 $kernel_args vmonlab.dir=$dir" \
		-virtfs "local,path=/,mount_tag=hostroot,security_model=$model,readonly=on,multidevs=remap" \
		-virtfs "local,path=/tmp,mount_tag=hosttmp,security_model=$model,multidevs=remap" \
		</dev/null >"$dir/qemu.log" 2>&1 &
	LAB_QEMU_PID=$!
	local qemu_pid=$LAB_QEMU_PID

	# shellcheck disable=SC2034 # updated through lab_pump's nameref
	local out_off=0 err_off=0 alive=1 timed_out=0
	while :; do
		kill -0 "$qemu_pid" 2>/dev/null || alive=0
		lab_pump "$dir/out" out_off
		lab_pump "$dir/err" err_off >&2
		if [[ -z $started_at && -e $dir/started ]]; then
			now=$(date +%s.%N)
			started_at=$(awk -v a="$start" -v b="$now" 'BEGIN { printf "%.1f", b - a }')
			[[ $verbose -eq 0 ]] || kit_log "command started ${started_at}s after launch"
		fi
		[[ $alive -eq 1 ]] || break
		now=$(date +%s)
		if ((now - ${start%.*} >= timeout)); then
			timed_out=1
			kill "$qemu_pid" 2>/dev/null || true
			wait "$qemu_pid" 2>/dev/null || true
			alive=0
			continue
		fi
		sleep 0.2
	done
	wait "$qemu_pid" 2>/dev/null || true
	LAB_QEMU_PID=''
	now=$(date +%s.%N)
	local total
	total=$(awk -v a="$start" -v b="$now" 'BEGIN { printf "%.1f", b - a }')

	local status=''
	[[ ! -f $dir/status ]] || status=$(<"$dir/status")
	if [[ $status =~ ^[0-9]+$ ]]; then
		[[ $verbose -eq 0 ]] || kit_log "lab session took ${total}s, command exit status $status"
		return "$status"
	fi
	if [[ $timed_out -eq 1 ]]; then
		kit_log "timed out after ${timeout}s without the command finishing (--timeout)"
	else
		kit_log "the lab VM stopped after ${total}s without reporting the command's status"
	fi
	if [[ $verbose -eq 1 || $timed_out -eq 0 ]]; then
		{
			# A lab-kernel crash from its first line (which names the task), else the end.
			local crash
			crash=$(lab_clean_console "$dir/console.log" |
				grep -n -m1 -E 'BUG:|Oops|general protection|Kernel panic' | cut -d: -f1)
			if [[ -n $crash ]]; then
				echo "--- lab console (the crash, from line $crash) ---"
				lab_clean_console "$dir/console.log" | tail -n "+$((crash > 5 ? crash - 5 : 1))" | head -n 120
			else
				echo "--- lab console (last 30 lines) ---"
				lab_clean_console "$dir/console.log" | tail -n 30
			fi
			grep -v "TCG doesn.t support requested feature" "$dir/qemu.log" | sed "1i --- qemu ---" || true
		} >&2
	fi
	return 125
}

lab_main "$@"
