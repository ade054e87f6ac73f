//! Handing memory that a burst left behind back to the kernel.
//!
//! A burst of traffic grows the state's hash tables (their old arrays are
//! freed when they grow) and fills the writer's queue with rows that are
//! freed once written. glibc keeps freed memory in the free lists of the
//! arena of the thread that allocated it, where it counts in the resident
//! size until that thread allocates again: measured with 10,000 bots
//! registered at once, 7 MiB of a 42 MiB resident size was such free memory.
//! Large buffers (scrape bodies) are already served by `mmap` and return on
//! their own (`main` sets the threshold); this covers everything smaller.

/// Returns the free pages of every malloc arena to the kernel. It costs a
/// walk of the free lists under the arenas' locks, which is why it runs on
/// the writer thread once a burst is over (see `store::writer`), never on
/// the runtime threads and never per message.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's
    // own free lists under their locks; its result (whether anything was
    // released) is of no use here.
    unsafe {
        libc::malloc_trim(0);
    }
}
