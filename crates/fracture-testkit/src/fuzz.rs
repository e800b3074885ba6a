//! A small mutation fuzzer for the bytes our readers take in (images, model files, archives).
//!
//! [`fuzz_bytes`] feeds a property mutated copies of valid inputs — bit flips, byte overwrites with
//! boundary values, truncations, duplicated and deleted runs, splices of two inputs — and pure
//! random bytes, all from a seeded generator, and catches panics. In `cargo test` it runs a bounded
//! number of cases ([`DEFAULT_CASES`], or `FRACTURE_FUZZ_CASES`); with `FRACTURE_FUZZ_SECONDS` set
//! (`cargo xtask fuzz --seconds N`) it runs for that long instead. A panicking input is written to
//! `<system temp>/fracture-fuzz-failures/<name>-<case>.bin` and the panic is reported with its case number.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// Cases per property in an ordinary test run.
pub const DEFAULT_CASES: u64 = 300;

/// SplitMix64: a tiny seeded generator, enough to pick mutations reproducibly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutated input: a copy of a seed changed by one to four mutations, or random bytes.
fn mutate(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    if seeds.is_empty() || rng.below(16) == 0 {
        let len = rng.below(4096);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            break;
        }
        let at = rng.below(data.len());
        match rng.below(7) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE][rng.below(6)],
            2 => data.truncate(at),
            3 => {
                let end = (at + 1 + rng.below(64)).min(data.len());
                let run = data[at..end].to_vec();
                let to = rng.below(data.len());
                data.splice(to..to, run);
            }
            4 => {
                let end = (at + 1 + rng.below(256)).min(data.len());
                data.drain(at..end);
            }
            5 => {
                // Overwrite four bytes with a large or small length-like value.
                let v: u32 = [0, 1, u32::MAX, 0x7FFF_FFFF, 1 << 16, 65_535][rng.below(6)];
                for (i, b) in v.to_be_bytes().iter().enumerate() {
                    if let Some(d) = data.get_mut(at + i) {
                        *d = *b;
                    }
                }
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len().max(1));
                data.truncate(at);
                data.extend_from_slice(&other[from.min(other.len())..]);
            }
        }
    }
    data
}

/// How many cases and for how long, from the environment.
fn budget() -> (u64, Option<Duration>) {
    let seconds = std::env::var("FRACTURE_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0);
    match seconds {
        Some(s) => (u64::MAX, Some(Duration::from_secs_f64(s))),
        None => {
            let cases = std::env::var("FRACTURE_FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_CASES);
            (cases, None)
        }
    }
}

/// Runs `property` on mutated copies of `seeds` (see the module docs) and returns the number of
/// cases that ran clean. Panics, naming the case and the file holding its input, when the property
/// panics; `name` labels the property in that report and in the printed count.
// The count goes to the test's output, where `cargo xtask fuzz` and `--nocapture` show it.
#[allow(clippy::print_stdout)]
pub fn fuzz_bytes(name: &str, seed: u64, seeds: &[Vec<u8>], mut property: impl FnMut(&[u8])) -> u64 {
    let (cases, time) = budget();
    let start = Instant::now();
    let mut rng = Rng(seed);
    let mut done = 0u64;
    while done < cases && time.is_none_or(|t| start.elapsed() < t) {
        let input = mutate(seeds, &mut rng);
        if catch_unwind(AssertUnwindSafe(|| property(&input))).is_err() {
            let dir = std::env::temp_dir().join("fracture-fuzz-failures");
            let file = dir.join(format!("{name}-{done}.bin"));
            let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, &input));
            panic!(
                "fuzz property `{name}` panicked on case {done}; input kept in {}",
                file.display()
            );
        }
        done += 1;
    }
    println!(
        "fuzz {name}: {done} cases clean in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_reproducible_and_varied() {
        let seeds = vec![b"hello, fuzzer: a valid input of a few bytes".to_vec()];
        let run = |seed| {
            let mut rng = Rng(seed);
            (0..50).map(|_| mutate(&seeds, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let distinct: std::collections::HashSet<Vec<u8>> = run(7).into_iter().collect();
        assert!(distinct.len() > 40, "{}", distinct.len());
    }

    #[test]
    fn a_panicking_property_is_reported() {
        let result =
            std::panic::catch_unwind(|| fuzz_bytes("always-panics", 1, &[vec![1, 2, 3]], |_| panic!("boom")));
        assert!(result.is_err());
    }
}
