# single: one realistic multi-process workload (python + forked worker); memtrace.rounds=R runs
# it R times in a row, each a new process (a longer trace of the same kind: replay benchmarks)
. /scenarios/lib.sh
R=$(param memtrace.rounds 1)
mt start
mt "phase work"
rc=0
i=1
while [ $i -le $R ]; do
	python3 /scenarios/work.py 0 || rc=1
	i=$((i + 1))
done
mt stop
exit $rc
