//! Mutated zip archives through extraction: an error or files inside the destination, never a
//! panic or a write outside it. `cargo xtask fuzz --seconds N` runs the same property for longer.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use fracture_fetch::{ExtractLimits, extract_zip};
use fracture_testkit::{fresh_dir, fuzz_bytes, zip_of};

/// Every file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_below(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn extracting_mutated_archives_never_panics_or_escapes() {
    let root = fresh_dir(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")), "fetch-fuzz");
    let seeds = vec![
        zip_of(&[
            ("data/train/fractured/a.jpg", &[0xFF, 0xD8, 1, 2, 3][..]),
            (
                "data/val/not fractured/b.png",
                &[0x89, b'P', b'N', b'G', 9, 9, 9][..],
            ),
        ]),
        zip_of(&[(
            "one.txt",
            b"a longer text that deflates: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        )]),
    ];
    let limits = ExtractLimits {
        max_total_bytes: 1 << 20,
        max_entry_bytes: 1 << 20,
        ..ExtractLimits::default()
    };
    let archive = root.join("case.zip");
    let mut n = 0u64;
    // A seed whose entry climbs out of the destination, so mutations explore that path too.
    let seeds = [seeds, vec![zip_of(&[("../escape.txt", b"out")])]].concat();
    let cases = fuzz_bytes("extract", 20261201, &seeds, |bytes| {
        n += 1;
        std::fs::write(&archive, bytes).unwrap();
        // A cage around the destination: anything written beside it escaped.
        let cage = root.join(format!("cage-{n}"));
        let dest = cage.join("out");
        let _ = extract_zip(&archive, &dest, &limits);
        for f in files_below(&cage) {
            assert!(f.starts_with(&dest), "{} escaped the destination", f.display());
        }
        let _ = std::fs::remove_dir_all(&cage);
    });
    assert!(cases > 0);
    let left: Vec<PathBuf> = files_below(&root).into_iter().filter(|f| f != &archive).collect();
    assert!(left.is_empty(), "{left:?}");
}
