# interleave: two threads pinned to two CPUs take turns storing known values into one word,
# each store followed by a counter event (the test of --smp: are both in order in the trace?)
. /scenarios/lib.sh
N=${1:-2}
mt start
python3 /scenarios/interleave.py $((N * 100))
rc=$?
mt stop
exit $rc
