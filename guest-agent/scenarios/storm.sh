# storm: fork/exec/exit + mmap storm between start and stop (drop accounting test), one storm
# process per CPU, each pinned to its CPU, all at once (events from every CPU at the same time)
. /scenarios/lib.sh
N=${1:-2}
CPUS=$(grep -c ^processor /proc/cpuinfo)
mt start
mt "phase storm"
i=0
while [ $i -lt "$CPUS" ]; do
	python3 /scenarios/storm.py $((N * 20)) $((N * 200)) $i &
	i=$((i + 1))
done
rc=0
for j in $(jobs -p); do wait $j || rc=1; done
mt stop
echo "MEMTRACE-STATUS-BEGIN"; cat /proc/memtrace; echo "MEMTRACE-STATUS-END"
exit $rc
