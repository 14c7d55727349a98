#!/bin/busybox sh
# memtrace guest /init for a root file system on a disk (busybox sh, in the initdisk.cpio that
# guest-agent/initdisk.py builds). The user's root needs nothing installed for it:
#   1. loads the virtio disk drivers and the agent from this initramfs (Debian's kernel builds
#      them as modules),
#   2. finds the root on the first disk (/dev/vda or one of its partitions: ext2/3/4, XFS or
#      Btrfs, with etc/ and bin/ or usr/bin/), mounts it read-write (the disk is a throwaway
#      copy or overlay made by trace-record: the original is never written),
#   3. mounts the job disk (/dev/vdb: job.sh, the command, files for --copy), copies the files
#      into the root and makes this initramfs's /memtrace visible as /run/memtrace in the root
#      (busybox, bin/memtrace-mark, the job),
#   4. runs /run/memtrace/job.sh chrooted into the root, its output on the second serial port
#      (ttyS1), then reports the exit status and powers off.
# Console markers (ttyS0): MEMTRACE-INIT, MEMTRACE-AGENT-LOADED rc=N, MEMTRACE-ROOT dev=.. fs=..,
# MEMTRACE-ROOT-ERROR <why>, MEMTRACE-WORKLOAD-BEGIN, MEMTRACE-WORKLOAD-DONE rc=N,
# MEMTRACE-POWEROFF. Kernel command line: as init.sh (memtrace.mailbox_phys, mailbox_size,
# agent, dump_wait_ms, clock_ms).
export PATH=/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
hostname memtrace-guest

param() {
	for x in $(cat /proc/cmdline); do
		case "$x" in "$1="*) echo "${x#*=}"; return;; esac
	done
	echo "$2"
}
tobytes() {
	v=$1
	case "$v" in
	*[kK]) echo $(( ${v%?} * 1024 ));;
	*[mM]) echo $(( ${v%?} * 1048576 ));;
	*[gG]) echo $(( ${v%?} * 1073741824 ));;
	*) echo $(( v ));;
	esac
}
finish() {
	sync
	echo "MEMTRACE-POWEROFF"
	poweroff -f
}
root_error() {
	echo "MEMTRACE-ROOT-ERROR $*"
	finish
}
# modules of a group (lib/modules/load/GROUP: paths in load order, made by initdisk.py)
load() {
	[ -e "/lib/modules/loaded.$1" ] && return 0
	for m in $(cat "/lib/modules/load/$1"); do
		grep -q "^$(basename "$m" .ko | tr - _) " /proc/modules && continue
		insmod "/lib/modules/$m" || return 1
	done
	: > "/lib/modules/loaded.$1"
}
# file system on a block device, from its superblock magic (busybox has no blkid)
fstype() {
	if [ "$(dd if="$1" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 53ef ]
	then
		echo ext4
	elif [ "$(dd if="$1" bs=4 count=1 2>/dev/null)" = XFSB ]; then
		echo xfs
	elif [ "$(dd if="$1" bs=1 skip=65600 count=8 2>/dev/null)" = _BHRfS_M ]; then
		echo btrfs
	fi
}

MEMMAP=$(param memmap "")
PHYS=$(param memtrace.mailbox_phys "")
SIZE=$(param memtrace.mailbox_size "")
case "$MEMMAP" in *'$'*)
	[ -n "$PHYS" ] || PHYS=${MEMMAP#*\$}
	[ -n "$SIZE" ] || SIZE=${MEMMAP%%\$*};;
esac
[ -n "$PHYS" ] || PHYS=0x1f000000
[ -n "$SIZE" ] || SIZE=1M
PHYS=$(tobytes "$PHYS")
SIZE=$(tobytes "$SIZE")
WAIT=$(param memtrace.dump_wait_ms "")
CLOCK=$(param memtrace.clock_ms 100)

echo "MEMTRACE-INIT kernel=$(uname -r) root=disk mailbox_phys=$PHYS mailbox_size=$SIZE"
if [ "$(param memtrace.agent 1)" = 1 ]; then
	insmod /lib/modules/memtrace_agent.ko mailbox_phys=$PHYS mailbox_size=$SIZE \
		${WAIT:+dump_wait_ms=$WAIT} ${CLOCK:+clock_ms=$CLOCK}
	echo "MEMTRACE-AGENT-LOADED rc=$?"
fi

load virtio || root_error "cannot load the virtio disk drivers"
n=0
while [ ! -b /dev/vdb ] && [ $n -lt 100 ]; do
	usleep 100000
	n=$((n + 1))
done
[ -b /dev/vda ] && [ -b /dev/vdb ] || root_error "the guest sees no root and job disks"

R=/newroot
mkdir -p $R /job
found=
for dev in /dev/vda /dev/vda[0-9]*; do
	[ -b "$dev" ] || continue
	fs=$(fstype "$dev")
	[ -n "$fs" ] || continue
	load "$fs" || root_error "cannot load the $fs module"
	mount -t "$fs" -o rw "$dev" $R 2>/dev/null || continue
	if [ -d $R/etc ] && { [ -d $R/bin ] || [ -d $R/usr/bin ]; }; then
		found=$dev
		break
	fi
	umount $R
done
[ -n "$found" ] || root_error "no Linux root on the disk: /dev/vda and its partitions hold no" \
	"ext2/3/4, XFS or Btrfs file system with etc/ and bin/ or usr/bin/"
echo "MEMTRACE-ROOT dev=$found fs=$fs"

load ext4 || root_error "cannot load the ext4 module for the job disk"
mount -t ext4 -o ro /dev/vdb /job || root_error "cannot mount the job disk"
# what the job brings: --copy files (owner, mode as given), job.sh and the command
if [ -d /job/files ]; then
	cp -a /job/files/. $R/ || root_error "cannot copy the --copy files into the root"
fi
cp -a /job/memtrace/. /memtrace/
umount /job

# the usual kernel file systems, and /run (a tmpfs, as on any booted system) with /run/memtrace
for d in proc sys dev run tmp; do
	[ -d $R/$d ] || mkdir -p $R/$d
done
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=755 tmpfs $R/run
mkdir -p $R/run/memtrace
mount --bind /memtrace $R/run/memtrace
chmod 1777 $R/tmp

echo "MEMTRACE-WORKLOAD-BEGIN"
chroot $R /run/memtrace/busybox sh /run/memtrace/job.sh </dev/null >/dev/ttyS1 2>&1
rc=$?
echo "MEMTRACE-WORKLOAD-DONE rc=$rc"
# everything the workload left running goes, then the root is unmounted cleanly
kill -9 -1 2>/dev/null
umount $R/run/memtrace $R/run $R/dev/shm $R/dev/pts $R/dev $R/sys $R/proc 2>/dev/null
umount $R 2>/dev/null
finish
