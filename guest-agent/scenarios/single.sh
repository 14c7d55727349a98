# single: one realistic multi-process workload (python + forked worker)
. /scenarios/lib.sh
mt start
mt "phase work"
python3 /scenarios/work.py 0
rc=$?
mt stop
exit $rc
