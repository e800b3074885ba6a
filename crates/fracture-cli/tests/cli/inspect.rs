//! `inspect`: counts, skipped files, the preprocessing it reports.

use super::*;

#[test]
fn inspect_prints_counts_and_names_skipped_files() {
    let root = fresh_dir(&base(), "inspect");
    write_synthetic_dataset(&root, &SyntheticSpec::train_val((3, 5), (2, 2)));
    std::fs::write(
        root.join("train/fractured/broken.png"),
        b"\x89PNG\r\n\x1a\nbroken",
    )
    .unwrap();
    let out = fracture()
        .args(["inspect", "--image-size", "32", "--data"])
        .arg(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("warning: skipped") && stderr.contains("broken.png"),
        "{stderr}"
    );
    let train_row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("train "))
        .unwrap();
    let numbers: Vec<&str> = train_row.split_whitespace().collect();
    assert_eq!(numbers, ["train", "3", "5", "8"], "{stdout}");
    assert!(stdout.contains("skipped: 1"), "{stdout}");
}

#[test]
fn inspect_applies_the_models_preprocessing_unless_told_otherwise() {
    let root = fresh_dir(&base(), "inspect-model");
    write_synthetic_dataset(&root, &SyntheticSpec::train_val((1, 1), (1, 1)));
    let out = fracture()
        .args(["inspect", "--data"])
        .arg(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("preprocessing: 256×256") && stdout.contains("(the model's)"),
        "{stdout}"
    );
    assert!(stdout.contains("ready at 256×256"), "{stdout}");
    let out = fracture()
        .args(["inspect", "--image-size", "64", "--data"])
        .arg(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("preprocessing: 64×64") && !stdout.contains("the model's"),
        "{stdout}"
    );
}

#[test]
fn inspect_on_a_missing_folder_fails_with_a_clear_message() {
    let out = fracture()
        .args(["inspect", "--data", "/definitely/not/here"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/definitely/not/here") && stderr.contains("not found"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
