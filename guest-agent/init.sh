#!/bin/sh
# memtrace guest /init (busybox sh). Reads its settings from the kernel command line:
#   memtrace.scenario=NAME memtrace.n=N memtrace.mailbox_phys=ADDR memtrace.mailbox_size=SIZE
#   memtrace.agent=0 (do not load the agent)  memtrace.dump_wait_ms=MS
#   memtrace.clock_ms=MS (the guest's clock into the trace every MS ms; default 100, 0: off)
#   memtrace.mark_gid=GID (members of group GID may mark phases and counters through
#     /proc/memtrace-mark; /proc/memtrace itself is written by root only)
#   memtrace.shell=1
# When mailbox_phys/size are absent they are taken from memmap=SIZE$PHYS.
export PATH=/bin:/usr/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm && mount -t tmpfs -o size=64m tmpfs /dev/shm
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

SCEN=$(param memtrace.scenario none)
N=$(param memtrace.n 2)
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
# the guest's own clock in every trace: analyses weigh time by guest seconds, not instructions
CLOCK=$(param memtrace.clock_ms 100)
MARKGID=$(param memtrace.mark_gid "")

echo "MEMTRACE-INIT kernel=$(uname -r) scenario=$SCEN n=$N mailbox_phys=$PHYS mailbox_size=$SIZE"
if [ "$(param memtrace.agent 1)" = 1 ]; then
	insmod /lib/modules/memtrace_agent.ko mailbox_phys=$PHYS mailbox_size=$SIZE \
		${WAIT:+dump_wait_ms=$WAIT} ${CLOCK:+clock_ms=$CLOCK} ${MARKGID:+mark_gid=$MARKGID}
	echo "MEMTRACE-AGENT-LOADED rc=$?"
fi
export PYTHONHASHSEED=0 HOME=/root
cd /root
if [ -f "/scenarios/$SCEN.sh" ]; then
	echo "MEMTRACE-SCENARIO-BEGIN name=$SCEN n=$N"
	sh "/scenarios/$SCEN.sh" "$N"
	rc=$?
else
	echo "MEMTRACE-SCENARIO-UNKNOWN name=$SCEN"
	rc=127
fi
echo "MEMTRACE-SCENARIO-DONE rc=$rc"
if [ "$(param memtrace.shell 0)" = 1 ]; then
	setsid cttyhack sh
fi
sync
echo "MEMTRACE-POWEROFF"
poweroff -f
