# storm: fork/exec/exit + mmap storm between start and stop (drop accounting test)
. /scenarios/lib.sh
N=${1:-2}
mt start
mt "phase storm"
python3 /scenarios/storm.py $((N * 20)) $((N * 200))
rc=$?
mt stop
echo "MEMTRACE-STATUS-BEGIN"; cat /proc/memtrace; echo "MEMTRACE-STATUS-END"
exit $rc
