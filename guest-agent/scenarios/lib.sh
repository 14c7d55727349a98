# shared helpers for scenarios (sourced)
mt() {
	# marker to the agent; harmless when the agent is not loaded
	[ -w /proc/memtrace ] && echo "$*" > /proc/memtrace
	echo "MEMTRACE-MARK $*"
}
ksm_counters() {
	for c in pages_shared pages_sharing pages_unshared pages_volatile full_scans; do
		[ -r /sys/kernel/mm/ksm/$c ] && mt "counter ksm.$c $(cat /sys/kernel/mm/ksm/$c)"
	done
}
