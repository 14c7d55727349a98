// SPDX-License-Identifier: GPL-2.0
/*
 * memtrace guest agent: reports task lifecycle, address-space changes and page-cache
 * membership to the memtrace tracer through a ring of fixed-size slots in a reserved
 * physical range (the mailbox). See PROTOCOL.md next to this file.
 *
 * Built for one exact kernel (Debian bookworm 6.1, see build_image.py); refuses others.
 */
#define pr_fmt(fmt) "memtrace: " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/init.h>
#include <linux/io.h>
#include <linux/spinlock.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/mm.h>
#include <linux/sched/task.h>
#include <linux/mm.h>
#include <linux/mm_types.h>
#include <linux/mmap_lock.h>
#include <linux/fs.h>
#include <linux/dcache.h>
#include <linux/pagemap.h>
#include <linux/xarray.h>
#include <linux/kdev_t.h>
#include <linux/kprobes.h>
#include <linux/tracepoint.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>
#include <linux/utsname.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/delay.h>
#include <linux/binfmts.h>
#include <linux/string.h>
#include <linux/ptrace.h>
#include <linux/fs_struct.h>
#include <linux/uidgid.h>
#include <linux/user_namespace.h>
#include <linux/path.h>
#include <linux/timer.h>
#include <linux/timekeeping.h>
#include <generated/utsrelease.h>

/* ------------------------------------------------------------------ protocol */

#define MT_MAGIC "MTAGENT1"
#define MT_VERSION 1
#define MT_SLOT 64
#define MT_SLOTS_OFF 4096
#define MT_STR_MAX 255
/* largest event (VMA: 16 + 56 + 256 bytes = 6 slots) plus the PAD it may need before it */
#define MT_MAX_EVENT_SLOTS 12

enum mta_type {
	MT_PAD = 0,
	MT_TASK_NEW = 1,
	MT_TASK_EXEC = 2,
	MT_TASK_EXIT = 3,
	MT_TASK_EXISTING = 4,
	MT_VMA = 5,
	MT_PAGECACHE = 6,
	MT_MARK = 7,
	MT_COUNTER = 8,
	MT_TASK_COMM = 9,
};

enum { VMA_MAP = 1, VMA_UNMAP = 2, VMA_PROTECT = 3, VMA_BRK = 4, VMA_EXISTING = 5 };
enum { PC_ADD = 1, PC_DEL = 2 };
enum {
	MARK_START = 1, MARK_STOP = 2, MARK_PHASE = 3, MARK_STATE_BEGIN = 4, MARK_STATE_END = 5,
};

struct mta_ctrl {
	char magic[8];
	u32 version;
	u32 nslots;
	u64 head;
	u64 tail;
	u64 dropped;
	u64 next_seq;
	u8 reserved[16];
} __packed;

struct mta_hdr {
	u16 type;
	u16 nslots;
	u32 pid;
	u64 seq;
} __packed;

struct mta_task {
	u32 tgid, ppid;
	u64 clone_flags, mm, pgd;
	char comm[16];
} __packed;

struct mta_exec {
	u32 tgid, pad;
	u64 mm, pgd;
} __packed;

struct mta_exit {
	u32 tgid, pad;
} __packed;

struct mta_vma {
	u32 op, dev;
	u64 mm, start, end, vm_flags, pgoff, ino;
} __packed;

struct mta_pc {
	u32 op, dev;
	u64 ino, index, frame;
} __packed;

struct mta_mark {
	u32 op, pad;
	u64 arg;
} __packed;

struct mta_counter {
	u64 pad, value;
} __packed;

struct mta_comm {
	u32 tgid, pad;
	char comm[16];
} __packed;

static_assert(sizeof(struct mta_ctrl) == 64);
static_assert(sizeof(struct mta_hdr) == 16);
static_assert(sizeof(struct mta_task) == 48);
static_assert(sizeof(struct mta_vma) == 56);
static_assert(sizeof(struct mta_pc) == 32);

/* ------------------------------------------------------------------ parameters */

static unsigned long mailbox_phys = 0x1f000000;
module_param(mailbox_phys, ulong, 0444);
MODULE_PARM_DESC(mailbox_phys, "physical address of the reserved mailbox (memmap=SIZE$PHYS)");
static unsigned long mailbox_size = 1UL << 20;
module_param(mailbox_size, ulong, 0444);
MODULE_PARM_DESC(mailbox_size, "size of the mailbox in bytes");
static unsigned int dump_wait_ms = 5000;
module_param(dump_wait_ms, uint, 0644);
MODULE_PARM_DESC(dump_wait_ms,
		 "ms a state dump waits for ring space while the tracer makes no progress");
static unsigned int stop_wait_ms = 5000;
module_param(stop_wait_ms, uint, 0644);
MODULE_PARM_DESC(stop_wait_ms,
		 "ms a 'stop' waits for the tracer to consume it (0: return at once)");
static char *dump_fs = "tmpfs,ramfs,devtmpfs";
module_param(dump_fs, charp, 0444);
MODULE_PARM_DESC(dump_fs, "file system types whose page cache the state dump walks");
static unsigned int clock_ms;
module_param(clock_ms, uint, 0444);
MODULE_PARM_DESC(clock_ms, "emit COUNTER guest.clock_ns every this many ms from load (0: off; "
		 "'clock MS' in /proc/memtrace changes it)");
/*
 * /proc/memtrace is written by root only: an unprivileged process must not put markers, counters
 * or a stop into a trace. A workload running as another user may mark its phases through
 * /proc/memtrace-mark, which exists only when the scenario names a group (mark_gid) and takes
 * `phase NAME` and `counter NAME VALUE` from that group's members, nothing else.
 */
static int mark_gid = -1;
module_param(mark_gid, int, 0444);
MODULE_PARM_DESC(mark_gid, "group whose members may write phase and counter marks to "
		 "/proc/memtrace-mark (-1: no such file)");

/* ------------------------------------------------------------------ ring */

static void *mta_base;
static struct mta_ctrl *mta_ctrl;
static u8 *mta_slots;
static u32 mta_nslots;
static u64 mta_head, mta_seq, mta_dropped;
static DEFINE_SPINLOCK(mta_lock);
static bool mta_ready;
static atomic64_t mta_stat_skipped_exec = ATOMIC64_INIT(0);
static atomic64_t mta_stat_trylock_fail = ATOMIC64_INIT(0);

/* Pending free slots (approximate, for the waiting dump path). */
static u64 mta_free_slots(void)
{
	u64 tail = READ_ONCE(mta_ctrl->tail);
	u64 used = READ_ONCE(mta_head) - tail;

	return used >= mta_nslots ? 0 : mta_nslots - used;
}

/*
 * Write one event: header + fixed payload + optional string (NUL-terminated, <= 255 bytes).
 * Never blocks; drops (and counts) when the ring has no room.
 */
static int mta_emit(u16 type, u32 pid, const void *payload, size_t plen, const char *str)
{
	size_t slen = 0, total;
	u32 nslots, pos, pad;
	unsigned long flags;
	struct mta_hdr *h;
	u8 *dst;
	u64 seq, tail;
	int ret = 0;

	if (!READ_ONCE(mta_ready))
		return -ENODEV;
	if (str) {
		slen = strnlen(str, MT_STR_MAX);
		total = sizeof(*h) + plen + slen + 1;
	} else {
		total = sizeof(*h) + plen;
	}
	nslots = DIV_ROUND_UP(total, MT_SLOT);

	spin_lock_irqsave(&mta_lock, flags);
	seq = mta_seq++;
	WRITE_ONCE(mta_ctrl->next_seq, mta_seq);
	tail = READ_ONCE(mta_ctrl->tail);
	pos = mta_head & (mta_nslots - 1);
	pad = (pos + nslots > mta_nslots) ? mta_nslots - pos : 0;
	if (mta_head + pad + nslots - tail > mta_nslots || mta_head < tail) {
		mta_dropped++;
		WRITE_ONCE(mta_ctrl->dropped, mta_dropped);
		ret = -ENOSPC;
		goto out;
	}
	if (pad) {
		h = (struct mta_hdr *)(mta_slots + (size_t)pos * MT_SLOT);
		memset(h, 0, (size_t)pad * MT_SLOT);
		h->type = MT_PAD;
		h->nslots = pad;
		pos = 0;
	}
	dst = mta_slots + (size_t)pos * MT_SLOT;
	h = (struct mta_hdr *)dst;
	h->type = type;
	h->nslots = nslots;
	h->pid = pid;
	h->seq = seq;
	memcpy(dst + sizeof(*h), payload, plen);
	if (str) {
		memcpy(dst + sizeof(*h) + plen, str, slen);
		dst[sizeof(*h) + plen + slen] = 0;
	}
	memset(dst + total, 0, (size_t)nslots * MT_SLOT - total);
	smp_wmb();
	mta_head += pad + nslots;
	WRITE_ONCE(mta_ctrl->head, mta_head);
out:
	spin_unlock_irqrestore(&mta_lock, flags);
	return ret;
}

/* Dumps run in process context and may wait for the tracer to make room. */
struct mta_dump {
	unsigned long deadline;	/* jiffies; moved on whenever the tracer consumes */
	bool gave_up;
	u64 events;
	u64 sbs, inodes, pages;
	struct super_block *root_sb[2];	/* walked directly; skipped by the type walk */
};

static void mta_dump_wait(struct mta_dump *d, u32 need)
{
	u64 tail = READ_ONCE(mta_ctrl->tail);

	while (!d->gave_up && mta_free_slots() < need) {
		u64 now_tail = READ_ONCE(mta_ctrl->tail);

		if (now_tail != tail) {
			/* the tracer is consuming: keep waiting */
			tail = now_tail;
			d->deadline = jiffies + msecs_to_jiffies(dump_wait_ms);
		}
		if (time_after(jiffies, d->deadline)) {
			d->gave_up = true;
			pr_warn("state dump: no ring space for %u ms, dropping the rest (counted)\n",
				dump_wait_ms);
			break;
		}
		usleep_range(200, 500);
	}
}

/*
 * `stop` returns once the tracer has consumed the MARK STOP: the trace ends where the workload
 * said, not up to an epoch later (10M instructions: enough for a script to exit and the init
 * shim to kill the workload's servers, whose teardown the trace's last state would then show).
 * Sleeping lets the vCPU idle, and the tracer drains the ring at once when it idles, else at
 * its next epoch end. A ring nobody has ever consumed (tail 0: no tracer, e.g. trace-record
 * --no-plugin) is not waited for; stop_wait_ms bounds the wait otherwise.
 */
static void mta_stop_wait(void)
{
	u64 target = READ_ONCE(mta_head);
	unsigned long deadline = jiffies + msecs_to_jiffies(stop_wait_ms);

	if (!READ_ONCE(mta_ctrl->tail))
		return;
	while (READ_ONCE(mta_ctrl->tail) < target) {
		if (time_after(jiffies, deadline)) {
			pr_warn("stop: the tracer did not consume it in %u ms\n", stop_wait_ms);
			return;
		}
		usleep_range(500, 1000);
	}
}

/* ------------------------------------------------------------------ helpers */

static u64 mta_pgd(struct mm_struct *mm)
{
	return mm ? (u64)__pa(mm->pgd) : 0;
}

static u32 mta_ppid(struct task_struct *t)
{
	struct task_struct *p;
	u32 ppid = 0;

	rcu_read_lock();
	p = rcu_dereference(t->real_parent);
	if (p)
		ppid = p->tgid;
	rcu_read_unlock();
	return ppid;
}

static void mta_fill_task(struct mta_task *e, struct task_struct *t, struct mm_struct *mm,
			 u64 clone_flags)
{
	memset(e, 0, sizeof(*e));
	e->tgid = t->tgid;
	e->ppid = mta_ppid(t);
	e->clone_flags = clone_flags;
	e->mm = (u64)(unsigned long)mm;
	e->pgd = mta_pgd(mm);
	memcpy(e->comm, t->comm, sizeof(e->comm));
	e->comm[15] = 0;
}

/* file identity: dev (new_encode_dev), ino, path into buf (returns "" for none) */
static const char *mta_file_id(struct file *f, u32 *dev, u64 *ino, char *buf, int buflen)
{
	struct inode *inode;
	char *p;

	*dev = 0;
	*ino = 0;
	if (!f)
		return "";
	inode = file_inode(f);
	*dev = new_encode_dev(inode->i_sb->s_dev);
	*ino = inode->i_ino;
	if (!buf)
		return "";
	p = d_path(&f->f_path, buf, buflen);
	if (IS_ERR(p))
		return "?";
	return p;
}

static void mta_emit_vma(u32 op, u32 pid, struct mm_struct *mm, struct vm_area_struct *vma,
			unsigned long start, unsigned long end, bool with_path)
{
	char buf[320];
	struct mta_vma e;
	const char *path = "";

	memset(&e, 0, sizeof(e));
	e.op = op;
	e.mm = (u64)(unsigned long)mm;
	e.start = start;
	e.end = end;
	if (vma) {
		e.vm_flags = vma->vm_flags;
		e.pgoff = vma->vm_pgoff + ((start - vma->vm_start) >> PAGE_SHIFT);
		path = mta_file_id(vma->vm_file, &e.dev, &e.ino, with_path ? buf : NULL,
				  sizeof(buf));
	}
	mta_emit(MT_VMA, pid, &e, sizeof(e), path);
}

static void mta_emit_folio(u32 op, struct folio *folio, struct address_space *mapping,
			  pgoff_t index)
{
	struct inode *host;
	struct mta_pc e;
	long i, n;

	if (!mapping || !mapping->host)
		return;
	host = mapping->host;
	memset(&e, 0, sizeof(e));
	e.op = op;
	e.dev = new_encode_dev(host->i_sb ? host->i_sb->s_dev : host->i_rdev);
	e.ino = host->i_ino;
	n = folio_nr_pages(folio);
	for (i = 0; i < n; i++) {
		e.index = index + i;
		e.frame = folio_pfn(folio) + i;
		mta_emit(MT_PAGECACHE, current->pid, &e, sizeof(e), NULL);
	}
}

static void mta_mark(u32 op, u64 arg, const char *name)
{
	struct mta_mark e = { .op = op, .arg = arg };

	mta_emit(MT_MARK, current->pid, &e, sizeof(e), name ? name : "");
}

/* all VMAs of mm as VMA EXISTING; caller holds the mmap lock */
static void mta_emit_mm_vmas(u32 pid, struct mm_struct *mm, struct mta_dump *d)
{
	struct vm_area_struct *vma;
	VMA_ITERATOR(vmi, mm, 0);

	for_each_vma(vmi, vma) {
		if (d)
			mta_dump_wait(d, MT_MAX_EVENT_SLOTS);
		mta_emit_vma(VMA_EXISTING, pid, mm, vma, vma->vm_start, vma->vm_end, true);
		if (d)
			d->events++;
	}
}

/* ------------------------------------------------------------------ tracepoints */

static void mta_tp_newtask(void *data, struct task_struct *task, unsigned long clone_flags)
{
	struct mta_task e;

	mta_fill_task(&e, task, task->mm, clone_flags);
	mta_emit(MT_TASK_NEW, task->pid, &e, sizeof(e), NULL);
}

static void mta_tp_exec(void *data, struct task_struct *p, pid_t old_pid,
		       struct linux_binprm *bprm)
{
	struct mm_struct *mm = p->mm;
	struct mta_exec e = { .tgid = p->tgid };
	char buf[320];
	const char *path = bprm->filename;

	e.mm = (u64)(unsigned long)mm;
	e.pgd = mta_pgd(mm);
	if (bprm->file) {
		char *s = d_path(&bprm->file->f_path, buf, sizeof(buf));

		if (!IS_ERR(s))
			path = s;
	}
	mta_emit(MT_TASK_EXEC, p->pid, &e, sizeof(e), path);
	/*
	 * The new address space was built while in_execve was set (those VMA events are
	 * suppressed); report its complete layout now. The mm is private to this task here.
	 */
	if (mm) {
		if (mmap_read_trylock(mm)) {
			mta_emit_mm_vmas(p->pid, mm, NULL);
			mmap_read_unlock(mm);
		} else {
			atomic64_inc(&mta_stat_trylock_fail);
		}
	}
}

static void mta_tp_exit(void *data, struct task_struct *p)
{
	struct mta_exit e = { .tgid = p->tgid };

	mta_emit(MT_TASK_EXIT, p->pid, &e, sizeof(e), NULL);
}

static void mta_tp_rename(void *data, struct task_struct *task, const char *comm)
{
	struct mta_comm e = { .tgid = task->tgid };

	strscpy(e.comm, comm, sizeof(e.comm));
	mta_emit(MT_TASK_COMM, task->pid, &e, sizeof(e), NULL);
}

static void mta_tp_pc_add(void *data, struct folio *folio)
{
	mta_emit_folio(PC_ADD, folio, folio->mapping, folio->index);
}

static void mta_tp_pc_del(void *data, struct folio *folio)
{
	mta_emit_folio(PC_DEL, folio, folio->mapping, folio->index);
}

struct mta_tp {
	const char *name;
	void *probe;
	struct tracepoint *tp;
};

static struct mta_tp mta_tps[] = {
	{ "task_newtask", mta_tp_newtask },
	{ "sched_process_exec", mta_tp_exec },
	{ "sched_process_exit", mta_tp_exit },
	{ "task_rename", mta_tp_rename },
	{ "mm_filemap_add_to_page_cache", mta_tp_pc_add },
	{ "mm_filemap_delete_from_page_cache", mta_tp_pc_del },
};

static void mta_find_tp(struct tracepoint *tp, void *priv)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(mta_tps); i++)
		if (!strcmp(tp->name, mta_tps[i].name))
			mta_tps[i].tp = tp;
}

/* ------------------------------------------------------------------ kprobes */

static bool mta_skip_vma_event(void)
{
	/* exec builds a new mm: reported as a whole at sched_process_exec */
	if (current->in_execve) {
		atomic64_inc(&mta_stat_skipped_exec);
		return true;
	}
	return false;
}

/* unsigned long mmap_region(file, addr, len, vm_flags, pgoff, uf); mmap_lock held for write */
struct mta_mmap_data {
	unsigned long len;
};

static int mta_mmap_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_mmap_data *d = (void *)ri->data;

	d->len = regs->dx;
	return 0;
}

static int mta_mmap_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_mmap_data *d = (void *)ri->data;
	unsigned long addr = regs_return_value(regs);
	struct mm_struct *mm = current->mm;
	struct vm_area_struct *vma;

	if (IS_ERR_VALUE(addr) || !mm || mta_skip_vma_event())
		return 0;
	vma = find_vma(mm, addr);
	if (vma && vma->vm_start > addr)
		vma = NULL;
	mta_emit_vma(VMA_MAP, current->pid, mm, vma, addr, addr + PAGE_ALIGN(d->len), true);
	return 0;
}

/* int do_mas_munmap(mas, mm, start, len, uf, downgrade) */
struct mta_munmap_data {
	struct mm_struct *mm;
	unsigned long start, len;
};

static int mta_munmap_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_munmap_data *d = (void *)ri->data;

	d->mm = (struct mm_struct *)regs->si;
	d->start = regs->dx;
	d->len = regs->cx;
	return 0;
}

static int mta_munmap_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_munmap_data *d = (void *)ri->data;
	long ret = (long)regs_return_value(regs);
	struct mta_vma e;

	if (ret < 0 || !d->mm || mta_skip_vma_event())
		return 0;
	memset(&e, 0, sizeof(e));
	e.op = VMA_UNMAP;
	e.mm = (u64)(unsigned long)d->mm;
	e.start = d->start;
	e.end = d->start + PAGE_ALIGN(d->len);
	mta_emit(MT_VMA, current->pid, &e, sizeof(e), "");
	return 0;
}

/* A VMA PROTECT event for [start, end) of ``vma`` (flags filled in by the caller). */
static void mta_protect_event(struct mta_vma *e, struct vm_area_struct *vma, unsigned long start,
			      unsigned long end)
{
	memset(e, 0, sizeof(*e));
	e->op = VMA_PROTECT;
	e->mm = (u64)(unsigned long)vma->vm_mm;
	e->start = start;
	e->end = end;
	e->pgoff = vma->vm_pgoff + ((start - vma->vm_start) >> PAGE_SHIFT);
	mta_file_id(vma->vm_file, &e->dev, &e->ino, NULL, 0);
}

/* int mprotect_fixup(tlb, vma, pprev, start, end, newflags); mmap_lock held for write */
struct mta_mprot_data {
	struct mta_vma e;
};

static int mta_mprot_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_mprot_data *d = (void *)ri->data;

	mta_protect_event(&d->e, (struct vm_area_struct *)regs->si, regs->cx, regs->r8);
	d->e.vm_flags = regs->r9;
	return 0;
}

static int mta_mprot_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_mprot_data *d = (void *)ri->data;

	if (regs_return_value(regs) != 0 || mta_skip_vma_event())
		return 0;
	mta_emit(MT_VMA, current->pid, &d->e, sizeof(d->e), "");
	return 0;
}

/*
 * int ksm_madvise(vma, start, end, advice, unsigned long *vm_flags): called by madvise() for
 * MADV_MERGEABLE / MADV_UNMERGEABLE on each VMA of the range (start, end clipped to it), with
 * the mmap_lock held for write; it sets or clears VM_MERGEABLE in *vm_flags, which
 * madvise_update_vma() then applies to [start, end). Reported as VMA PROTECT with the new flags
 * when they changed (6.1 has no prctl(PR_SET_MEMORY_MERGE)).
 */
struct mta_madv_data {
	unsigned long *flagsp;
	unsigned long old;
	struct mta_vma e;
};

static int mta_madv_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_madv_data *d = (void *)ri->data;

	d->flagsp = (unsigned long *)regs->r8;
	d->old = d->flagsp ? *d->flagsp : 0;
	mta_protect_event(&d->e, (struct vm_area_struct *)regs->di, regs->si, regs->dx);
	return 0;
}

static int mta_madv_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_madv_data *d = (void *)ri->data;
	unsigned long now;

	if (regs_return_value(regs) != 0 || !d->flagsp || mta_skip_vma_event())
		return 0;
	now = READ_ONCE(*d->flagsp);
	if (now == d->old)
		return 0;
	d->e.vm_flags = now;
	mta_emit(MT_VMA, current->pid, &d->e, sizeof(d->e), "");
	return 0;
}

/* __x64_sys_brk(const struct pt_regs *uregs): report the break when it moved */
struct mta_brk_data {
	unsigned long old;
};

static int mta_brk_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_brk_data *d = (void *)ri->data;

	d->old = current->mm ? READ_ONCE(current->mm->brk) : 0;
	return 0;
}

static int mta_brk_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_brk_data *d = (void *)ri->data;
	struct mm_struct *mm = current->mm;
	struct mta_vma e;

	if (!mm || READ_ONCE(mm->brk) == d->old)
		return 0;
	memset(&e, 0, sizeof(e));
	e.op = VMA_BRK;
	e.mm = (u64)(unsigned long)mm;
	e.start = mm->start_brk;
	e.end = READ_ONCE(mm->brk);
	e.vm_flags = VM_READ | VM_WRITE | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC;
	mta_emit(MT_VMA, current->pid, &e, sizeof(e), "");
	return 0;
}

/* __x64_sys_mremap(uregs): UNMAP old range, MAP new range (spec: mremap = UNMAP + MAP) */
struct mta_mremap_data {
	unsigned long addr, old_len, new_len;
};

static int mta_mremap_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_mremap_data *d = (void *)ri->data;
	const struct pt_regs *u = (const struct pt_regs *)regs->di;

	d->addr = u->di;
	d->old_len = u->si;
	d->new_len = u->dx;
	return 0;
}

static int mta_mremap_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_mremap_data *d = (void *)ri->data;
	unsigned long addr = regs_return_value(regs);
	struct mm_struct *mm = current->mm;
	struct vm_area_struct *vma = NULL;
	struct mta_vma e;
	bool locked;

	if (IS_ERR_VALUE(addr) || !mm)
		return 0;
	memset(&e, 0, sizeof(e));
	e.op = VMA_UNMAP;
	e.mm = (u64)(unsigned long)mm;
	e.start = d->addr;
	e.end = d->addr + PAGE_ALIGN(d->old_len);
	mta_emit(MT_VMA, current->pid, &e, sizeof(e), "");
	locked = mmap_read_trylock(mm);
	if (locked) {
		vma = find_vma(mm, addr);
		if (vma && vma->vm_start > addr)
			vma = NULL;
	} else {
		atomic64_inc(&mta_stat_trylock_fail);
	}
	mta_emit_vma(VMA_MAP, current->pid, mm, vma, addr, addr + PAGE_ALIGN(d->new_len), true);
	if (locked)
		mmap_read_unlock(mm);
	return 0;
}

/* shmem_add_to_page_cache(folio, mapping, index, expected, gfp, charge_mm): tmpfs/shmem adds */
struct mta_shmem_data {
	struct folio *folio;
	struct address_space *mapping;
	pgoff_t index;
};

static int mta_shmem_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_shmem_data *d = (void *)ri->data;

	d->folio = (struct folio *)regs->di;
	d->mapping = (struct address_space *)regs->si;
	d->index = regs->dx;
	return 0;
}

static int mta_shmem_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct mta_shmem_data *d = (void *)ri->data;

	if (regs_return_value(regs) != 0)
		return 0;
	mta_emit_folio(PC_ADD, d->folio, d->mapping, d->index);
	return 0;
}

struct mta_krp {
	const char *symbol;
	struct kretprobe krp;
	bool required;
	bool registered;
};

#define MT_KRP(sym, ent, ret_, type, req)                                      \
	{ .symbol = sym, .required = req,                                     \
	  .krp = { .entry_handler = ent, .handler = ret_,                     \
		   .data_size = sizeof(struct type), .maxactive = 64 } }

static struct mta_krp mta_krps[] = {
	MT_KRP("mmap_region", mta_mmap_entry, mta_mmap_ret, mta_mmap_data, true),
	MT_KRP("do_mas_munmap", mta_munmap_entry, mta_munmap_ret, mta_munmap_data, true),
	MT_KRP("mprotect_fixup", mta_mprot_entry, mta_mprot_ret, mta_mprot_data, true),
	MT_KRP("__x64_sys_brk", mta_brk_entry, mta_brk_ret, mta_brk_data, true),
	MT_KRP("__x64_sys_mremap", mta_mremap_entry, mta_mremap_ret, mta_mremap_data, true),
	MT_KRP("shmem_add_to_page_cache", mta_shmem_entry, mta_shmem_ret, mta_shmem_data, true),
	MT_KRP("ksm_madvise", mta_madv_entry, mta_madv_ret, mta_madv_data, false),
};

/* ------------------------------------------------------------------ state dump */

static void mta_dump_mapping(struct address_space *mapping, struct mta_dump *d)
{
	XA_STATE(xas, &mapping->i_pages, 0);
	struct folio *folio;
	int batch;

	for (;;) {
		mta_dump_wait(d, 64 + MT_MAX_EVENT_SLOTS);
		batch = 0;
		xas_lock_irq(&xas);
		xas_for_each(&xas, folio, ULONG_MAX) {
			if (xas_retry(&xas, folio) || xa_is_value(folio))
				continue;
			mta_emit_folio(PC_ADD, folio, mapping, folio->index);
			d->events += folio_nr_pages(folio);
			d->pages += folio_nr_pages(folio);
			batch += folio_nr_pages(folio);
			if (batch >= 64) {
				xas_pause(&xas);
				break;
			}
		}
		xas_unlock_irq(&xas);
		if (batch < 64)
			return;
		cond_resched();
	}
}

/* walk every inode of a super block with page-cache pages (drop_pagecache_sb pattern) */
static void mta_dump_sb(struct super_block *sb, void *arg)
{
	struct mta_dump *d = arg;
	struct inode *inode, *toput = NULL;

	if (sb == d->root_sb[0] || sb == d->root_sb[1])
		return;
	d->sbs++;
	spin_lock(&sb->s_inode_list_lock);
	list_for_each_entry(inode, &sb->s_inodes, i_sb_list) {
		spin_lock(&inode->i_lock);
		if ((inode->i_state & (I_FREEING | I_WILL_FREE | I_NEW)) ||
		    inode->i_mapping->nrpages == 0) {
			spin_unlock(&inode->i_lock);
			continue;
		}
		__iget(inode);
		spin_unlock(&inode->i_lock);
		spin_unlock(&sb->s_inode_list_lock);

		d->inodes++;
		mta_dump_mapping(inode->i_mapping, d);
		iput(toput);
		toput = inode;
		cond_resched();
		spin_lock(&sb->s_inode_list_lock);
	}
	spin_unlock(&sb->s_inode_list_lock);
	iput(toput);
}

static void mta_dump_sb_root(struct super_block *sb, struct mta_dump *d)
{
	struct super_block *saved[2] = { d->root_sb[0], d->root_sb[1] };

	d->root_sb[0] = d->root_sb[1] = NULL;
	mta_dump_sb(sb, d);
	d->root_sb[0] = saved[0];
	d->root_sb[1] = saved[1];
}

static void mta_dump_pagecache(struct mta_dump *d)
{
	char *names, *cur, *name;
	struct path root, kroot;

	/*
	 * The root file system (the initramfs: type "rootfs", which is not in the list of
	 * registered types) is reached through the caller's root directory; and, when the caller
	 * runs chrooted into another root (a disk root, guest-agent/initdisk.sh), the initramfs
	 * through the kernel's own root (init_task's), since the programs the init shim runs
	 * from it map its pages too.
	 */
	get_fs_root(current->fs ? current->fs : init_task.fs, &root);
	get_fs_root(init_task.fs, &kroot);
	d->root_sb[0] = root.mnt->mnt_sb;
	d->root_sb[1] = kroot.mnt->mnt_sb;
	mta_dump_sb_root(d->root_sb[0], d);
	if (d->root_sb[1] != d->root_sb[0])
		mta_dump_sb_root(d->root_sb[1], d);

	names = kstrdup(dump_fs, GFP_KERNEL);
	cur = names;
	while ((name = strsep(&cur, ",")) != NULL) {
		struct file_system_type *fst;

		if (!*name)
			continue;
		fst = get_fs_type(name);
		if (!fst) {
			pr_info("state dump: no file system type %s\n", name);
			continue;
		}
		iterate_supers_type(fst, mta_dump_sb, d);
		module_put(fst->owner);
	}
	kfree(names);
	/* the roots stay referenced while the type walk compares super blocks with them */
	path_put(&kroot);
	path_put(&root);
}

static void mta_dump_tasks(struct mta_dump *d)
{
	struct task_struct *g, *t, **tasks;
	unsigned int n = 0, cap = 8192, i, j;
	struct mm_struct **seen;
	unsigned int nseen = 0;

	tasks = kvmalloc_array(cap, sizeof(*tasks), GFP_KERNEL);
	seen = kvmalloc_array(cap, sizeof(*seen), GFP_KERNEL);
	if (!tasks || !seen)
		goto out;
	rcu_read_lock();
	for_each_process_thread(g, t) {
		if (n == cap)
			break;
		get_task_struct(t);
		tasks[n++] = t;
	}
	rcu_read_unlock();

	for (i = 0; i < n; i++) {
		struct mm_struct *mm;
		struct mta_task e;

		t = tasks[i];
		if (t->flags & PF_EXITING)
			continue;
		mm = get_task_mm(t);
		mta_dump_wait(d, MT_MAX_EVENT_SLOTS);
		mta_fill_task(&e, t, mm, 0);
		mta_emit(MT_TASK_EXISTING, t->pid, &e, sizeof(e), NULL);
		d->events++;
		if (!mm)
			continue;
		for (j = 0; j < nseen; j++)
			if (seen[j] == mm)
				break;
		if (j == nseen) {
			seen[nseen++] = mm;
			mmap_read_lock(mm);
			mta_emit_mm_vmas(t->pid, mm, d);
			mmap_read_unlock(mm);
		}
		mmput(mm);
	}
out:
	for (i = 0; i < n; i++)
		put_task_struct(tasks[i]);
	kvfree(tasks);
	kvfree(seen);
}

static DEFINE_MUTEX(mta_dump_mutex);

static void mta_state_dump(void)
{
	struct mta_dump d = { .deadline = jiffies + msecs_to_jiffies(dump_wait_ms) };

	mutex_lock(&mta_dump_mutex);
	mta_dump_wait(&d, MT_MAX_EVENT_SLOTS);
	mta_mark(MARK_STATE_BEGIN, 1, "");
	mta_dump_tasks(&d);
	mta_dump_pagecache(&d);
	mta_dump_wait(&d, MT_MAX_EVENT_SLOTS);
	mta_mark(MARK_STATE_END, d.events, "");
	mutex_unlock(&mta_dump_mutex);
	pr_info("state dump: %llu events: %llu page-cache pages of %llu inodes on %llu super blocks%s\n",
		d.events, d.pages, d.inodes, d.sbs, d.gave_up ? " (ring full, some dropped)" : "");
}

/* ------------------------------------------------------------------ guest clock */

/*
 * The trace's clock is retired guest instructions, which stand still while the guest idles;
 * the guest's own time (CLOCK_MONOTONIC, which jiffies and every sleep follow) goes into the
 * trace as COUNTER guest.clock_ns, once when switched on and then every mta_clock_ms from a
 * timer, so that analyses can map trace time to guest time. Setting it, and "start" while it
 * runs, also report HZ (COUNTER guest.hz), so that a trace that begins at START has both.
 */
#define MT_CLOCK_COUNTER "guest.clock_ns"
#define MT_HZ_COUNTER "guest.hz"
static struct timer_list mta_clock_timer;
static unsigned int mta_clock_ms;

static void mta_clock_emit(void)
{
	struct mta_counter e = { 0 };

	e.value = ktime_get_ns();
	mta_emit(MT_COUNTER, 0, &e, sizeof(e), MT_CLOCK_COUNTER);
}

static void mta_clock_fn(struct timer_list *t)
{
	unsigned int ms = READ_ONCE(mta_clock_ms);

	if (!ms)
		return;
	mta_clock_emit();
	mod_timer(&mta_clock_timer, jiffies + max(1UL, msecs_to_jiffies(ms)));
}

/* HZ and the clock now: the tick rate too, since kernel sleeps (ksmd's) are whole jiffies */
static void mta_clock_announce(void)
{
	struct mta_counter e = { .value = HZ };

	mta_emit(MT_COUNTER, 0, &e, sizeof(e), MT_HZ_COUNTER);
	mta_clock_emit();
}

static void mta_clock_set(unsigned int ms)
{
	WRITE_ONCE(mta_clock_ms, ms);
	if (!ms) {
		del_timer_sync(&mta_clock_timer);
		return;
	}
	mta_clock_announce();
	mod_timer(&mta_clock_timer, jiffies + max(1UL, msecs_to_jiffies(ms)));
}

/* ------------------------------------------------------------------ /proc/memtrace */

/* One command written to /proc/memtrace (all) or /proc/memtrace-mark (marks only). */
static ssize_t mta_command(const char __user *ubuf, size_t count, bool marks_only)
{
	char buf[320], *cmd, *arg, *val;
	size_t n = min(count, sizeof(buf) - 1);

	if (copy_from_user(buf, ubuf, n))
		return -EFAULT;
	buf[n] = 0;
	cmd = strim(buf);
	arg = strpbrk(cmd, " \t");
	if (arg) {
		*arg++ = 0;
		arg = skip_spaces(arg);
	}
	if (marks_only && strcmp(cmd, "phase") && strcmp(cmd, "counter"))
		return -EPERM;
	if (!strcmp(cmd, "start")) {
		mta_state_dump();
		if (READ_ONCE(mta_clock_ms))
			mta_clock_announce();
		mta_mark(MARK_START, 0, "");
	} else if (!strcmp(cmd, "stop")) {
		mta_mark(MARK_STOP, 0, "");
		mta_stop_wait();
	} else if (!strcmp(cmd, "dump")) {
		mta_state_dump();
	} else if (!strcmp(cmd, "phase") && arg && *arg) {
		mta_mark(MARK_PHASE, 0, arg);
	} else if (!strcmp(cmd, "counter") && arg && *arg) {
		struct mta_counter e = { 0 };
		long long v;

		val = strrchr(arg, ' ');
		if (!val)
			return -EINVAL;
		*val++ = 0;
		if (kstrtoll(val, 0, &v))
			return -EINVAL;
		e.value = (u64)v;
		mta_emit(MT_COUNTER, current->pid, &e, sizeof(e), strim(arg));
	} else if (!strcmp(cmd, "clock") && arg && *arg) {
		unsigned int ms;

		if (kstrtouint(arg, 0, &ms) || ms > 60000)
			return -EINVAL;
		mta_clock_set(ms);
	} else {
		return -EINVAL;
	}
	return count;
}

static ssize_t mta_proc_write(struct file *file, const char __user *ubuf, size_t count,
			     loff_t *ppos)
{
	return mta_command(ubuf, count, false);
}

static ssize_t mta_mark_write(struct file *file, const char __user *ubuf, size_t count,
			     loff_t *ppos)
{
	return mta_command(ubuf, count, true);
}

static int mta_proc_show(struct seq_file *m, void *v)
{
	int i;

	seq_printf(m, "version %d\nkernel %s\nmailbox_phys 0x%lx\nmailbox_size %lu\nslots %u\n",
		   MT_VERSION, UTS_RELEASE, mailbox_phys, mailbox_size, mta_nslots);
	seq_printf(m, "head %llu\ntail %llu\ndropped %llu\nnext_seq %llu\n", READ_ONCE(mta_head),
		   READ_ONCE(mta_ctrl->tail), READ_ONCE(mta_dropped), READ_ONCE(mta_seq));
	seq_printf(m, "skipped_in_exec %lld\ntrylock_fail %lld\n",
		   atomic64_read(&mta_stat_skipped_exec), atomic64_read(&mta_stat_trylock_fail));
	seq_printf(m, "clock_ms %u\n", READ_ONCE(mta_clock_ms));
	for (i = 0; i < ARRAY_SIZE(mta_tps); i++)
		seq_printf(m, "hook tracepoint %s %s\n", mta_tps[i].name,
			   mta_tps[i].tp ? "ok" : "missing");
	for (i = 0; i < ARRAY_SIZE(mta_krps); i++)
		seq_printf(m, "hook kretprobe %s %s nmissed=%d\n", mta_krps[i].symbol,
			   mta_krps[i].registered ? "ok" : "missing", mta_krps[i].krp.nmissed);
	return 0;
}

static int mta_proc_open(struct inode *inode, struct file *file)
{
	return single_open(file, mta_proc_show, NULL);
}

static const struct proc_ops mta_proc_ops = {
	.proc_open = mta_proc_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = mta_proc_write,
};

static const struct proc_ops mta_mark_ops = {
	.proc_write = mta_mark_write,
};

static struct proc_dir_entry *mta_proc, *mta_mark_proc;

/* ------------------------------------------------------------------ init / exit */

static void mta_unregister_all(void)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(mta_krps); i++) {
		if (mta_krps[i].registered) {
			unregister_kretprobe(&mta_krps[i].krp);
			mta_krps[i].registered = false;
		}
	}
	for (i = 0; i < ARRAY_SIZE(mta_tps); i++) {
		if (mta_tps[i].tp)
			tracepoint_probe_unregister(mta_tps[i].tp, mta_tps[i].probe, NULL);
	}
	tracepoint_synchronize_unregister();
}

static int mta_ring_init(void)
{
	u64 room;

	if (mailbox_size < MT_SLOTS_OFF + 16 * MT_SLOT) {
		pr_err("mailbox_size %lu too small\n", mailbox_size);
		return -EINVAL;
	}
	mta_base = memremap(mailbox_phys, mailbox_size, MEMREMAP_WB);
	if (!mta_base) {
		pr_err("cannot map the mailbox at 0x%lx (+%lu): is memmap=SIZE$PHYS on the command line?\n",
		       mailbox_phys, mailbox_size);
		return -ENOMEM;
	}
	mta_ctrl = mta_base;
	mta_slots = (u8 *)mta_base + MT_SLOTS_OFF;
	room = (mailbox_size - MT_SLOTS_OFF) / MT_SLOT;
	mta_nslots = 1U << ilog2(min_t(u64, room, 1U << 30));

	if (!memcmp(mta_ctrl->magic, MT_MAGIC, 8) && mta_ctrl->version == MT_VERSION &&
	    mta_ctrl->nslots == mta_nslots && mta_ctrl->head >= mta_ctrl->tail) {
		/* reloaded: continue the existing ring so the tracer sees one stream */
		mta_head = mta_ctrl->head;
		mta_seq = mta_ctrl->next_seq;
		mta_dropped = mta_ctrl->dropped;
		pr_info("continuing ring: head %llu seq %llu\n", mta_head, mta_seq);
	} else {
		memset(mta_base, 0, mailbox_size);
		mta_ctrl->version = MT_VERSION;
		mta_ctrl->nslots = mta_nslots;
		mta_head = mta_seq = mta_dropped = 0;
		smp_wmb();
		memcpy(mta_ctrl->magic, MT_MAGIC, 8);
	}
	smp_wmb();
	WRITE_ONCE(mta_ready, true);
	return 0;
}

static int __init mta_init(void)
{
	int i, ret;

	if (strcmp(utsname()->release, UTS_RELEASE)) {
		pr_err("built for kernel %s but running on %s: rebuild the agent (build_image.py)\n",
		       UTS_RELEASE, utsname()->release);
		return -EINVAL;
	}
	timer_setup(&mta_clock_timer, mta_clock_fn, 0);
	ret = mta_ring_init();
	if (ret)
		return ret;

	for_each_kernel_tracepoint(mta_find_tp, NULL);
	for (i = 0; i < ARRAY_SIZE(mta_tps); i++) {
		if (!mta_tps[i].tp) {
			pr_err("tracepoint %s not found\n", mta_tps[i].name);
			ret = -ENOENT;
			goto fail;
		}
		ret = tracepoint_probe_register(mta_tps[i].tp, mta_tps[i].probe, NULL);
		if (ret) {
			pr_err("tracepoint %s: register failed (%d)\n", mta_tps[i].name, ret);
			mta_tps[i].tp = NULL;
			goto fail;
		}
	}
	for (i = 0; i < ARRAY_SIZE(mta_krps); i++) {
		mta_krps[i].krp.kp.symbol_name = mta_krps[i].symbol;
		ret = register_kretprobe(&mta_krps[i].krp);
		if (ret) {
			pr_err("kretprobe %s: register failed (%d)\n", mta_krps[i].symbol, ret);
			if (mta_krps[i].required)
				goto fail;
			continue;
		}
		mta_krps[i].registered = true;
	}
	mta_proc = proc_create("memtrace", 0644, NULL, &mta_proc_ops);
	if (!mta_proc) {
		ret = -ENOMEM;
		goto fail;
	}
	if (mark_gid >= 0) {
		kgid_t gid = make_kgid(&init_user_ns, mark_gid);

		mta_mark_proc = gid_valid(gid) ?
			proc_create("memtrace-mark", 0220, NULL, &mta_mark_ops) : NULL;
		if (!mta_mark_proc) {
			proc_remove(mta_proc);
			ret = gid_valid(gid) ? -ENOMEM : -EINVAL;
			goto fail;
		}
		proc_set_user(mta_mark_proc, GLOBAL_ROOT_UID, gid);
	}
	pr_info("loaded: kernel %s, mailbox 0x%lx size %lu, %u slots, %zu tracepoints, %zu kretprobes\n",
		UTS_RELEASE, mailbox_phys, mailbox_size, mta_nslots, ARRAY_SIZE(mta_tps),
		ARRAY_SIZE(mta_krps));
	mta_state_dump();
	if (clock_ms)
		mta_clock_set(min(clock_ms, 60000U));
	return 0;
fail:
	mta_unregister_all();
	WRITE_ONCE(mta_ready, false);
	memunmap(mta_base);
	return ret;
}

static void __exit mta_exit(void)
{
	int i;

	proc_remove(mta_mark_proc);
	proc_remove(mta_proc);
	WRITE_ONCE(mta_clock_ms, 0);
	del_timer_sync(&mta_clock_timer);
	mta_unregister_all();
	WRITE_ONCE(mta_ready, false);
	synchronize_rcu();
	for (i = 0; i < ARRAY_SIZE(mta_krps); i++)
		if (mta_krps[i].krp.nmissed)
			pr_info("kretprobe %s missed %d\n", mta_krps[i].symbol,
				mta_krps[i].krp.nmissed);
	pr_info("unloaded: head %llu seq %llu dropped %llu\n", mta_head, mta_seq, mta_dropped);
	memunmap(mta_base);
}

module_init(mta_init);
module_exit(mta_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("memtrace guest agent: task, VMA and page-cache events to a mailbox ring");
