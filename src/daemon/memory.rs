//! Giving freed memory back to the kernel, with glibc's allocator.
//!
//! Loading 100,000 schedules allocates and frees tens of megabytes of rows
//! and parses while keeping a few megabytes. By default glibc raises its
//! mmap threshold each time a large block is freed (up to 32 MiB) and its
//! trim threshold to twice that, so after the load large blocks come from
//! a thread's arena, and that arena's top, which `malloc_trim` does not
//! trim outside the main arena, stays resident: freed memory of the load,
//! a sizeable share of what the schedules themselves keep. Fixed at
//! glibc's own starting values, large blocks keep their own mappings
//! (unmapped when freed) and arena tops are trimmed past 128 KiB.

/// glibc's default for both thresholds, fixed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const THRESHOLD: libc::c_int = 128 * 1024;

/// Fixes the allocator's thresholds; called once, at start.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; both are valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
    }
}

/// Returns free pages inside the arenas to the kernel, after a phase that
/// freed much more than it kept.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
