#!/bin/sh
# The thesis's desktop scenario (seed chapter 5.1) on real software, in the locked Debian root
# "desktop" (guest-agent/roots.py): N users, each with a framebuffer X server (Xvfb :i), an Xfce
# session, Firefox ESR showing a local page and LibreOffice Writer with a document.
#   LAYOUT=terminal-server  every user runs the root's installed applications and libraries
#   LAYOUT=zero-install     every user runs from an own copy of them (same bytes, different
#                           files: the thesis's Figure 5.1c), chrooted into /zi/uI
# Run by trace-record --scenario desktop -n N --layout L (tracer/workload.py, --marks workload):
# the set-up (users, homes, copies) happens before memtrace-mark start; then the phases
# x, session, firefox, writer, settle; then memtrace-mark stop. Environment: N, LAYOUT, SETTLE
# (guest seconds after the last application is up, default 20), WAIT (seconds to wait for a
# window, default 900). Exit status 0, or 1 with a message when an application did not come up.
set -u
N=${N:-1}
LAYOUT=${LAYOUT:-terminal-server}
SETTLE=${SETTLE:-20}
WAIT=${WAIT:-900}
ASSETS=/usr/share/memtrace
# UTF-8 everywhere: window titles ("memtrace page — Mozilla Firefox") are read back as text
export LANG=C.UTF-8
log() { echo "desktop: $*"; }
fail() { echo "desktop: error: $*" >&2; exit 1; }
. $ASSETS/wait.sh

# ---- set-up (not traced) ---------------------------------------------------------------------
[ "$LAYOUT" = terminal-server ] || [ "$LAYOUT" = zero-install ] ||
	fail "LAYOUT=$LAYOUT: terminal-server or zero-install"
# the same machine-id on every run (dbus reads it)
echo 6d656d747261636564657368746f7031 > /etc/machine-id
mkdir -p /var/lib/dbus && cp /etc/machine-id /var/lib/dbus/machine-id
for i in $(seq 1 "$N"); do
	id "u$i" >/dev/null 2>&1 || useradd -m -u $((1000 + i)) -s /bin/sh "u$i"
	install -o "u$i" -m 644 $ASSETS/page.html $ASSETS/doc.fodt "/home/u$i/"
done
root_of() { if [ "$LAYOUT" = zero-install ]; then echo "/zi/u$1"; else echo /; fi; }
if [ "$LAYOUT" = zero-install ]; then
	# each user's own copy of everything the applications load: /usr (programs, libraries,
	# data; /bin and /lib are links into it), /etc, /var; plus the user's home
	for i in $(seq 1 "$N"); do
		r=/zi/u$i
		log "copying the applications and libraries for u$i into $r"
		mkdir -p "$r"
		cp -a /usr /etc /var "$r/"
		for l in bin sbin lib lib64; do [ -L /$l ] && cp -a /$l "$r/"; done
		mkdir -p "$r/home" "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/run"
		cp -a "/home/u$i" "$r/home/"
		chmod 1777 "$r/tmp"
		mount --bind /proc "$r/proc"
		mount --bind /sys "$r/sys"
		mount --rbind /dev "$r/dev"
		mount -t tmpfs -o mode=755 tmpfs "$r/run"
		mkdir -p "$r/run/memtrace" && mount --bind /run/memtrace "$r/run/memtrace"
	done
fi
# the X servers' socket folder, made once here: X servers started at once race to create it,
# and the losers (EEXIST) run without a socket
for i in $(seq 1 "$N"); do
	install -d -m 1777 "$(root_of "$i")/tmp/.X11-unix"
done
sync
echo 3 > /proc/sys/vm/drop_caches  # the copies leave the page cache as it was before them

# run a command as user i in the user's root, in the background
as_user() {
	i=$1
	shift
	chroot "$(root_of "$i")" su -s /bin/sh "u$i" -c "cd /home/u$i && $*" </dev/null \
		>>"/tmp/desktop-u$i.log" 2>&1 &
}
# whether a window whose name contains $2 exists on display :$1
has_window() {
	DISPLAY=:$1 chroot "$(root_of "$1")" xwininfo -root -tree 2>/dev/null | grep -q "$2"
}
wait_window() {
	wait_until "/tmp/desktop-u$1.log" "no window '$2' on :$1 after $WAIT s" has_window "$1" "$2"
}

# ---- traced ----------------------------------------------------------------------------------
memtrace-mark start
memtrace-mark phase x
for i in $(seq 1 "$N"); do
	chroot "$(root_of "$i")" Xvfb ":$i" -screen 0 1024x768x24 -nolisten tcp \
		</dev/null >>"/tmp/desktop-x$i.log" 2>&1 &
done
for i in $(seq 1 "$N"); do
	wait_until "/tmp/desktop-x$i.log" "X server :$i did not start" \
		test -e "$(root_of "$i")/tmp/.X11-unix/X$i"
done
memtrace-mark phase session
for i in $(seq 1 "$N"); do
	as_user "$i" "DISPLAY=:$i dbus-launch --exit-with-session xfce4-session"
done
for i in $(seq 1 "$N"); do
	wait_window "$i" xfce4-panel
done
log "sessions up"
memtrace-mark phase firefox
for i in $(seq 1 "$N"); do
	as_user "$i" "mkdir -p firefox-profile && DISPLAY=:$i MOZ_CRASHREPORTER_DISABLE=1" \
		"firefox-esr --new-instance --profile /home/u$i/firefox-profile" \
		"file:///home/u$i/page.html"
done
for i in $(seq 1 "$N"); do
	wait_window "$i" "memtrace page"
done
log "firefox up"
memtrace-mark phase writer
for i in $(seq 1 "$N"); do
	as_user "$i" "DISPLAY=:$i soffice --writer --norestore --nologo /home/u$i/doc.fodt"
done
for i in $(seq 1 "$N"); do
	wait_window "$i" "doc.fodt"
done
log "writer up"
memtrace-mark phase settle
sleep "$SETTLE"
memtrace-mark counter desktop.users "$N"
log "done: $N user(s), $LAYOUT"
memtrace-mark stop
