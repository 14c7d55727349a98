#!/bin/sh
# Build the memtrace QEMU plugin: CACHE/tracer/libmemtrace.so, CACHE being the user cache
# ($MEMTRACE_CACHE, else $XDG_CACHE_HOME/memtrace, else ~/.cache/memtrace: memtrace/tracer/cache.py).
#
# QEMU's plugin header (include/qemu/qemu-plugin.h) is in no Debian binary package, so it is
# taken from the Debian source package of the QEMU that is installed: a private apt
# configuration under CACHE/apt/ with deb-src entries for the running suite downloads the
# source (apt-get source --download-only), only the header is extracted and cached under
# CACHE/qemu-header/<source version>/, and the download is deleted. Nothing under /etc is
# changed and no root is needed once the header is cached. Never commit the header.
#
# Usage: tracer/build.sh [options]
#   --qemu-version VER  Debian source version of qemu to build against ("latest": the newest in
#                       --suite; default: the version
#                       of the installed qemu-system-x86_64, e.g. 1:7.2+dfsg-7+deb12u18)
#   --suite SUITE       Debian suite whose deb-src entries to use (default: this system's,
#                       VERSION_CODENAME of /etc/os-release), e.g. trixie for QEMU 10.0
#   --header FILE       use this qemu-plugin.h instead of fetching one
#   --out DIR           output directory (default CACHE/tracer)
#   --cc CC             compiler (default: $CC or cc)
# Environment: MEMTRACE_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#   MEMTRACE_DEBIAN_SECURITY (default http://deb.debian.org/debian-security).
#
# Example, check that the plugin builds against Debian 13's QEMU 10.0 (plugin API 4):
#   tracer/build.sh --suite trixie --qemu-version 1:10.0.13+ds-0+deb13u1 --out /tmp/tracer-qemu10
set -eu

here=$(cd "$(dirname "$0")" && pwd)
# downloads (header, apt state) live in the user cache of memtrace.tracer.cache
build="${MEMTRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/memtrace}"
version=""
suite=""
header=""
out="$build/tracer"
cc="${CC:-cc}"

die() { echo "build.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --qemu-version) version="$2"; shift 2 ;;
        --suite) suite="$2"; shift 2 ;;
        --header) header="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --cc) cc="$2"; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

fetch_header() {
    # $1 = source package, $2 = source version; prints the path of the cached header
    src="$1"; ver="$2"
    cache="$build/qemu-header/$(echo "${src}_$ver" | tr ':/' '__')"
    if [ -s "$cache/qemu-plugin.h" ]; then
        echo "$cache/qemu-plugin.h"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: pass --header FILE"
    if [ -z "$suite" ]; then
        suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
        [ -n "$suite" ] || die "cannot tell the Debian suite: pass --suite"
    fi
    mirror="${MEMTRACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    security="${MEMTRACE_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    apt="$build/apt/$suite"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/parts"
    case "$suite" in
        *-backports)  # no -updates or -security suites of their own
            echo "deb-src [signed-by=$keyring] $mirror $suite main" > "$apt/sources.list" ;;
        *)
            {
                echo "deb-src [signed-by=$keyring] $mirror $suite main"
                echo "deb-src [signed-by=$keyring] $mirror $suite-updates main"
                echo "deb-src [signed-by=$keyring] $security $suite-security main"
            } > "$apt/sources.list" ;;
    esac
    set -- -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/parts" \
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" \
        -o "APT::Sandbox::User=$(id -un)" -o "Debug::NoLocking=1"
    echo "build.sh: fetching the $suite source index (deb-src) into $apt" >&2
    apt-get "$@" -q update >&2 || die "apt-get update failed for the deb-src entries of $suite"
    if [ "$ver" = latest ]; then
        ver=$(apt-cache "$@" showsrc "$src" | sed -n 's/^Version: //p' | sort -V | tail -n 1)
        [ -n "$ver" ] || die "no source package $src in $suite"
    fi
    dl="$build/qemu-src"
    rm -rf "$dl"
    mkdir -p "$dl"
    echo "build.sh: downloading source package $src=$ver (about 25-40 MB)" >&2
    (cd "$dl" && apt-get "$@" -q source --download-only "$src=$ver" >&2) ||
        die "apt-get source $src=$ver failed (is that version in $suite? see apt-cache showsrc $src)"
    orig=$(ls "$dl"/*.orig.tar.* 2>/dev/null | head -n 1)
    [ -n "$orig" ] || die "no .orig tarball in $dl"
    deb=$(ls "$dl"/*.debian.tar.* 2>/dev/null | head -n 1)
    if [ -n "$deb" ] && tar -xOf "$deb" --wildcards 'debian/patches/*' 2>/dev/null |
            grep -q '^+++ .*include/qemu/qemu-plugin\.h'; then
        die "a Debian patch of $src $ver changes qemu-plugin.h: extract it with dpkg-source -x and pass --header"
    fi
    tmp="$dl/x"
    mkdir -p "$tmp"
    tar -xf "$orig" -C "$tmp" --wildcards '*/include/qemu/qemu-plugin.h' ||
        die "include/qemu/qemu-plugin.h not found in $orig"
    mkdir -p "$cache"
    cp "$(find "$tmp" -name qemu-plugin.h | head -n 1)" "$cache/qemu-plugin.h"
    echo "$src $ver $(basename "$orig")" > "$cache/SOURCE"
    rm -rf "$dl"
    echo "$cache/qemu-plugin.h"
}

if [ -z "$header" ]; then
    if [ -z "$version" ]; then
        bin=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
        pkg=$(dpkg-query -S "$(readlink -f "$bin")" 2>/dev/null | head -n 1 | cut -d: -f1) ||
            die "$bin does not belong to a Debian package: pass --header FILE"
        [ -n "$pkg" ] || die "$bin does not belong to a Debian package: pass --header FILE"
        version=$(dpkg-query -W -f='${source:Version}' "$pkg")
        src=$(dpkg-query -W -f='${source:Package}' "$pkg")
    else
        src=qemu
    fi
    header=$(fetch_header "$src" "$version")
fi
[ -s "$header" ] || die "header $header missing"
api=$(sed -n 's/^#define QEMU_PLUGIN_VERSION \([0-9]*\).*/\1/p' "$header")
echo "build.sh: qemu-plugin.h from $header (plugin API $api)"

incdir="$build/qemu-include/$(echo "$header" | cksum | cut -d' ' -f1)"
mkdir -p "$incdir" "$out"
cp "$header" "$incdir/qemu-plugin.h"

pkg-config --exists glib-2.0 || die "glib-2.0 development files missing (apt-get install libglib2.0-dev pkg-config)"
for h in zstd.h xxhash.h; do
    echo "#include <$h>" | "$cc" -E -x c - >/dev/null 2>&1 ||
        die "$h missing (apt-get install libzstd-dev libxxhash-dev)"
done

srcs="memtrace_plugin.c trace_writer.c pt_walk.c wp_track.c mailbox.c json_min.c vcpu_stop.c"
set --
for s in $srcs; do set -- "$@" "$here/$s"; done
# shellcheck disable=SC2046
"$cc" -std=gnu11 -Wall -Wextra -O2 -fPIC -shared -fvisibility=hidden \
    -I"$incdir" $(pkg-config --cflags glib-2.0) \
    -o "$out/libmemtrace.so" "$@" \
    $(pkg-config --libs glib-2.0) -lzstd -lxxhash -lpthread

# what this build is for (tracer/qemus.py reads it): the QEMU source whose header it used, that
# QEMU's major.minor, the plugin API, and a digest of the sources (a stale build is rebuilt)
source=""
[ -s "$(dirname "$header")/SOURCE" ] && source=$(cut -d' ' -f1,2 "$(dirname "$header")/SOURCE")
series=$(echo "$source" | sed -n 's/^[^ ]* \([0-9]*:\)\{0,1\}\([0-9]*\.[0-9]*\).*/\2/p')
digest=$(for f in $(ls "$here"/*.[ch] | LC_ALL=C sort) "$here/build.sh"; do cat "$f"; done |
    sha256sum | cut -d' ' -f1)
printf '{"qemu_source": "%s", "qemu_series": "%s", "plugin_api": %s, "header": "%s", "sources": "%s"}\n' \
    "$source" "$series" "${api:-0}" "$header" "$digest" > "$out/build.json"
echo "build.sh: built $out/libmemtrace.so"
