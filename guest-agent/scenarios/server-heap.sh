# server-heap: N processes read the same data file into anonymous memory and stay alive
. /scenarios/lib.sh
N=${1:-2}
mkdir -p /data /tmp/heap
rm -f /tmp/heap/*
python3 -c "import random; open('/data/blob', 'wb').write(random.Random(42).randbytes(4 << 20))"
mt start
mt "phase load"
i=1
while [ $i -le $N ]; do
	python3 /scenarios/heap.py /data/blob /tmp/heap/ready.$i /tmp/heap/quit &
	i=$((i + 1))
done
while [ "$(ls /tmp/heap | grep -c ready)" -lt "$N" ]; do sleep 0.2; done
mt "phase steady"
sleep 3
mt "phase exit"
touch /tmp/heap/quit
rc=0
for j in $(jobs -p); do wait $j || rc=1; done
mt stop
exit $rc
