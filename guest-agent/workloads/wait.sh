# Sourced by the workload scripts (copied with them into the guest's /usr/share/memtrace).
# wait_until LOG MESSAGE COMMAND...: run COMMAND once a second until it succeeds; after $WAIT
# seconds show the tail of LOG and fail with MESSAGE (the caller's fail).
wait_until() {
	wait_log=$1 wait_message=$2
	shift 2
	t=0
	until "$@"; do
		sleep 1
		t=$((t + 1))
		if [ "$t" -ge "$WAIT" ]; then
			tail -20 "$wait_log" >&2
			fail "$wait_message"
		fi
	done
}
