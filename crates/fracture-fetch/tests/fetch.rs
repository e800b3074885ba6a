//! Downloads against a Kaggle stand-in on loopback (`fracture_testkit::KaggleStub`).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fracture_fetch::{CredentialLookup, Error, Event, ExtractLimits, FetchOptions, fetch};
use fracture_testkit::{Announce, KaggleStub, StubOptions, fresh_dir, kaggle_shaped_zip, zip_of};

const DATASET: &str = "someone/bone-xrays";

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fracture-fetch-tests")
}

fn stub(zip: Vec<u8>, tweak: impl FnOnce(&mut StubOptions)) -> KaggleStub {
    let mut options = StubOptions {
        datasets: vec![(DATASET.into(), zip)],
        ..StubOptions::default()
    };
    tweak(&mut options);
    KaggleStub::start(options).unwrap()
}

fn options(stub: &KaggleStub, dest: PathBuf) -> FetchOptions {
    FetchOptions {
        base_url: stub.base_url.clone(),
        credentials: CredentialLookup::default(),
        backoff: Duration::from_millis(10),
        ..FetchOptions::new(DATASET.parse().unwrap(), dest)
    }
}

fn run(o: &FetchOptions) -> (Result<fracture_fetch::Fetched, Error>, Vec<String>) {
    let mut events = Vec::new();
    let r = fetch(o, &mut |e| {
        events.push(match e {
            Event::Status(s) => s.to_string(),
            Event::Retry { attempt, reason, .. } => format!("retry {attempt}: {reason}"),
            Event::Progress { .. } => "progress".into(),
        })
    });
    (r, events)
}

#[test]
fn a_public_dataset_downloads_extracts_and_is_cached() {
    let zip = kaggle_shaped_zip(2, 24);
    let stub = stub(zip.clone(), |_| {});
    let dir = fresh_dir(&base(), "success");
    let o = options(&stub, dir.join("bone-xrays"));
    let (fetched, events) = run(&o);
    let fetched = fetched.unwrap();
    assert!(!fetched.cached);
    assert_eq!(fetched.files, 12);
    assert_eq!(fetched.archive_bytes, zip.len() as u64);
    let nested =
        dir.join("bone-xrays/Bone_Fracture_Binary_Classification/Bone_Fracture_Binary_Classification");
    assert!(nested.join("test/not fractured/test_001.jpg").is_file());
    assert!(events.iter().any(|e| e == "progress"));
    assert!(!dir.join("bone-xrays.zip").exists() && !dir.join("bone-xrays.zip.part").exists());
    // The API was asked anonymously and redirected to another origin.
    let requests = stub.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].server, "api");
    assert!(requests.iter().all(|r| r.authorization.is_none()));
    // A second call does nothing.
    let (again, events) = run(&o);
    assert!(again.unwrap().cached);
    assert_eq!(stub.requests().len(), 2, "no request on the second call");
    assert!(events.iter().any(|e| e.contains("already in")), "{events:?}");
}

#[test]
fn refused_anonymously_then_accepted_with_credentials_which_never_reach_the_storage_host() {
    let stub = stub(kaggle_shaped_zip(1, 16), |o| {
        o.require_auth = Some("Basic dXNlcjprZXk=".into())
    });
    let dir = fresh_dir(&base(), "auth");
    let mut o = options(&stub, dir.join("data"));
    o.credentials = CredentialLookup {
        vars: [("KAGGLE_USERNAME", "user"), ("KAGGLE_KEY", "key")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        home: Some(dir.clone()),
    };
    let (fetched, events) = run(&o);
    assert!(fetched.is_ok(), "{fetched:?}");
    assert!(
        events
            .iter()
            .any(|e| e.contains("anonymous access refused (HTTP 403)") && e.contains("KAGGLE_USERNAME")),
        "{events:?}"
    );
    let requests = stub.requests();
    let api: Vec<_> = requests.iter().filter(|r| r.server == "api").collect();
    assert_eq!(api.len(), 2);
    assert_eq!(api[0].authorization, None);
    assert_eq!(api[1].authorization.as_deref(), Some("Basic dXNlcjprZXk="));
    let storage: Vec<_> = requests.iter().filter(|r| r.server == "storage").collect();
    assert!(!storage.is_empty());
    assert!(
        storage.iter().all(|r| r.authorization.is_none()),
        "credentials leaked to the storage host: {storage:?}"
    );
    // No credential anywhere: the error lists the sources looked at, never a value.
    let dir2 = fresh_dir(&base(), "auth-none");
    let mut o2 = options(&stub, dir2.join("data"));
    o2.credentials = CredentialLookup {
        vars: Default::default(),
        home: Some(dir2.clone()),
    };
    let err = run(&o2).0.unwrap_err().to_string();
    assert!(
        err.contains("HTTP 403") && err.contains("KAGGLE_API_TOKEN") && err.contains("kaggle.json"),
        "{err}"
    );
    assert!(err.contains("accept the dataset's terms"), "{err}");
    // A wrong credential: the message names the source used, not the secret.
    let mut o3 = options(&stub, fresh_dir(&base(), "auth-wrong").join("data"));
    o3.credentials = CredentialLookup {
        vars: [("KAGGLE_API_TOKEN", "s3cret-token")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        home: None,
    };
    let err = run(&o3).0.unwrap_err().to_string();
    assert!(
        err.contains("used KAGGLE_API_TOKEN") && !err.contains("s3cret"),
        "{err}"
    );
}

#[test]
fn a_dropped_connection_resumes_with_a_range_request() {
    let zip = kaggle_shaped_zip(3, 32);
    let cut = zip.len() / 3;
    let stub = stub(zip.clone(), |o| {
        o.drop_first_download_after = Some(cut);
        o.unavailable_first = 1;
    });
    let dir = fresh_dir(&base(), "resume");
    let (fetched, events) = run(&options(&stub, dir.join("data")));
    assert_eq!(fetched.unwrap().archive_bytes, zip.len() as u64);
    assert!(
        events.iter().any(|e| e.starts_with("retry 1: HTTP 503")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("dropped after") || e.contains("closed before")),
        "{events:?}"
    );
    let ranges: Vec<_> = stub
        .requests()
        .into_iter()
        .filter(|r| r.server == "storage")
        .filter_map(|r| r.range)
        .collect();
    assert_eq!(
        ranges,
        vec![format!("bytes={cut}-")],
        "resumed from the bytes already received: {events:?}"
    );
}

#[test]
fn a_checksum_mismatch_is_retried_once_then_reported() {
    let stub = stub(kaggle_shaped_zip(1, 16), |o| o.announce = Announce::Wrong);
    let dir = fresh_dir(&base(), "checksum");
    let (r, events) = run(&options(&stub, dir.join("data")));
    let err = r.unwrap_err();
    assert!(matches!(err, Error::Checksum { algorithm: "md5", .. }), "{err}");
    assert!(
        events.iter().any(|e| e.contains("downloading again")),
        "{events:?}"
    );
    assert!(!dir.join("data").exists() && !dir.join("data.zip.part").exists());
}

#[test]
fn corrupt_archives_extract_nothing() {
    // Not a zip at all.
    let stub1 = stub(b"PK\x03\x04 this is not really a zip".to_vec(), |_| {});
    let dir = fresh_dir(&base(), "corrupt");
    let err = run(&options(&stub1, dir.join("data"))).0.unwrap_err();
    assert!(
        matches!(err, Error::Archive { .. }) && err.to_string().contains("not a readable zip"),
        "{err}"
    );
    assert!(!dir.join("data").exists());
    // A valid zip whose file data was damaged: the entry's CRC-32 catches it.
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut zip = zip_of(&[("train/fractured/a.bin", &payload)]);
    zip[200] ^= 0xff;
    let stub2 = stub(zip, |o| o.announce = Announce::Nothing);
    let err = run(&options(&stub2, dir.join("data2")))
        .0
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt") || err.contains("checksum") || err.contains("not a readable zip"),
        "{err}"
    );
    assert!(!dir.join("data2").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "nothing left behind: {leftovers:?}");
}

#[test]
fn zip_slip_symlinks_and_zip_bombs_are_refused() {
    let dir = fresh_dir(&base(), "unsafe");
    let slip = zip_of(&[("ok.txt", b"fine"), ("../escaped.txt", b"evil")]);
    let stub1 = stub(slip, |_| {});
    let err = run(&options(&stub1, dir.join("slip/data")))
        .0
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("../escaped.txt") && err.contains("zip slip"),
        "{err}"
    );
    assert!(!dir.join("slip/escaped.txt").exists() && !dir.join("escaped.txt").exists());

    let absolute = zip_of(&[("/tmp/absolute.txt", b"evil")]);
    let stub2 = stub(absolute, |_| {});
    let err = run(&options(&stub2, dir.join("abs/data")))
        .0
        .unwrap_err()
        .to_string();
    assert!(err.contains("absolute path"), "{err}");

    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    writer
        .add_symlink("link", "/etc/passwd", zip::write::SimpleFileOptions::default())
        .unwrap();
    let link = writer.finish().unwrap().into_inner();
    let stub3 = stub(link, |_| {});
    let err = run(&options(&stub3, dir.join("link/data")))
        .0
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");

    // 64 MiB of zeros deflates to about 64 KiB: a ratio near 1000.
    let zeros = vec![0u8; 64 << 20];
    let bomb = zip_of(&[("bomb.bin", &zeros)]);
    let stub4 = stub(bomb, |_| {});
    let err = run(&options(&stub4, dir.join("bomb/data")))
        .0
        .unwrap_err()
        .to_string();
    assert!(err.contains("zip bomb"), "{err}");
    // And a total-size limit, for bombs made of many ordinary entries.
    let stub5 = stub(kaggle_shaped_zip(2, 16), |_| {});
    let mut o = options(&stub5, dir.join("total/data"));
    o.limits = ExtractLimits {
        max_total_bytes: 1000,
        ..ExtractLimits::default()
    };
    let err = run(&o).0.unwrap_err().to_string();
    assert!(err.contains("inflates to more than 1000 bytes"), "{err}");
}

#[test]
fn an_unknown_slug_is_a_404_naming_the_dataset() {
    let stub = stub(kaggle_shaped_zip(1, 16), |_| {});
    let dir = fresh_dir(&base(), "404");
    let mut o = options(&stub, dir.join("data"));
    o.dataset = "someone/no-such-dataset".parse().unwrap();
    let err = run(&o).0.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("someone/no-such-dataset"), "{err}");
}

#[test]
fn an_unreachable_server_fails_fast_and_names_the_alternative() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = fresh_dir(&base(), "offline");
    let o = FetchOptions {
        base_url: format!("http://127.0.0.1:{port}/api/v1"),
        credentials: CredentialLookup::default(),
        ..FetchOptions::new(DATASET.parse().unwrap(), dir.join("data"))
    };
    let start = Instant::now();
    let err = run(&o).0.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains("download the dataset elsewhere"),
        "{err}"
    );
}

#[test]
fn an_existing_folder_is_not_overwritten_without_force() {
    let stub = stub(kaggle_shaped_zip(1, 16), |_| {});
    let dir = fresh_dir(&base(), "exists");
    std::fs::create_dir_all(dir.join("data/train")).unwrap();
    std::fs::write(dir.join("data/train/mine.txt"), b"keep me").unwrap();
    let mut o = options(&stub, dir.join("data"));
    let err = run(&o).0.unwrap_err();
    assert!(matches!(err, Error::DestinationExists { .. }), "{err}");
    assert!(dir.join("data/train/mine.txt").is_file());
    o.force = true;
    assert!(run(&o).0.is_ok());
    assert!(!dir.join("data/train/mine.txt").exists());
}
