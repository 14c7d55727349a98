# terminal-server: N concurrent instances of the same workload from the same installed files
. /scenarios/lib.sh
N=${1:-2}
mt start
mt "phase work"
i=1
while [ $i -le $N ]; do
	python3 /scenarios/work.py $i &
	i=$((i + 1))
done
rc=0
for j in $(jobs -p); do wait $j || rc=1; done
wait || rc=1
mt stop
exit $rc
