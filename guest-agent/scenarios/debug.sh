# debug: print guest facts useful when porting the agent
cat /proc/filesystems | tr '\n' ' '; echo
cat /proc/mounts
grep -E 'Shmem|Cached|MemFree' /proc/meminfo
cat /proc/memtrace
for s in mmap_region do_mas_munmap mprotect_fixup shmem_add_to_page_cache __x64_sys_brk __x64_sys_mremap do_brk_flags filemap_add_folio ksm_madvise; do grep " $s$" /proc/kallsyms; done
