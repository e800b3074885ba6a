//! FracAtlas from a figshare stand-in on loopback (`fracture_testkit::KaggleStub`).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use fracture_fetch::{Error, Event, FracAtlasOptions, SplitPlan, fetch_fracatlas};
use fracture_testkit::{Announce, KaggleStub, StubOptions, fracatlas_shaped_zip, fresh_dir, zip_of};

const ARTICLE: &str = "figshare/22363012";

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracture-fetch-fracatlas")
}

fn stub(zip: Vec<u8>, announce: Announce) -> KaggleStub {
    KaggleStub::start(StubOptions {
        datasets: vec![(ARTICLE.into(), zip)],
        announce,
        ..StubOptions::default()
    })
    .unwrap()
}

fn options(stub: &KaggleStub, dest: PathBuf) -> FracAtlasOptions {
    FracAtlasOptions {
        api_base: stub.figshare_base_url.clone(),
        backoff: Duration::from_millis(10),
        ..FracAtlasOptions::new(dest)
    }
}

fn run(o: &FracAtlasOptions) -> (Result<fracture_fetch::FracAtlasFetched, Error>, Vec<String>) {
    let mut events = Vec::new();
    let r = fetch_fracatlas(o, &mut |e| {
        if let Event::Status(s) = e {
            events.push(s.to_string());
        }
    });
    (r, events)
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn the_release_downloads_splits_per_class_and_carries_boxes_and_flags() {
    let stub = stub(fracatlas_shaped_zip(20, 60, 32), Announce::Correct);
    let dir = fresh_dir(&base(), "success");
    let dest = dir.join("fracatlas");
    let (fetched, events) = run(&options(&stub, dest.clone()));
    let fetched = fetched.unwrap();
    assert!(!fetched.cached);
    // 70/15/15 per class: 20 fractured → 14/3/3, 60 intact → 42/9/9.
    assert_eq!(fetched.counts, [[14, 42], [3, 9], [3, 9]]);
    assert_eq!(count(&dest.join("train/fractured")), 14);
    assert_eq!(count(&dest.join("val/not fractured")), 9);
    assert_eq!(count(&dest.join("test/fractured")), 3);
    assert_eq!(fetched.boxes, 20);
    assert!(fetched.left_out.is_empty());
    // Boxes: one per fractured image, with the split it landed in.
    let boxes = std::fs::read_to_string(dest.join("boxes.csv")).unwrap();
    let mut lines = boxes.lines();
    assert_eq!(lines.next(), Some("id,split,x,y,w,h"));
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[2..], ["8.0", "8.0", "16.0", "8.0"]);
        let file = dest
            .join(cells[1])
            .join("fractured")
            .join(format!("{}.jpg", cells[0]));
        assert!(file.is_file(), "{line}: {} missing", file.display());
    }
    // Flags in the project's column order, the split beside each id.
    let meta = std::fs::read_to_string(dest.join("meta.csv")).unwrap();
    assert!(meta.starts_with(
        "id,split,hand,leg,hip,shoulder,mixed,hardware,multiscan,frontal,lateral,oblique,fractured,fracture_count\n"
    ));
    assert_eq!(meta.lines().count(), 81);
    assert!(meta.contains("IMG0000000,"), "{meta}");
    let readme = std::fs::read_to_string(dest.join("README.md")).unwrap();
    assert!(readme.contains("CC BY 4.0") && readme.contains("10.6084/m9.figshare.22363012"));
    assert!(!dir.join("fracatlas.zip").exists() && !dir.join("fracatlas.raw").exists());
    assert!(events.iter().any(|e| e.contains("FracAtlas.zip")), "{events:?}");
    // The API was asked once, then the file server.
    let requests = stub.requests();
    assert_eq!(requests[0].path, "/v2/articles/22363012");
    assert_eq!(requests.len(), 2);

    // A second call does nothing; another split is refused without --force, then redone with it.
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d.join("test/not fractured"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let first_test = listing(&dest);
    let (again, _) = run(&options(&stub, dest.clone()));
    assert!(again.unwrap().cached);
    assert_eq!(stub.requests().len(), 2);
    let mut other = options(&stub, dest.clone());
    other.split = SplitPlan {
        seed: 9,
        ..SplitPlan::default()
    };
    let (refused, _) = run(&other);
    let refused = refused.unwrap_err();
    let message = refused.to_string();
    assert!(
        matches!(refused, fracture_fetch::Error::SplitDiffers { seed: 2023, .. })
            && message.contains("seed 2023")
            && !message.contains("--"),
        "{message}"
    );
    other.force = true;
    let (redone, _) = run(&other);
    let redone = redone.unwrap();
    assert_eq!(redone.split.seed, 9);
    assert_eq!(
        redone.counts, fetched.counts,
        "the shares are the same, the draw is not"
    );
    assert_ne!(listing(&dest), first_test, "seed 9 draws another test set");
}

#[test]
fn the_same_seed_gives_the_same_split_in_another_folder() {
    let stub = stub(fracatlas_shaped_zip(6, 14, 24), Announce::Correct);
    let dir = fresh_dir(&base(), "same-seed");
    for name in ["a", "b"] {
        run(&options(&stub, dir.join(name))).0.unwrap();
    }
    let meta = |n: &str| std::fs::read_to_string(dir.join(n).join("meta.csv")).unwrap();
    assert_eq!(meta("a"), meta("b"));
}

#[test]
fn a_wrong_md5_is_refused_and_nothing_is_left() {
    let stub = stub(fracatlas_shaped_zip(2, 2, 16), Announce::Wrong);
    let dir = fresh_dir(&base(), "md5");
    let (r, _) = run(&options(&stub, dir.join("fracatlas")));
    let message = r.unwrap_err().to_string();
    assert!(message.contains("md5 checksum mismatch"), "{message}");
    assert_eq!(count(&dir), 0, "nothing left behind");
}

#[test]
fn a_release_without_dataset_csv_or_with_disagreeing_labels_is_a_clear_error() {
    let dir = fresh_dir(&base(), "bad-release");
    let no_csv = zip_of(&[("FracAtlas/images/Fractured/IMG0000001.jpg", b"x")]);
    let stub1 = stub(no_csv, Announce::Correct);
    let message = run(&options(&stub1, dir.join("a"))).0.unwrap_err().to_string();
    assert!(message.contains("no dataset.csv"), "{message}");
    assert!(!dir.join("a").exists() && !dir.join("a.new").exists());

    let csv = "image_id,fractured\nIMG0000001.jpg,0\n";
    let disagree = zip_of(&[
        ("FracAtlas/images/Fractured/IMG0000001.jpg", b"x"),
        ("FracAtlas/dataset.csv", csv.as_bytes()),
    ]);
    let stub2 = stub(disagree, Announce::Correct);
    let message = run(&options(&stub2, dir.join("b"))).0.unwrap_err().to_string();
    assert!(
        message.contains("IMG0000001") && message.contains("folder says otherwise"),
        "{message}"
    );
    assert!(!dir.join("b").exists());
}

#[test]
fn a_missing_article_and_a_user_folder_are_reported() {
    let stub = KaggleStub::start(StubOptions::default()).unwrap();
    let dir = fresh_dir(&base(), "missing");
    let message = run(&options(&stub, dir.join("fracatlas")))
        .0
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("HTTP 404") && message.contains("/v2/articles/22363012"),
        "{message}"
    );
    std::fs::create_dir_all(dir.join("mine")).unwrap();
    let message = run(&options(&stub, dir.join("mine"))).0.unwrap_err().to_string();
    assert!(message.contains("was not made by a download"), "{message}");
}
