# idle: start and stop markers only (boot check)
. /scenarios/lib.sh
mt start
mt stop
