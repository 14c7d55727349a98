# shared helpers for scenarios (sourced)
mt() {
	# marker to the agent; harmless when the agent is not loaded
	[ -w /proc/memtrace ] && echo "$*" > /proc/memtrace
	echo "MEMTRACE-MARK $*"
}
param() {
	# value of NAME=VALUE on the kernel command line, or the default $2
	for x in $(cat /proc/cmdline); do
		case "$x" in "$1="*) echo "${x#*=}"; return;; esac
	done
	echo "$2"
}
ksm_counters() {
	# shell builtins only (read, echo): sampling forks nothing
	for c in pages_shared pages_sharing pages_unshared pages_volatile full_scans; do
		[ -r /sys/kernel/mm/ksm/$c ] && read v < /sys/kernel/mm/ksm/$c &&
			mt "counter ksm.$c $v"
	done
}
ksm_knobs() {
	for c in pages_to_scan sleep_millisecs max_page_sharing use_zero_pages; do
		[ -r /sys/kernel/mm/ksm/$c ] && read v < /sys/kernel/mm/ksm/$c &&
			mt "counter ksm.$c $v"
	done
}
