//! Multi-index hashing: every fingerprint within Hamming distance 7 of a probe, without comparing the
//! probe with every fingerprint.
//!
//! The 64 bits are cut into four 16-bit chunks, each with its own table of fingerprints by chunk
//! value. Two hashes at most 7 bits apart differ in at most one bit in some chunk (four chunks of two
//! or more differing bits make 8), so looking up each chunk's value and its 16 one-bit neighbours finds
//! them all: 68 buckets per probe instead of the whole list.
//!
//! Probes and fingerprints are 63-bit perceptual hashes ([`super::signature`]).

use rayon::prelude::*;

use super::signature::hamming;

/// The largest distance a query is guaranteed to find every fingerprint within.
pub const MAX_RADIUS: u32 = 7;
const CHUNKS: usize = 4;
const BUCKETS: usize = 1 << 16;

/// Fingerprints indexed for radius queries.
#[derive(Debug, Clone)]
pub struct FingerprintIndex {
    fingerprints: Vec<u64>,
    /// Per chunk: `starts[c][k]..starts[c][k + 1]` is the range of `ids[c]` whose chunk `c` is `k`.
    starts: Vec<Vec<u32>>,
    ids: Vec<Vec<u32>>,
}

fn chunk(hash: u64, c: usize) -> usize {
    ((hash >> (16 * c)) & 0xFFFF) as usize
}

impl FingerprintIndex {
    /// Indexes `fingerprints`; a query answers with positions in this slice.
    pub fn new(fingerprints: &[u64]) -> Self {
        let mut starts = Vec::with_capacity(CHUNKS);
        let mut ids = Vec::with_capacity(CHUNKS);
        for c in 0..CHUNKS {
            let mut counts = vec![0u32; BUCKETS + 1];
            for &f in fingerprints {
                counts[chunk(f, c) + 1] += 1;
            }
            for k in 0..BUCKETS {
                counts[k + 1] += counts[k];
            }
            let mut next = counts.clone();
            let mut bucketed = vec![0u32; fingerprints.len()];
            for (i, &f) in fingerprints.iter().enumerate() {
                let slot = &mut next[chunk(f, c)];
                bucketed[*slot as usize] = i as u32;
                *slot += 1;
            }
            starts.push(counts);
            ids.push(bucketed);
        }
        FingerprintIndex {
            fingerprints: fingerprints.to_vec(),
            starts,
            ids,
        }
    }

    /// Number of indexed fingerprints.
    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    /// Every indexed fingerprint within `radius` (at most [`MAX_RADIUS`]) of any of `probes`, with
    /// the smallest distance and the first probe that reaches it, sorted by position. `seen` is
    /// scratch space of the index's length (reused across queries: pass the same vector).
    pub fn query(&self, probes: &[u64], radius: u32, seen: &mut Vec<u32>) -> Vec<Match> {
        let radius = radius.min(MAX_RADIUS);
        if seen.len() != self.len() {
            *seen = vec![u32::MAX; self.len()];
        }
        let mut found: Vec<Match> = Vec::new();
        for (p, &probe) in probes.iter().enumerate() {
            for c in 0..CHUNKS {
                let key = chunk(probe, c);
                for flip in 0..=16 {
                    let k = if flip == 16 { key } else { key ^ (1 << flip) };
                    let (a, b) = (self.starts[c][k] as usize, self.starts[c][k + 1] as usize);
                    for &id in &self.ids[c][a..b] {
                        let d = hamming(probe, self.fingerprints[id as usize]);
                        if d > radius {
                            continue;
                        }
                        let slot = &mut seen[id as usize];
                        if *slot == u32::MAX {
                            *slot = found.len() as u32;
                            found.push(Match {
                                target: id,
                                distance: d,
                                probe: p as u32,
                            });
                        } else {
                            let entry = &mut found[*slot as usize];
                            if d < entry.distance || (d == entry.distance && (p as u32) < entry.probe) {
                                entry.distance = d;
                                entry.probe = p as u32;
                            }
                        }
                    }
                }
            }
        }
        for m in &found {
            seen[m.target as usize] = u32::MAX;
        }
        found.sort_unstable_by_key(|m| m.target);
        found
    }
}

/// A fingerprint found by a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    /// Its position in the index.
    pub target: u32,
    /// The smallest Hamming distance of a probe to it.
    pub distance: u32,
    /// The first probe at that distance (its position in the query's probes).
    pub probe: u32,
}

/// For every image `i`, the fingerprints of other images within `radius` of one of `probes[i]`:
/// `(i, match)`, in parallel over the images, sorted by `i`, then target.
pub fn candidates<P: AsRef<[u64]> + Sync>(
    fingerprints: &[u64],
    probes: &[P],
    radius: u32,
) -> Vec<(u32, Match)> {
    let index = FingerprintIndex::new(fingerprints);
    probes
        .par_iter()
        .enumerate()
        .map_init(Vec::new, |seen, (i, p)| {
            index
                .query(p.as_ref(), radius, seen)
                .into_iter()
                .filter(|m| m.target as usize != i)
                .map(|m| (i as u32, m))
                .collect::<Vec<_>>()
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn queries_find_exactly_what_a_linear_scan_finds() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut fingerprints: Vec<u64> = (0..3000).map(|_| rng.random()).collect();
        // Plant neighbours at every distance up to 9.
        for d in 0..10u32 {
            let base = fingerprints[d as usize];
            let mut copy = base;
            for b in 0..d {
                copy ^= 1 << (b * 6 + 1);
            }
            fingerprints.push(copy);
        }
        let index = FingerprintIndex::new(&fingerprints);
        let mut seen = Vec::new();
        for radius in [0, 3, 5, 7] {
            for q in 0..fingerprints.len() {
                let probes = [fingerprints[q], fingerprints[q] ^ 0b1011];
                let expected: Vec<(u32, u32)> = (0..fingerprints.len())
                    .filter_map(|i| {
                        let d = probes.iter().map(|&p| hamming(p, fingerprints[i])).min()?;
                        (d <= radius).then_some((i as u32, d))
                    })
                    .collect();
                let got: Vec<(u32, u32)> = index
                    .query(&probes, radius, &mut seen)
                    .iter()
                    .map(|m| (m.target, m.distance))
                    .collect();
                assert_eq!(got, expected, "radius {radius}, query {q}");
            }
        }
    }

    #[test]
    fn candidates_leave_out_the_image_itself_and_name_the_probe() {
        let fingerprints = vec![0u64, 0b111, u64::MAX];
        let probes: Vec<Vec<u64>> = vec![vec![u64::MAX, 0], vec![0b111], vec![u64::MAX]];
        let found = candidates(&fingerprints, &probes, 3);
        assert_eq!(
            found,
            vec![
                (
                    0,
                    Match {
                        target: 1,
                        distance: 3,
                        probe: 1
                    }
                ),
                (
                    0,
                    Match {
                        target: 2,
                        distance: 0,
                        probe: 0
                    }
                ),
                (
                    1,
                    Match {
                        target: 0,
                        distance: 3,
                        probe: 0
                    }
                ),
            ]
        );
    }
}
