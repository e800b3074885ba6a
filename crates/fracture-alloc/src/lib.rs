#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use mimalloc::MiMalloc;

/// Tells mimalloc to keep freed memory mapped instead of returning it to the OS 10 ms later: a
/// training step frees and re-allocates the same tens of megabytes, and handing them back costs a
/// page fault per 4 KiB on every step (about 8% of a 128 px step on 2 cores). Peak memory is
/// unchanged; the resident size simply stays at the peak. For training, evaluation and benchmarks.
pub fn keep_freed_memory() {
    set_purge_delay(-1);
}

/// Tells mimalloc to return memory to the OS one second after it is freed: a server's load comes in
/// bursts (10,000 idle connections, then none). With mimalloc's default the soak (`cargo xtask
/// soak`) measured the resident size 67% above its start after the connections closed; with a
/// delay of 0, 11% but a third fewer predictions (buffers faulted in again every request); with one
/// second, 8% and most of the throughput. For `fracture serve`.
pub fn return_freed_memory() {
    set_purge_delay(1000);
}

/// Sets mimalloc's `mi_option_purge_delay` (milliseconds; -1 = never purge).
#[allow(unsafe_code)]
fn set_purge_delay(ms: std::os::raw::c_long) {
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: `mi_option_set` only stores an integer option; it is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, ms) };
}
