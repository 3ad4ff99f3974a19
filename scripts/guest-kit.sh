#!/usr/bin/env bash
# Build, or find in the cache, vmon's default guest kit: Debian's stock kernel
# and a small busybox initramfs whose /init follows the contract in
# docs/guest-kit.md. Prints the kit directory as the last line of stdout;
# progress and errors go to stderr.
#
# The vmon binary embeds this file and runs it as `bash -s -- ARGS`, so it must
# not look up its own path or source other files: everything it needs,
# including the guest init (readable source: guest/init), is inlined below.
# scripts/lab.sh sources it to reuse the helpers (kit_main runs only when the
# file is executed).
set -euo pipefail

# Bump when the kit layout or build recipe changes in a way the init and module
# list do not show; cached kits with another recipe are rebuilt.
KIT_FORMAT=2
# Modules for the guest (their dependencies are added), in wanted order.
# crc32c_* are ext4/jbd2 soft dependencies ("crypto-crc32c").
KIT_GUEST_MODULES=(
	virtio_pci virtio_mmio virtio_blk virtio_net vsock vmw_vsock_virtio_transport
	virtio_rng virtio_balloon crc32c_generic crc32c_intel ext4 button evdev
)
KIT_LOG=guest-kit

kit_log() { printf '%s: %s\n' "$KIT_LOG" "$*" >&2; }
kit_die() {
	kit_log "$*"
	exit 1
}

kit_usage() {
	cat <<'EOF'
usage: guest-kit.sh [--cache DIR] [--force] [--init FILE]
       guest-kit.sh --print-init
Builds the default vmon guest kit (stock Debian kernel + busybox initramfs)
under CACHE/kit/<kernel-version>/ and prints that directory as the last line
of stdout. CACHE defaults to ${VMON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmon}.
  --cache DIR   use DIR as CACHE
  --force       rebuild even if a complete kit exists
  --init FILE   use FILE as the guest /init instead of the built-in copy
  --print-init  print the built-in guest /init and exit
EOF
}

# The guest /init: a verbatim copy of guest/init (scripts/check-kit-init.sh).
kit_builtin_init() {
	cat <<'VMON_GUEST_INIT_EOF'
#!/bin/sh
# vmon guest init (busybox sh). The contract is described in docs/guest-kit.md.
# scripts/guest-kit.sh carries a verbatim copy of this file; after editing it,
# update that copy (scripts/check-kit-init.sh tells whether they differ).

export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
umask 022
set -f

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run /root
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
chmod 1777 /tmp

read -r cmdline </proc/cmdline

# Kernel command-line parameters "MODULE.PARAM=VALUE": modprobe would pass
# them to the module, insmod does not, so the loop below does.
modargs=
for tok in $cmdline; do
	case $tok in
	vmon.*) ;;
	[!=]*.*=*) modargs="$modargs $tok" ;;
	esac
done

kver=$(uname -r)
if [ -r "/lib/modules/$kver/vmon.load" ]; then
	while read -r name path; do
		[ -n "$name" ] || continue
		params=
		for tok in $modargs; do
			key=${tok%%=*}
			mod=${key%%.*}
			# busybox sh has ${var//pattern/replacement}
			# shellcheck disable=SC3060
			[ "${mod//-/_}" = "$name" ] && params="$params ${tok#*.}"
		done
		# Errors (already loaded, no such device, ...) are not fatal.
		# shellcheck disable=SC2086
		insmod "/lib/modules/$kver/$path" $params >/dev/null 2>&1
	done <"/lib/modules/$kver/vmon.load"
fi
ip link set lo up >/dev/null 2>&1

# Orderly shutdown: `vmon ctl shutdown` presses the ACPI power button; the button
# driver reports it as a KEY_POWER input event and busybox acpid (which finds
# the input devices when it starts, so after the modules) runs its built-in
# action for it, /etc/acpi/PWRF/00000080: stop every process (TERM, then KILL),
# sync, power off. The marker keeps `finish` from reporting a killed command's
# status instead of powering off.
mkdir -p /etc/acpi/PWRF /var/log
cat >/etc/acpi/PWRF/00000080 <<'VMON_PWRF_EOF'
#!/bin/sh
: >/run/vmon-poweroff
echo "vmon-init: power button pressed: powering off" >/dev/console
kill -TERM -1 2>/dev/null
sleep 1
kill -KILL -1 2>/dev/null
sync
poweroff -f
VMON_PWRF_EOF
chmod 755 /etc/acpi/PWRF/00000080
acpid >/dev/null 2>&1

# root=/dev/...: like a distribution's initramfs, mount that filesystem (read-
# only unless "rw" is on the command line) and continue with its /sbin/init,
# which sees the same command line. Only from the initramfs: the same script
# running from the disk must not switch again.
root='' rootmode=ro
for tok in $cmdline; do
	case $tok in
	root=/dev/*) root=${tok#root=} ;;
	rw) rootmode=rw ;;
	ro) rootmode=ro ;;
	esac
done
case $(stat -f -c %T / 2>/dev/null) in
ramfs | tmpfs) from_initramfs=1 ;;
*) from_initramfs=0 ;;
esac
if [ -n "$root" ] && [ "$from_initramfs" = 1 ]; then
	mkdir -p /newroot
	if mount -o "$rootmode" "$root" /newroot 2>/dev/ttyS1; then
		umount /dev/pts /dev/shm 2>/dev/null
		exec switch_root /newroot /sbin/init
	fi
	echo "vmon-init: cannot mount root=$root; staying in the initramfs" >/dev/ttyS1
fi

cmd64='' tty=0 winsize='' exitport=$((0x510))
for tok in $cmdline; do
	case $tok in
	vmon.cmd=*) cmd64=${tok#vmon.cmd=} ;;
	vmon.tty=*) tty=${tok#vmon.tty=} ;;
	vmon.winsize=*) winsize=${tok#vmon.winsize=} ;;
	# Test hook: plain QEMU has fw_cfg on 0x510, so tests put their
	# isa-debug-exit elsewhere.
	vmon.exitport=*)
		# In a subshell: a malformed number must not end this shell.
		# shellcheck disable=SC2116
		p=$(echo "$((${tok#vmon.exitport=}))" 2>/dev/null) && exitport=$p
		;;
	esac
done

# Terminal settings. vmon.tty=1: the host terminal is in raw mode and the
# guest line discipline does the work (echo, signals, \n -> \r\n); the window
# size from vmon.winsize=COLSxROWS is applied in the program's session (a tty's
# window size is lost when its last file is closed). Otherwise the host side is
# a pipe or a file: no output translation, no echo, and input control
# characters other than the canonical-mode ones (erase, kill, EOF) pass through.
winargs=''
if [ "$tty" = 1 ]; then
	cols=${winsize%%x*} rows=${winsize#*x}
	case $cols,$rows in
	*[!0-9,]* | ,* | *,) ;;
	*) winargs="cols $cols rows $rows" ;;
	esac
else
	stty -F /dev/ttyS0 -onlcr -echo -icrnl -ixon -isig -iexten 2>/dev/null
	stty -F /dev/ttyS1 -onlcr 2>/dev/null
fi

# Wait until every byte queued on a serial port has left the UART: busybox
# stty sets attributes with TCSETSW (tcsetattr TCSADRAIN), which waits for the
# output queue and the transmitter to drain; re-applying the current settings
# changes nothing else.
drain() {
	stty -F "$1" "$(stty -F "$1" -g)" 2>/dev/null
}

# Report the exit status (0-255) as one byte written to I/O port 0x510 (the
# vmon exit port); vmon ends the VM at once. If the write returns (no such
# port), power off.
finish() {
	if [ -e /run/vmon-poweroff ]; then
		sync
		poweroff -f
	fi
	drain /dev/ttyS0
	drain /dev/ttyS1
	# shellcheck disable=SC2059
	printf "\\$(printf %03o "$(($1 & 255))")" |
		dd of=/dev/port bs=1 seek="$exitport" count=1 conv=notrunc 2>/dev/null
	poweroff -f
	exit "$1"
}

# The program runs in a new session whose controlling terminal is ttyS0 (so
# ^C from a host terminal interrupts it). When a session leader exits, the
# kernel hangs up its controlling tty and discards output not yet sent, so the
# leader is this wrapper: it sets the window size, survives ^C, waits for the
# program, drains ttyS0 (ignoring SIGTTOU in case a job-control shell left
# another process group in the foreground) and exits with the program's status.
# Usage: sh -c "$lead" vmon "STTY-ARGS" PROGRAM ARGS...
# shellcheck disable=SC2016
lead='trap : INT QUIT
[ -z "$1" ] || stty $1 2>/dev/null
shift
"$@"
st=$?
trap "" TTOU
stty "$(stty -g)" 2>/dev/null
exit $st'

cd /
if [ -n "$cmd64" ]; then
	# Accept base64 with or without padding.
	case $((${#cmd64} % 4)) in
	2) cmd64="$cmd64==" ;;
	3) cmd64="$cmd64=" ;;
	esac
	if ! cmd=$(echo "$cmd64" | base64 -d 2>/dev/null); then
		echo "vmon-init: vmon.cmd is not valid base64" >/dev/ttyS1
		finish 127
	fi
	setsid -c sh -c "$lead" vmon "$winargs" sh -c "$cmd" \
		</dev/ttyS0 >/dev/ttyS0 2>/dev/ttyS1
	finish $?
fi

# No command. With a host terminal: an interactive shell with job control.
# Without one: a shell that reads commands from ttyS0 (no prompts, no line
# editing) until EOF (^D) or exit, stderr on ttyS1 as for a command.
if [ "$tty" = 1 ]; then
	setsid -c sh -c "$lead" vmon "$winargs" sh </dev/ttyS0 >/dev/ttyS0 2>&1
else
	setsid -c sh -c "$lead" vmon "" sh /dev/ttyS0 \
		</dev/ttyS0 >/dev/ttyS0 2>/dev/ttyS1
fi
finish $?
VMON_GUEST_INIT_EOF
}

# Default cache directory (no trailing slash).
kit_default_cache() {
	if [[ -n ${VMON_CACHE:-} ]]; then
		printf '%s\n' "$VMON_CACHE"
	elif [[ -n ${XDG_CACHE_HOME:-} ]]; then
		printf '%s\n' "$XDG_CACHE_HOME/vmon"
	elif [[ -n ${HOME:-} ]]; then
		printf '%s\n' "$HOME/.cache/vmon"
	else
		kit_die "HOME is not set: pass --cache DIR or set VMON_CACHE"
	fi
}

# kit_recipe TEXT...: a short hash naming how a kit is built.
kit_recipe() {
	printf '%s\n' "$@" | sha256sum | cut -c1-16
}

# kit_cached DIR RECIPE: prints DIR/current (resolved) if it is a complete kit
# built with RECIPE. No apt calls: this is the fast path.
kit_cached() {
	local stamp="$1/current/stamp" line
	[[ -f $stamp ]] || return 1
	IFS= read -r line <"$stamp" || return 1
	[[ $line == "recipe=$2" ]] || return 1
	(cd -P "$1/current" && pwd)
}

kit_find_modinfo() {
	local c
	for c in "$(command -v modinfo || true)" /usr/sbin/modinfo /sbin/modinfo; do
		if [[ -n $c && -x $c ]]; then
			KIT_MODINFO=$c
			return 0
		fi
	done
	kit_die "modinfo not found: install kmod"
}

# kit_need_tools [TOOL...]: the build tools, plus any named.
# shellcheck disable=SC2120
kit_need_tools() {
	local t
	for t in apt-get apt-cache dpkg-deb cpio gzip sha256sum "$@"; do
		command -v "$t" >/dev/null || kit_die "$t not found: install it (apt-get install $t)"
	done
	kit_find_modinfo
}

# Make sure apt knows linux-image-amd64; run apt-get update only as root.
kit_apt_ready() {
	if apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
		return 0
	fi
	if [[ $EUID -ne 0 ]]; then
		kit_die "apt package lists are missing: run 'sudo apt-get update' and retry"
	fi
	kit_log "apt package lists are missing: running apt-get update"
	apt-get -qq update >&2 || kit_die "apt-get update failed"
	apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1 ||
		kit_die "linux-image-amd64 is not in the configured apt sources"
}

# Prints the versioned kernel image package linux-image-amd64 depends on.
kit_kernel_package() {
	local pkg
	pkg=$(apt-cache show --no-all-versions linux-image-amd64 |
		sed -n 's/^Depends: //p' | tr ',|' '\n' |
		sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -n1)
	[[ -n $pkg ]] || kit_die "cannot tell which kernel package linux-image-amd64 depends on"
	printf '%s\n' "$pkg"
}

# kit_fetch DIR PKG...: apt-get download the packages into DIR and extract
# each into DIR/x (one tree). Sets nothing; debs stay in DIR.
kit_fetch() {
	local dir=$1
	shift
	local -a sandbox=()
	[[ $EUID -ne 0 ]] || sandbox=(-o APT::Sandbox::User=root)
	kit_log "downloading $*"
	(cd "$dir" && apt-get -qq "${sandbox[@]}" download "$@" </dev/null >&2) ||
		kit_die "apt-get download $* failed"
	mkdir -p "$dir/x"
	local deb
	for deb in "$dir"/*.deb; do
		dpkg-deb -x "$deb" "$dir/x" || kit_die "cannot extract $deb"
	done
}

# kit_deb_field DIR PKG FIELD: a control field of PKG's .deb in DIR.
kit_deb_field() {
	local deb
	for deb in "$1"/*.deb; do
		if [[ $(dpkg-deb -f "$deb" Package) == "$2" ]]; then
			dpkg-deb -f "$deb" "$3"
			return 0
		fi
	done
	kit_die "no .deb for $2"
}

# kit_stage_busybox TREE ROOT: busybox and its applet links into ROOT.
kit_stage_busybox() {
	local bb=$1/bin/busybox root=$2 path
	[[ -x $bb ]] || kit_die "busybox-static did not provide /bin/busybox"
	mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
	cp "$bb" "$root/bin/busybox"
	while IFS= read -r path; do
		[[ -n $path && $path != bin/busybox ]] || continue
		[[ -e $root/$path || -L $root/$path ]] && continue
		mkdir -p "$root/$(dirname "$path")"
		ln -s /bin/busybox "$root/$path"
	done < <("$bb" --list-full)
	[[ -L $root/bin/sh ]] || kit_die "busybox has no sh applet"
}

# kit_stage_modules TREE KVER ROOT NAME...: copies the named modules and all
# their dependencies from TREE/lib/modules/KVER into ROOT/lib/modules/KVER
# (decompressed), and writes ROOT/lib/modules/KVER/vmon.load: "name relpath"
# lines in load order (dependencies first). Built-in modules are skipped.
kit_stage_modules() {
	local tree=$1/lib/modules/$2 kver=$2 root=$3
	shift 3
	[[ -d $tree/kernel ]] || kit_die "no modules for $kver in the kernel package"
	local -A path=() builtin=() state=()
	local -a order=()
	local f rel base name
	while IFS= read -r -d '' f; do
		rel=${f#"$tree/"}
		base=${rel##*/}
		name=${base%%.ko*}
		path[${name//-/_}]=$rel
	done < <(find "$tree/kernel" -type f \( -name '*.ko' -o -name '*.ko.xz' \
		-o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
	if [[ -f $tree/modules.builtin ]]; then
		while IFS= read -r rel; do
			base=${rel##*/}
			name=${base%%.ko*}
			builtin[${name//-/_}]=1
		done <"$tree/modules.builtin"
	fi
	local out=$root/lib/modules/$kver
	mkdir -p "$out"

	# Depth-first, dependencies (and "pre:" soft dependencies that name a
	# module) before the module itself.
	_kit_visit() {
		local n=${1//-/_} src dst plain d soft
		[[ -z ${state[$n]:-} ]] || return 0
		if [[ -z ${path[$n]:-} ]]; then
			[[ -n ${builtin[$n]:-} ]] && return 0
			kit_die "module $n is neither in the kernel package nor built in"
		fi
		state[$n]=visiting
		src=$tree/${path[$n]}
		plain=${path[$n]%.ko*}.ko
		dst=$out/$plain
		mkdir -p "$(dirname "$dst")"
		case $src in
		*.ko.xz) xz -dc "$src" >"$dst" || kit_die "cannot decompress $src (need xz-utils)" ;;
		*.ko.zst) zstd -qdc "$src" >"$dst" || kit_die "cannot decompress $src (need zstd)" ;;
		*.ko.gz) gzip -dc "$src" >"$dst" || kit_die "cannot decompress $src" ;;
		*) cp "$src" "$dst" ;;
		esac
		for d in $("$KIT_MODINFO" -F depends "$dst" | tr ',' ' '); do
			_kit_visit "$d"
		done
		soft=$("$KIT_MODINFO" -F softdep "$dst" | sed -n 's/^.*pre: *\([^:]*\).*$/\1/p' | sed 's/ post$//')
		for d in $soft; do
			[[ -n ${path[${d//-/_}]:-} ]] && _kit_visit "$d"
		done
		state[$n]=finished
		order+=("$n $plain")
	}
	for name in "$@"; do
		_kit_visit "$name"
	done
	unset -f _kit_visit
	printf '%s\n' "${order[@]}" >"$out/vmon.load"
}

# kit_write_cpio ROOT OUT: ROOT as a gzip-compressed newc cpio owned by root,
# with fixed timestamps so that equal inputs give an identical archive.
kit_write_cpio() {
	find "$1" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} + ||
		kit_die "cannot set timestamps in $1"
	(cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$2" ||
		kit_die "cannot write $2"
}

# kit_install BUILD DEST PARENT: move the finished BUILD dir to DEST and
# point PARENT/current at it.
kit_install() {
	local build=$1 dest=$2 parent=$3 old=''
	if [[ -e $dest ]]; then
		old=$(mktemp -d "$parent/.old.XXXXXX")
		mv "$dest" "$old/"
	fi
	mv "$build" "$dest"
	ln -sfn "$(basename "$dest")" "$parent/.current.$$"
	mv -T "$parent/.current.$$" "$parent/current"
	[[ -z $old ]] || rm -rf "$old"
}

# kit_extract_vmlinux BZIMAGE OUT: writes the uncompressed ELF kernel inside
# BZIMAGE to OUT (the payload starts at the first xz, gzip or zstd magic; the
# decompressor ignores what follows it). Booting it skips the in-guest
# decompression: about 3 s of a 9 s boot in the lab. Returns 1 if no payload
# decompresses to an ELF file.
kit_extract_vmlinux() {
	local in=$1 out=$2 magic tool off
	for magic in 'xz:\xFD7zXZ\x00' 'gzip:\x1F\x8B\x08' 'zstd:\x28\xB5\x2F\xFD'; do
		tool=${magic%%:*}
		off=$(LC_ALL=C grep -obUaP "${magic#*:}" "$in" 2>/dev/null | head -n 1 | cut -d: -f1)
		[[ -n $off ]] || continue
		case $tool in
		xz) tail -c +$((off + 1)) "$in" | xz -dc --single-stream >"$out" 2>/dev/null ;;
		gzip) tail -c +$((off + 1)) "$in" | gzip -dc >"$out" 2>/dev/null ;;
		zstd) tail -c +$((off + 1)) "$in" | zstd -qdc >"$out" 2>/dev/null ;;
		esac
		[[ $(head -c 4 "$out" 2>/dev/null | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] && return 0
	done
	rm -f "$out"
	return 1
}

# kit_ensure PARENT RECIPE INIT_TEXT CPIO_NAME FORCE MODULE...: makes sure
# PARENT/current is a complete build made with RECIPE (building it from the
# kernel package linux-image-amd64 depends on if not, or if FORCE is 1) and
# prints its resolved directory. A build holds vmlinuz (and, with
# KIT_WANT_VMLINUX=1, the uncompressed vmlinux), CPIO_NAME (busybox, the
# modules and their dependencies, INIT_TEXT as /init), VERSIONS and stamp.
kit_ensure() {
	local parent=$1 recipe=$2 init_text=$3 cpio_name=$4 force=$5
	shift 5
	local found
	mkdir -p "$parent" || kit_die "cannot create $parent"
	if [[ $force -eq 0 ]] && found=$(kit_cached "$parent" "$recipe"); then
		printf '%s\n' "$found"
		return 0
	fi

	# Serialise builds; re-check once we hold the lock, and remove what
	# interrupted builds left behind.
	if command -v flock >/dev/null; then
		exec 9>"$parent/.lock"
		flock 9
		if [[ $force -eq 0 ]] && found=$(kit_cached "$parent" "$recipe"); then
			printf '%s\n' "$found"
			return 0
		fi
		rm -rf "$parent"/.build.* "$parent"/.old.*
	fi

	# shellcheck disable=SC2119
	kit_need_tools
	kit_apt_ready
	local kpkg kver build
	kpkg=$(kit_kernel_package)
	kver=${kpkg#linux-image-}
	kit_log "building for $kpkg in $parent/$kver"
	umask 022
	build=$(mktemp -d "$parent/.build.XXXXXX")
	# shellcheck disable=SC2064
	trap "rm -rf '$build'" EXIT
	mkdir -p "$build/dl" "$build/root" "$build/out"

	kit_fetch "$build/dl" "$kpkg" busybox-static
	local x=$build/dl/x root=$build/root out=$build/out nmods
	[[ -f $x/boot/vmlinuz-$kver ]] || kit_die "$kpkg has no /boot/vmlinuz-$kver"
	cp "$x/boot/vmlinuz-$kver" "$out/vmlinuz"
	if [[ ${KIT_WANT_VMLINUX:-0} == 1 ]]; then
		kit_extract_vmlinux "$out/vmlinuz" "$out/vmlinux" ||
			kit_log "no uncompressed kernel found in vmlinuz; vmon will boot the bzImage"
	fi

	kit_stage_busybox "$x" "$root"
	kit_stage_modules "$x" "$kver" "$root" "$@"
	nmods=$(wc -l <"$root/lib/modules/$kver/vmon.load")
	mkdir -p "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/run" \
		"$root/root" "$root/etc"
	printf '%s\n' "$init_text" >"$root/init"
	chmod 755 "$root/init"
	kit_write_cpio "$root" "$out/$cpio_name"

	{
		printf 'kernel-package: %s %s\n' "$kpkg" "$(kit_deb_field "$build/dl" "$kpkg" Version)"
		printf 'kernel-release: %s\n' "$kver"
		printf 'busybox-static: %s\n' "$(kit_deb_field "$build/dl" busybox-static Version)"
		printf 'modules: %s\n' "$(cut -d' ' -f1 "$root/lib/modules/$kver/vmon.load" | tr '\n' ' ' | sed 's/ $//')"
		printf 'recipe: %s\n' "$recipe"
		printf 'built: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	} >"$out/VERSIONS"
	# Written last: its presence marks a complete build.
	printf 'recipe=%s\n' "$recipe" >"$out/stamp"

	kit_install "$out" "$parent/$kver" "$parent"
	rm -rf "$build"
	trap - EXIT
	kit_log "ready: $cpio_name $(du -h "$parent/$kver/$cpio_name" | cut -f1), $nmods modules"
	printf '%s\n' "$parent/$kver"
}

kit_main() {
	local cache='' force=0 init_file=''
	while [[ $# -gt 0 ]]; do
		case $1 in
		--cache)
			[[ $# -ge 2 ]] || kit_die "--cache needs a directory"
			cache=$2
			shift 2
			;;
		--cache=*)
			cache=${1#--cache=}
			shift
			;;
		--force)
			force=1
			shift
			;;
		--init)
			[[ $# -ge 2 ]] || kit_die "--init needs a file"
			init_file=$2
			shift 2
			;;
		--print-init)
			kit_builtin_init
			return 0
			;;
		-h | --help)
			kit_usage
			return 0
			;;
		*) kit_die "unknown argument '$1' (see --help)" ;;
		esac
	done
	[[ -n $cache ]] || cache=$(kit_default_cache)
	mkdir -p "$cache" || kit_die "cannot create $cache"
	cache=$(cd -P "$cache" && pwd)

	local init_text recipe
	if [[ -n $init_file ]]; then
		[[ -r $init_file ]] || kit_die "cannot read $init_file"
		init_text=$(cat "$init_file")
	else
		init_text=$(kit_builtin_init)
	fi
	recipe=$(kit_recipe "format=$KIT_FORMAT" "${KIT_GUEST_MODULES[*]}" "$init_text")
	KIT_WANT_VMLINUX=1 kit_ensure "$cache/kit" "$recipe" "$init_text" initramfs.cpio.gz \
		"$force" "${KIT_GUEST_MODULES[@]}"
}

# Run unless sourced (scripts/lab.sh sources this file for its helpers).
if ! (return 0 2>/dev/null); then
	kit_main "$@" </dev/null
fi
