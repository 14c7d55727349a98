# ksm: N processes with identical MADV_MERGEABLE anonymous buffers; KSM counters as COUNTER events
. /scenarios/lib.sh
N=${1:-2}
K=/sys/kernel/mm/ksm
echo 0 > $K/run
echo 4000 > $K/pages_to_scan
echo 20 > $K/sleep_millisecs
mkdir -p /tmp/ksm
rm -f /tmp/ksm/*
mt start
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
t=0
while [ $t -lt 10 ]; do
	sleep 1
	ksm_counters
	t=$((t + 1))
done
echo "ksm: pages_sharing=$(cat $K/pages_sharing) pages_shared=$(cat $K/pages_shared)"
mt "phase exit"
touch /tmp/ksm/quit
rc=0
for j in $(jobs -p); do wait $j || rc=1; done
echo 0 > $K/run
ksm_counters
mt stop
exit $rc
