"""A minimal guest for the tracer's end-to-end tests: Debian's kernel and a busybox initramfs.

`build_guest(dir)` takes the kernel and busybox of the locked guest image (build_image.py,
guest-agent/packages.lock.json) and writes ``bzImage`` and ``initramfs.cpio.gz`` into ``dir``.
No binary is committed.

The initramfs runs /init: mount /proc, /sys, /dev, run the workload named on the kernel command
line (``e2e.workload=``), optionally play a scripted "fake agent" that writes guest-agent
events into the mailbox through /dev/mem (``e2e.agent=1``), and power off. The fake agent lets
us test the plugin's mailbox path (PROTOCOL.md) before the real kernel module exists; it cannot
report real page-table roots, so MAP records are covered by the C unit test of the walker.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

from memtrace.guest import build_image
from tests.paths import REPO

ROOT = str(REPO)

MAILBOX_PHYS = 0x1F000000
MAILBOX_SIZE = 1 << 20
MAILBOX_SLOTS = 1024  # fake agent ring: 1024 slots of 64 bytes after the 4 KiB control page
SLOT = 64

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /tmp && mount -t tmpfs tmp /tmp
workload=default
agent=0
for w in $(cat /proc/cmdline); do
    case "$w" in
        e2e.workload=*) workload="${w#e2e.workload=}" ;;
        e2e.agent=*) agent="${w#e2e.agent=}" ;;
    esac
done
echo "E2E: booted, workload=$workload agent=$agent"
[ "$agent" = 1 ] && sh /e2e/agent_start.sh && echo "E2E: agent start written"
[ "$agent" = 1 ] && sh /e2e/agent_mm1.sh
sh /e2e/workload_$workload.sh
if [ "$agent" = 1 ]; then
    sh /e2e/agent_mm2.sh
    sh /e2e/workload_small.sh >/dev/null
    sh /e2e/agent_mm3.sh
    sh /e2e/workload_small.sh >/dev/null
    sh /e2e/agent_end.sh && echo "E2E: agent end written"
fi
[ "$agent" = stop ] && sh /e2e/agent_start.sh && sh /e2e/workload_$workload.sh && \
    sh /e2e/agent_stop.sh && echo "E2E: agent stop written" && sh /e2e/workload_$workload.sh
echo "E2E: done"
sync
poweroff -f
"""

WORKLOADS = {
    # a few MB of fresh, copied, sorted, compressed and freed data in tmpfs and process heaps
    "default": r"""
dd if=/dev/urandom of=/tmp/a bs=64k count=32 2>/dev/null
cp /tmp/a /tmp/b
md5sum /tmp/a /tmp/b
seq 1 30000 | sort -r > /tmp/c
gzip -c /tmp/c > /tmp/c.gz
gzip -dc /tmp/c.gz | md5sum
dd if=/dev/zero of=/tmp/z bs=64k count=16 2>/dev/null
rm /tmp/b /tmp/z
awk 'BEGIN { for (i = 0; i < 20000; i++) a[i] = i * 3; s = 0; for (i in a) s += a[i]; print s }'
""",
    # enough to exercise the store path in writes mode without a long run
    "small": r"""
dd if=/dev/urandom of=/tmp/a bs=64k count=4 2>/dev/null
cp /tmp/a /tmp/b
md5sum /tmp/a /tmp/b
rm /tmp/b
""",
    "tiny": "echo tiny\n",
}


def _slot_words(data: bytes) -> list[int]:
    data = data + b"\0" * (-len(data) % 8)
    return [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]


class FakeAgent:
    """Builds devmem command lines that write PROTOCOL.md events into the mailbox ring."""

    def __init__(self) -> None:
        self.slot = 0
        self.seq = 0

    def control_init(self) -> list[str]:
        base = MAILBOX_PHYS
        lines = [
            f"devmem {base + 8:#x} 64 {1 | (MAILBOX_SLOTS << 32):#x}",  # version, slot count
            f"devmem {base + 16:#x} 64 0",  # head
            f"devmem {base + 24:#x} 64 0",  # tail
            f"devmem {base + 32:#x} 64 0",  # dropped
            f"devmem {base + 40:#x} 64 0",  # next seq
            f"devmem {base:#x} 64 {int.from_bytes(b'MTAGENT1', 'little'):#x}",  # magic last
        ]
        return lines

    def event(self, etype: int, pid: int, payload: bytes, skip_seq: int = 0) -> list[str]:
        self.seq += skip_seq
        nslots = (16 + len(payload) + SLOT - 1) // SLOT
        assert self.slot + nslots <= MAILBOX_SLOTS
        head = struct.pack("<HHIQ", etype, nslots, pid, self.seq)
        words = _slot_words(head + payload)
        addr = MAILBOX_PHYS + 4096 + self.slot * SLOT
        self.slot += nslots
        self.seq += 1
        return [f"devmem {addr + 8 * i:#x} 64 {w:#x}" for i, w in enumerate(words)]

    def burst(self, n: int) -> tuple[bytes, list[str]]:
        """n one-slot COUNTER events ("burst", value i) as one binary blob and the dd line
        that writes it through /dev/mem in one go (an event storm, as during a state dump)."""
        first = self.slot
        assert first + n <= MAILBOX_SLOTS
        blob = b""
        for i in range(n):
            payload = struct.pack("<QQ", 0, i) + b"burst\0"
            head = struct.pack("<HHIQ", 8, 1, 1, self.seq)
            blob += (head + payload).ljust(SLOT, b"\0")
            self.slot += 1
            self.seq += 1
        addr = MAILBOX_PHYS + 4096 + first * SLOT
        return blob, [f"dd if=/e2e/burst.bin of=/dev/mem bs={SLOT} seek={addr // SLOT} "
                      "conv=notrunc 2>/dev/null"]

    def publish(self, dropped: int | None = None) -> list[str]:
        lines = []
        if dropped is not None:
            lines.append(f"devmem {MAILBOX_PHYS + 32:#x} 64 {dropped}")
        lines.append(f"devmem {MAILBOX_PHYS + 40:#x} 64 {self.seq}")
        lines.append(f"devmem {MAILBOX_PHYS + 16:#x} 64 {self.slot}")  # head last
        return lines


def mark(op: int, name: str = "", arg: int = 0) -> bytes:
    return struct.pack("<IIQ", op, 0, arg) + name.encode() + b"\0"


# A fake address space for the MAP path: page tables the fake agent writes into a reserved
# range with devmem, announced by a TASK_NEW whose pgd points at them (the real agent reports
# real page-table roots; a shell cannot read CR3).
FAKE_PT_BASE = 0x1E000000  # reserved with memmap=4M$0x1e000000: tables, data frames, a 2M page
FAKE_MM = 0xFFFF888012345000
FAKE_PID = 4242
PTE_P, PTE_RW, PTE_US, PTE_D, PTE_PS = 1, 2, 4, 0x40, 0x80
BURST = 1000  # events the fake agent publishes at once (the ring has 1024 slots)


def _fake_tables() -> tuple[list[str], list[str]]:
    """devmem lines that build the tables, and lines that change them later."""
    b = FAKE_PT_BASE
    pml4, pdpt, pd, pt = b, b + 0x1000, b + 0x2000, b + 0x3000
    up = PTE_P | PTE_RW | PTE_US

    def w(addr: int, val: int) -> str:
        return f"devmem {addr:#x} 64 {val:#x}"

    build = [
        w(pt + 0 * 8, (b + 0x10000) | up | PTE_D),        # vpn 512 -> frame 0x1e010, dirty
        w(pt + 1 * 8, (b + 0x11000) | PTE_P | PTE_US),    # vpn 513 -> 0x1e011, read-only
        w(pt + 2 * 8, (b + 0x12000) | up),                # vpn 514 -> 0x1e012
        w(pd + 1 * 8, pt | up),
        w(pd + 2 * 8, (b + 0x200000) | up | PTE_PS),      # vpn 1024..1535 -> 2M page
        w(pdpt, pd | up),
        w(pml4, pdpt | up),
    ]
    change = [
        w(pt + 1 * 8, (b + 0x13000) | PTE_P | PTE_US),    # vpn 513 now -> 0x1e013
        w(pt + 2 * 8, 0),                                 # vpn 514 unmapped
    ]
    return build, change


def expected_fake_maps() -> list[list[tuple[int, int, int]]]:
    """MAP records (vpn, frame, flags) for FAKE_MM, per step: new, changed, exit."""
    f0 = FAKE_PT_BASE >> 12
    new = [(512, f0 + 0x10, 7), (513, f0 + 0x11, 1), (514, f0 + 0x12, 3)]
    new += [(1024 + i, f0 + 0x200 + i, 3) for i in range(512)]
    changed = [(513, f0 + 0x13, 1), (514, 0, 0)]
    gone = [(512, 0, 0), (513, 0, 0)] + [(1024 + i, 0, 0) for i in range(512)]
    return [new, changed, gone]


def fake_agent_scripts() -> dict[str, str | bytes]:
    """The fake agent, in the order /init plays it with e2e.agent=1:
    agent_start.sh (state dump + MARK START), agent_mm1.sh (page tables + TASK_NEW),
    agent_mm2.sh (change the tables, no event), agent_mm3.sh (TASK_EXIT), agent_end.sh
    (BURST counter events at once, then a counter, a sequence gap, a phase mark, 2 dropped).
    With e2e.agent=stop: agent_start.sh, then agent_stop.sh (MARK STOP)."""
    a = FakeAgent()
    start = a.control_init()
    start += a.event(7, 1, mark(4, "e2e-dump", 1))  # MARK STATE_BEGIN (reset, as the agent)
    start += a.event(4, 1, struct.pack("<IIQQQ16s", 1, 0, 0, 0, 0, b"init"))  # TASK_EXISTING
    start += a.event(5, 1, struct.pack("<IIQQQQQQ", 5, 0x801, 0, 0x400000, 0x4a0000, 0x5, 0, 77)
                     + b"/bin/busybox\0")  # VMA EXISTING, 2 slots
    start += a.event(6, 1, struct.pack("<IIQQQ", 1, 0x801, 77, 3, 0x1234))  # PAGECACHE ADD
    start += a.event(7, 1, mark(5, "", 3))  # MARK STATE_END (arg: events in the dump)
    start += a.event(7, 1, mark(1, "e2e"))  # MARK START
    start += a.publish()
    after_start = (a.slot, a.seq)
    build, change = _fake_tables()
    mm1 = build + a.event(1, FAKE_PID, struct.pack("<IIQQQ16s", FAKE_PID, 1, 0x11, FAKE_MM,
                                                   FAKE_PT_BASE, b"fake-mm")) + a.publish()
    mm3 = a.event(3, FAKE_PID, struct.pack("<II", FAKE_PID, 0)) + a.publish()
    blob, burst = a.burst(BURST)
    end = burst + a.publish()
    end += a.event(8, 1, struct.pack("<QQ", 0, 42) + b"e2e.counter\0")  # COUNTER
    end += a.event(7, 1, mark(3, "phase-two"), skip_seq=1)  # MARK PHASE after a gap of 1
    end += a.publish(dropped=2)
    b = FakeAgent()
    b.slot, b.seq = after_start
    stop = b.event(7, 1, mark(2, "e2e-stop")) + b.publish()
    hdr = "#!/bin/sh\n"
    scripts = {"agent_start.sh": start, "agent_mm1.sh": mm1, "agent_mm2.sh": change,
               "agent_mm3.sh": mm3, "agent_end.sh": end, "agent_stop.sh": stop}
    out: dict[str, str | bytes] = {k: hdr + "\n".join(v) + "\n" for k, v in scripts.items()}
    out["burst.bin"] = blob
    return out


def _cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """entries: (name, mode, data, (rdev major, minor)); returns a newc archive."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data, (rmaj, rmin) in entries + [("TRAILER!!!", 0, b"", (0, 0))]:
        nameb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(nameb), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(nameb)
        out.write(b"\0" * (-(110 + len(nameb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def build_guest(outdir: str) -> dict[str, str]:
    """Write bzImage and initramfs.cpio.gz into outdir (cached); return their paths.

    The kernel and busybox are the locked guest image's (guest-agent/packages.lock.json, built
    by build_image.py into build/guest), so these tests run the same pinned packages."""
    os.makedirs(outdir, exist_ok=True)
    image = os.path.join(ROOT, "build", "guest")
    manifest = build_image.build(Path(image))
    kernel = os.path.join(outdir, "bzImage")
    initrd = os.path.join(outdir, "initramfs.cpio.gz")
    stamp = os.path.join(outdir, "image.json")
    made_from = json.dumps({"guest": manifest["input_digest"],
                            "this": hashlib.sha256(open(__file__, "rb").read()).hexdigest()})
    if not os.path.exists(stamp) or open(stamp).read() != made_from:
        for f in (kernel, initrd):
            if os.path.exists(f):
                os.unlink(f)
    if not os.path.exists(kernel):
        shutil.copyfile(os.path.join(image, "bzImage"), kernel + ".tmp")
        os.replace(kernel + ".tmp", kernel)
    if not os.path.exists(initrd):
        with open(os.path.join(image, "bbroot", "bin", "busybox"), "rb") as f:
            busybox = f.read()
        entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
        for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp",
                  "etc", "e2e", "root"]:
            entries.append((d, 0o040755, b"", (0, 0)))
        entries.append(("dev/console", 0o020600, b"", (5, 1)))
        entries.append(("bin/busybox", 0o100755, busybox, (0, 0)))
        entries.append(("init", 0o100755, INIT.encode(), (0, 0)))
        for name, text in WORKLOADS.items():
            entries.append((f"e2e/workload_{name}.sh", 0o100755, text.encode(), (0, 0)))
        for name, data in fake_agent_scripts().items():
            data = data.encode() if isinstance(data, str) else data
            entries.append((f"e2e/{name}", 0o100755, data, (0, 0)))
        with open(initrd + ".tmp", "wb") as f:
            f.write(gzip.compress(_cpio_newc(entries), 6))
        os.replace(initrd + ".tmp", initrd)
    with open(stamp, "w") as f:
        f.write(made_from)
    return {"kernel": kernel, "initrd": initrd}
