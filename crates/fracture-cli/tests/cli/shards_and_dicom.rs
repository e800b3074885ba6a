//! Sharded batch jobs and DICOM results.

use super::predict_files::parse_csv;
use super::*;

/// The rows of a JSON Lines file as `path → P(fractured)`, each row's shard checked against `shard`.
pub(crate) fn jsonl_rows(
    path: &std::path::Path,
    shard: Option<&str>,
) -> std::collections::BTreeMap<String, f64> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows = std::collections::BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(v["shard"].as_str(), shard, "{line}");
        let path = v["path"].as_str().unwrap().to_string();
        assert!(
            rows.insert(path, v["p_fractured"].as_f64().unwrap()).is_none(),
            "a row written twice: {line}"
        );
    }
    rows
}

#[test]
fn four_shards_one_killed_and_resumed_merge_into_the_single_run() {
    use std::process::Stdio;

    let root = fresh_dir(&base(), "shards");
    let images = root.join("archive");
    for (i, region) in ["hand", "leg", "hip", "shoulder"].iter().enumerate() {
        let dir = images.join(region);
        std::fs::create_dir_all(&dir).unwrap();
        for j in 0..10u64 {
            let seed = (i as u64) * 100 + j;
            fracture_testkit::synthetic_xray(96, 80, seed.is_multiple_of(2), seed)
                .save(dir.join(format!("img{j:02}.png")))
                .unwrap();
        }
    }
    // The built-in model, so each image takes long enough to be killed between rows.
    let predict = |extra: &[&str], out: &std::path::Path| {
        let mut cmd = fracture();
        cmd.args(["predict", "--no-evidence", "--batch-size", "1"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .arg(&images);
        cmd
    };
    let single = root.join("single.jsonl");
    let out = predict(&["--format", "jsonl"], &single).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = jsonl_rows(&single, None);
    assert_eq!(want.len(), 40);
    // Writing over an existing result file is refused.
    let again = predict(&[], &single).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let shard_file = |i: usize| root.join(format!("shard-{i}.jsonl"));
    let mut sizes = Vec::new();
    for i in 0..4 {
        let spec = format!("{i}/4");
        let args = ["--shard", spec.as_str()];
        if i == 2 {
            // Killed (SIGKILL) as soon as its first rows are out, then resumed.
            let mut child = predict(&args, &shard_file(i))
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let start = std::time::Instant::now();
            let finished_first = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                let lines = std::fs::read_to_string(shard_file(i))
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
                if lines >= 2 || start.elapsed().as_secs() > 120 {
                    break None;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            };
            if finished_first.is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
            }
            let text = std::fs::read_to_string(shard_file(i)).unwrap();
            let mut whole = text.lines().count() - usize::from(!text.is_empty() && !text.ends_with('\n'));
            if finished_first.is_some() || whole == 0 {
                // The shard beat the kill: cut it as a kill would have, mid-row after one row.
                let first = text.lines().next().unwrap();
                std::fs::write(shard_file(i), format!("{first}\n{{\"path\":\"cut off")).unwrap();
                whole = 1;
            }
            let resumed = predict(&["--shard", "2/4", "--resume"], &shard_file(i))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&resumed.stderr);
            assert!(resumed.status.success(), "{stderr}");
            let rows = jsonl_rows(&shard_file(i), Some("2/4"));
            assert!(
                stderr.contains(&format!(
                    "{} images to predict, {whole} already written",
                    rows.len() - whole
                )),
                "the resumed shard redoes only what was not written: {stderr}"
            );
        } else {
            let out = predict(&args, &shard_file(i)).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        sizes.push(jsonl_rows(&shard_file(i), Some(spec.as_str())).len());
    }
    assert_eq!(
        sizes.iter().sum::<usize>(),
        40,
        "the shards split the images: {sizes:?}"
    );
    assert!(sizes.iter().all(|&n| n > 0), "{sizes:?}");

    let merged = root.join("merged.jsonl");
    let out = fracture()
        .args(["merge", "--out"])
        .arg(&merged)
        .args((0..4).map(shard_file))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&merged).unwrap();
    let mut got = std::collections::BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        got.insert(
            v["path"].as_str().unwrap().to_string(),
            v["p_fractured"].as_f64().unwrap(),
        );
    }
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (path, p) in &want {
        // Alone or in a shard, an image passes through the network the same way (batches of one).
        assert!((got[path] - p).abs() <= 1e-6, "{path}: {} vs {p}", got[path]);
    }
    // A shard left out is a gap; a shard given twice an overlap.
    let out = fracture()
        .args(["merge", "--out"])
        .arg(root.join("gap.jsonl"))
        .args((0..3).map(shard_file))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shard(s) 3 of 4"));
    let out = fracture()
        .args(["merge", "--out"])
        .arg(root.join("twice.jsonl"))
        .args([shard_file(0), shard_file(1), shard_file(0)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in both"));
}

#[test]
fn shard_auto_reads_the_schedulers_index_and_csv_rows_carry_the_shard() {
    let root = fresh_dir(&base(), "shard-auto");
    let images = root.join("xr");
    std::fs::create_dir_all(&images).unwrap();
    for j in 0..6u64 {
        fracture_testkit::synthetic_xray(64, 64, j.is_multiple_of(2), j)
            .save(images.join(format!("a{j}.png")))
            .unwrap();
    }
    let run = |env: &[(&str, &str)], out: &str| {
        let mut cmd = fracture();
        cmd.args(["predict", "--no-evidence", "--shard", "auto/2", "--out"])
            .arg(root.join(out))
            .arg(&images)
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("SLURM_ARRAY_TASK_MIN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    // A file named .csv written as JSON Lines would be misread by merge: refused.
    let mismatch = fracture()
        .args(["predict", "--format", "jsonl", "--out"])
        .arg(root.join("rows.csv"))
        .arg(&images)
        .output()
        .unwrap();
    assert!(!mismatch.status.success());
    assert!(String::from_utf8_lossy(&mismatch.stderr).contains("disagree"));
    let none = run(&[], "none.csv");
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("JOB_COMPLETION_INDEX"));
    let k8s = run(&[("JOB_COMPLETION_INDEX", "1")], "k8s.csv");
    assert!(k8s.status.success(), "{}", String::from_utf8_lossy(&k8s.stderr));
    // Slurm arrays numbered from 1: task 2 of 1-2 is shard 1.
    let slurm = run(
        &[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_MIN", "1")],
        "slurm.csv",
    );
    assert!(
        slurm.status.success(),
        "{}",
        String::from_utf8_lossy(&slurm.stderr)
    );
    let k8s_rows = parse_csv(&std::fs::read_to_string(root.join("k8s.csv")).unwrap());
    let slurm_rows = parse_csv(&std::fs::read_to_string(root.join("slurm.csv")).unwrap());
    assert_eq!(k8s_rows[0].last().map(String::as_str), Some("shard"));
    assert!(
        k8s_rows[1..]
            .iter()
            .all(|r| r.last().map(String::as_str) == Some("1/2"))
    );
    assert_eq!(k8s_rows, slurm_rows);
}

/// A 12-bit DICOM radiograph with study, series and instance UIDs and fictitious patient
/// attributes, written to `path`; returns its (study, series, instance) UIDs.
pub(crate) fn dicom_with_uids(path: &std::path::Path) -> (String, String, String) {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let xray = fracture_testkit::synthetic_xray(200, 160, true, 11);
    let samples: Vec<i32> = xray.as_raw().iter().map(|&v| i32::from(v) * 16).collect();
    let spec = fracture_testkit::dicom::DicomSpec {
        window: Some((2048.0, 4096.0)),
        ..fracture_testkit::dicom::DicomSpec::twelve_bit((200, 160))
    };
    let uids = (
        "1.2.826.0.1.3680043.2.1125.7.1".to_string(),
        "1.2.826.0.1.3680043.2.1125.7.2".to_string(),
        "1.2.826.0.1.3680043.2.1125.1.1".to_string(),
    );
    let bytes =
        fracture_testkit::dicom::edit_dicom(&fracture_testkit::dicom::dicom_bytes(&samples, &spec), |obj| {
            obj.put(DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(uids.0.as_str()),
            ));
            obj.put(DataElement::new(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(uids.1.as_str()),
            ));
            obj.put(DataElement::new(
                tags::PATIENT_SEX,
                VR::CS,
                PrimitiveValue::from("F"),
            ));
        });
    std::fs::write(path, bytes).unwrap();
    uids
}

#[test]
fn dicom_inputs_get_a_secondary_capture_in_their_study() {
    use dicom_dictionary_std::tags;
    let root = fresh_dir(&base(), "dicom-out");
    let inputs = root.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let (study, series, instance) = dicom_with_uids(&inputs.join("hand.dcm"));
    fracture_testkit::synthetic_xray(64, 64, false, 3)
        .save(inputs.join("plain.png"))
        .unwrap();
    let out_dir = root.join("sc");
    let out = fracture()
        .args(["predict", "--format", "json", "--dicom-out"])
        .arg(&out_dir)
        .arg(&inputs)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("wrote 1 DICOM secondary captures"), "{stderr}");
    for secret in ["Doe", "Jane", "PID-0042-SECRET", "ACC-77-SECRET", "19700101"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
    let written: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(written, vec![out_dir.join("hand.fracture.dcm")]);
    let obj = dicom_object::open_file(&written[0]).unwrap();
    let text = |tag| {
        obj.element(tag)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .trim()
            .to_string()
    };
    assert_eq!(text(tags::SOP_CLASS_UID), "1.2.840.10008.5.1.4.1.1.7");
    assert_eq!(text(tags::STUDY_INSTANCE_UID), study);
    assert!(text(tags::SERIES_INSTANCE_UID).starts_with("2.25."));
    assert_ne!(text(tags::SERIES_INSTANCE_UID), series);
    assert!(text(tags::SOP_INSTANCE_UID).starts_with("2.25."));
    assert_eq!(
        obj.meta().media_storage_sop_instance_uid().trim_end_matches('\0'),
        text(tags::SOP_INSTANCE_UID)
    );
    assert_eq!(text(tags::PATIENT_NAME), "Doe^Jane");
    assert_eq!(text(tags::PATIENT_ID), "PID-0042-SECRET");
    assert_eq!(text(tags::BURNED_IN_ANNOTATION), "YES");
    assert!(text(tags::IMAGE_COMMENTS).contains("Not for diagnostic use"));
    let source = obj.element(tags::SOURCE_IMAGE_SEQUENCE).unwrap().items().unwrap()[0]
        .element(tags::REFERENCED_SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(source, instance);
    let referenced = obj
        .element(tags::REFERENCED_SERIES_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0]
        .element(tags::SERIES_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(referenced, series);
    let (rows, cols) = (
        obj.element(tags::ROWS).unwrap().to_int::<u32>().unwrap(),
        obj.element(tags::COLUMNS).unwrap().to_int::<u32>().unwrap(),
    );
    // Widened to 512 px so the burned-in lines fit; the banner of three lines above the image.
    assert_eq!(
        (cols, text(tags::PHOTOMETRIC_INTERPRETATION).as_str()),
        (512, "RGB")
    );
    assert!(rows > 160 * 512 / 200 + 60, "{rows}");
    let pixels = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    assert!(pixels.len() >= (rows * cols * 3) as usize);
    let banner_lit = pixels[..(40 * cols * 3) as usize]
        .iter()
        .filter(|&&v| v > 200)
        .count();
    assert!(
        banner_lit > 200,
        "no text burned into the banner ({banner_lit} bright samples)"
    );
    // The decision burned in matches the JSON's.
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let row = v["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"].as_str().unwrap().ends_with("hand.dcm"))
        .unwrap();
    let p = row["p_fractured"].as_f64().unwrap();
    assert!(
        text(tags::IMAGE_COMMENTS).contains(&format!("P(fractured) = {p:.4}")),
        "{p}"
    );
}

#[test]
#[ignore = "needs Python with pydicom: FRACTURE_PYDICOM_PYTHON names it (.ci/run installs one)"]
fn a_secondary_capture_reads_back_in_pydicom() {
    let python = std::env::var("FRACTURE_PYDICOM_PYTHON")
        .expect("FRACTURE_PYDICOM_PYTHON must name a Python with pydicom (see .ci/run)");
    let root = fresh_dir(&base(), "dicom-out-pydicom");
    let inputs = root.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let (study, _, instance) = dicom_with_uids(&inputs.join("wrist.dcm"));
    let out = fracture()
        .args(["predict", "--dicom-out"])
        .arg(root.join("sc"))
        .arg(&inputs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = r#"
import sys, pydicom
ds = pydicom.dcmread(sys.argv[1])
px = ds.pixel_array
assert px.shape == (ds.Rows, ds.Columns, 3), px.shape
assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
print(ds.StudyInstanceUID, ds.SourceImageSequence[0].ReferencedSOPInstanceUID, ds.PatientName, int(px[:40].max()))
"#;
    let read = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(root.join("sc/wrist.fracture.dcm"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields[..3], [study.as_str(), instance.as_str(), "Doe^Jane"]);
    assert!(
        fields[3].parse::<u32>().unwrap() > 200,
        "the banner holds text: {stdout}"
    );
}
