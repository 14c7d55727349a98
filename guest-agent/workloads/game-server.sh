#!/bin/sh
# The thesis's game-server scenario (seed chapter 5.1, Figure 5.2) on real software, in the locked
# Debian root "game-server" (guest-agent/roots.py): N dedicated OpenArena servers (ioquake3's
# ioq3ded, the Quake 3 engine), each from its own copy of the game tree (engine and .pk3 data:
# same bytes, different files, as the thesis's CS:GO servers each had their own installation),
# each loading the same map, whose data the engine decompresses from the .pk3 into its heap.
# Run by trace-record --scenario game-server -n N (tracer/workload.py, --marks workload): the
# copies are made before memtrace-mark start; then the phases load (servers start, one after the
# other, each until its map is loaded) and settle; then memtrace-mark stop. Environment: N, MAP
# (default oasago2), SETTLE (guest seconds after the last map is up, default 10), WAIT (seconds
# to wait for a server, default 900). Exit status 0, or 1 with a message.
set -u
N=${N:-1}
MAP=${MAP:-oasago2}
SETTLE=${SETTLE:-10}
WAIT=${WAIT:-900}
log() { echo "game-server: $*"; }
fail() { echo "game-server: error: $*" >&2; exit 1; }
. /usr/share/memtrace/wait.sh
# server $1 has loaded the map: the engine has set up the map's server and its config strings
map_loaded() {
	grep -q "Hunk_Clear: reset the hunk ok\|------- Server Initialization -------" \
		"/tmp/server$1.log" 2>/dev/null &&
		grep -q "Server: $MAP\|AAS initialized\|map: $MAP" "/tmp/server$1.log" 2>/dev/null
}

# ---- set-up (not traced): a game tree per server ---------------------------------------------
for i in $(seq 1 "$N"); do
	g=/srv/game$i
	log "copying the game tree for server $i into $g"
	rm -rf "$g" "/srv/home$i"
	mkdir -p "$g" "/srv/home$i"
	# the engine and the game data, links followed: every server has its own files
	cp -L /usr/lib/ioquake3/ioq3ded "$g/"
	cp -aL /usr/lib/openarena-server/baseoa /usr/lib/openarena-server/missionpack "$g/"
done
sync
echo 3 > /proc/sys/vm/drop_caches  # the copies leave the page cache as it was before them

# ---- traced ----------------------------------------------------------------------------------
memtrace-mark start
memtrace-mark phase load
for i in $(seq 1 "$N"); do
	g=/srv/game$i
	( cd "$g" && exec ./ioq3ded +set com_basegame baseoa +set fs_basepath "$g" \
		+set fs_homepath "/srv/home$i" +set com_legacyprotocol 71 +set com_protocol 71 \
		+set dedicated 1 +set net_port $((27960 + i)) +set ttycon 0 +set sv_pure 0 \
		+set sv_maxclients 8 +set bot_enable 0 +map "$MAP" ) </dev/null \
		>"/tmp/server$i.log" 2>&1 &
	wait_until "/tmp/server$i.log" "server $i did not load $MAP in $WAIT s" map_loaded "$i"
	log "server $i: $MAP loaded"
done
memtrace-mark phase settle
sleep "$SETTLE"
memtrace-mark counter game.servers "$N"
log "done: $N server(s)"
memtrace-mark stop
