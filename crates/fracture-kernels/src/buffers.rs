//! A pool of f32 buffers reused across training steps, so the large intermediate activations of
//! the fused kernels are neither zero-filled by the allocator nor faulted in afresh every step.
//!
//! [`take`] hands out a buffer of the requested length whose contents are left over from earlier
//! use (every kernel that takes one overwrites it in full before reading it); [`give`] returns it.
//! Buffers handed to candle as op outputs simply leave the pool.

use std::sync::Mutex;

use rayon::prelude::*;

/// At most this many idle buffers are kept, and at most this many bytes in all.
const MAX_BUFFERS: usize = 96;
const MAX_BYTES: usize = 8 << 30;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` values with unspecified (but initialized) contents: the idle one whose
/// initialized length is the smallest that covers `len` (so it is only cut, never zero-extended);
/// failing that, the one with the longest initialized length among those whose capacity covers
/// `len` (only the difference is zero-filled); failing that, a new one (zero-filled in full).
///
/// Choosing by capacity instead cost a training step of EfficientNet-Lite0 a few percent: a large
/// buffer cut down for a small request came back short, and the next large request zero-filled it
/// up to its length again.
pub(crate) fn take(len: usize) -> Vec<f32> {
    let reused = POOL.lock().ok().and_then(|mut pool| {
        let covering = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        let best = covering.or_else(|| {
            pool.iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .max_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
        })?;
        Some(pool.swap_remove(best))
    });
    match reused {
        Some(mut buf) => {
            if buf.len() >= len {
                buf.truncate(len);
            } else {
                extend_with_zeros(&mut buf, len);
            }
            buf
        }
        None => zeros(len),
    }
}

/// A buffer of exactly `len` values for an op's output, which leaves the pool for good (candle
/// owns it): an idle one only when its capacity is within a quarter of `len`, else a new
/// (zero-filled) one. Taking a larger idle buffer here would hand its spare capacity to candle and
/// leave the next large request to zero-fill a new buffer of its own.
pub(crate) fn take_output(len: usize) -> Vec<f32> {
    let reused = POOL.lock().ok().and_then(|mut pool| {
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len && b.capacity() <= len + len / 4)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i)?;
        Some(pool.swap_remove(best))
    });
    match reused {
        Some(mut buf) => {
            buf.truncate(len);
            buf
        }
        None => zeros(len),
    }
}

/// A new buffer of `len` zeros; a large one is written by all threads. The caller is the thread
/// that runs an op (the others wait for its parallel part), and the allocator's own zeroing of
/// recycled memory ran there alone: about 1% of a training step's samples with one core idle.
fn zeros(len: usize) -> Vec<f32> {
    if len < PARALLEL_FROM {
        return vec![0.0; len];
    }
    let mut buf = Vec::with_capacity(len);
    extend_with_zeros(&mut buf, len);
    buf
}

/// From this many values on, zeros are written by all threads.
const PARALLEL_FROM: usize = 1 << 18;

/// Extends `buf` with zeros to `len` values (a pool buffer longer in capacity than in use), by all
/// threads where the extension is large, as [`zeros`].
fn extend_with_zeros(buf: &mut Vec<f32>, len: usize) {
    let more = len.saturating_sub(buf.len());
    if more < PARALLEL_FROM {
        buf.resize(buf.len() + more, 0.0);
    } else {
        buf.par_extend(rayon::iter::repeat_n(0.0f32, more));
    }
}

/// Returns a buffer to the pool (dropped instead when the pool is full).
pub(crate) fn give(buf: Vec<f32>) {
    if buf.capacity() == 0 {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        let bytes: usize = pool.iter().map(|b| b.capacity() * 4).sum();
        if pool.len() < MAX_BUFFERS && bytes + buf.capacity() * 4 <= MAX_BYTES {
            pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_the_requested_length() {
        let mut a = take(1000);
        a.iter_mut().for_each(|v| *v = 1.0);
        give(a);
        let b = take(600);
        assert_eq!(b.len(), 600);
        let c = take(2000);
        assert_eq!(c.len(), 2000);
        give(b);
        give(c);
        assert_eq!(take_output(700).len(), 700);
    }

    #[test]
    fn new_buffers_are_zeros_whether_written_by_one_thread_or_all() {
        for len in [0, 5, (1 << 18) - 1, 1 << 18, (1 << 20) + 3] {
            let z = zeros(len);
            assert_eq!(z.len(), len);
            assert!(z.iter().all(|&v| v == 0.0), "zeros({len})");
            // A used buffer of `len` ones, with room for more, extended with zeros.
            let mut b = Vec::with_capacity(len + (1 << 19));
            b.resize(len, 1.0f32);
            for more in [3, 1 << 19] {
                let mut e = b.clone();
                e.reserve(more);
                extend_with_zeros(&mut e, len + more);
                assert_eq!(e.len(), len + more);
                assert!(e[..len].iter().all(|&v| v == 1.0), "kept values, {len} + {more}");
                assert!(e[len..].iter().all(|&v| v == 0.0), "zeros after, {len} + {more}");
            }
        }
    }
}
