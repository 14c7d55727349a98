# selftest: everything the e2e tests compare against the agent's events
. /scenarios/lib.sh
N=${1:-2}
mkdir -p /tmp/st
rm -f /tmp/st/*
python3 /scenarios/sleeper.py /tmp/st/ready /tmp/st/quit &
SLEEPER=$!
while [ ! -e /tmp/st/ready ]; do sleep 0.1; done
echo "MEMTRACE-SELFTEST sleeper=$SLEEPER init=1"
for p in 1 $SLEEPER; do
	echo "MT-MAPS-BEGIN $p"
	cat /proc/$p/maps
	echo "MT-MAPS-END $p"
done
echo "MT-PS-BEGIN"
for d in /proc/[0-9]*; do
	p=${d#/proc/}
	[ -r $d/status ] || continue
	echo "$p $(awk '/^Tgid:/{t=$2} /^PPid:/{pp=$2} END{print t, pp}' $d/status) $(cat $d/comm 2>/dev/null)"
done
echo "MT-PS-END"
echo "MT-FILES-BEGIN"
find / -xdev -type f -exec stat -c '%d %i %s %n' {} + 2>/dev/null
echo "MT-FILES-END"
mt start
mt "phase storm"
python3 /scenarios/storm.py $((N * 20)) $((N * 150))
rc=$?
python3 /scenarios/perm.py "$(sed -n 's/.*memtrace.mark_gid=\([0-9]*\).*/\1/p' /proc/cmdline)"
mt "counter selftest.value 12345"
mt stop
touch /tmp/st/quit
wait $SLEEPER
echo "MEMTRACE-STATUS-BEGIN"; cat /proc/memtrace; echo "MEMTRACE-STATUS-END"
rmmod memtrace_agent
echo "MEMTRACE-RMMOD rc=$?"
[ -e /proc/memtrace ] && echo "MEMTRACE-PROC-STILL-THERE"
dmesg | grep -i memtrace
exit $rc
