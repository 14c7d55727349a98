# ksm: N processes with identical MADV_MERGEABLE anonymous buffers; KSM counters as COUNTER events
# Settings from the kernel command line (trace-record --append):
#   memtrace.ksm_pages_to_scan=P memtrace.ksm_sleep_ms=MS  the guest's KSM (default 100, 50)
#   memtrace.ksm_seconds=S   length of phase merge (default 4)
#   memtrace.ksm_sample=S    counter sampling interval in seconds (default 0.1)
#   memtrace.ksm_clock_ms=MS guest clock counter interval (default 10; 0: none)
. /scenarios/lib.sh
N=${1:-2}
K=/sys/kernel/mm/ksm
P=$(param memtrace.ksm_pages_to_scan 100)
SLEEP=$(param memtrace.ksm_sleep_ms 50)
SECS=$(param memtrace.ksm_seconds 4)
SAMPLE=$(param memtrace.ksm_sample 0.1)
CLOCK=$(param memtrace.ksm_clock_ms 10)
echo 0 > $K/run
echo "$P" > $K/pages_to_scan
echo "$SLEEP" > $K/sleep_millisecs
mkdir -p /tmp/ksm
# ksmd's CPU time (schedstat, ns) goes with the counters: what its scanning costs in guest time
KSMD=
for d in /proc/[0-9]*; do
	read c < $d/comm 2>/dev/null && [ "$c" = ksmd ] && KSMD=${d#/proc/}
done
ksmd_time() {
	# schedstat: time on the CPU (ns), time runnable but waiting (ns), times scheduled in
	[ -n "$KSMD" ] && read a b c < /proc/$KSMD/schedstat && mt "counter ksm.ksmd_runtime_ns $a" &&
		mt "counter ksm.ksmd_delay_ns $b" && mt "counter ksm.ksmd_slices $c"
}
rm -f /tmp/ksm/*
mt start
[ "$CLOCK" -gt 0 ] && mt "clock $CLOCK"
ksm_knobs
ksm_counters
mt "phase fill"
i=1
while [ $i -le $N ]; do
	python3 /scenarios/ksm.py 2 /tmp/ksm/ready.$i /tmp/ksm/quit &
	i=$((i + 1))
done
while [ "$(ls /tmp/ksm | grep -c ready)" -lt "$N" ]; do sleep 0.2; done
mt "phase merge"
echo 1 > $K/run
# sample for SECS seconds of guest time (uptime in centiseconds, read with builtins)
read up _ < /proc/uptime
end=$(( ${up%.*} * 100 + 1${up#*.} - 100 + SECS * 100 ))
while :; do
	ksm_counters
	ksmd_time
	read up _ < /proc/uptime
	[ $(( ${up%.*} * 100 + 1${up#*.} - 100 )) -ge "$end" ] && break
	sleep "$SAMPLE"
done
read v < $K/pages_sharing
read w < $K/pages_shared
echo "ksm: pages_sharing=$v pages_shared=$w"
mt "phase exit"
touch /tmp/ksm/quit
rc=0
for j in $(jobs -p); do wait $j || rc=1; done
echo 0 > $K/run
ksm_counters
[ "$CLOCK" -gt 0 ] && mt "clock 0"
mt stop
exit $rc
