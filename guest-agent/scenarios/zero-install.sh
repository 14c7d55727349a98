# zero-install: N instances, each from its own copy of python (binary, libraries, stdlib):
# same bytes, different files. Copies are made before the start marker.
. /scenarios/lib.sh
N=${1:-2}
i=1
while [ $i -le $N ]; do
	d=/zi/$i
	mkdir -p $d/bin $d/lib
	cp /usr/bin/python3.11 $d/bin/python3.11
	cp -a /usr/lib/x86_64-linux-gnu $d/lib/x86_64-linux-gnu
	cp -a /usr/lib/python3.11 $d/lib/python3.11
	i=$((i + 1))
done
echo "zero-install: $N copies ready"
mt start
mt "phase work"
i=1
while [ $i -le $N ]; do
	d=/zi/$i
	PYTHONHOME=$d $d/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path $d/lib/x86_64-linux-gnu \
		$d/bin/python3.11 /scenarios/work.py $i &
	i=$((i + 1))
done
rc=0
for j in $(jobs -p); do wait $j || rc=1; done
mt stop
exit $rc
