//! `predict` on files: heatmaps, awkward names and links, truncated images.

use super::eval_predict::trained_run;
use super::*;

#[test]
fn predict_writes_heatmap_overlays() {
    let (root, run) = trained_run("predict-heatmap");
    let dir = root.join("heatmaps");
    let out = fracture()
        .args(["predict", "--format", "csv", "--model"])
        .arg(&run)
        .arg(root.join("data/test/fractured"))
        .arg(root.join("data/test/not fractured"))
        .arg("--heatmap")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = parse_csv(&String::from_utf8_lossy(&out.stdout));
    let label_col = rows[0].iter().position(|c| c == "predicted").unwrap();
    let fractured_calls = rows[1..].iter().filter(|r| r[label_col] == "fractured").count();
    let written: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    assert_eq!(written.len(), rows.len() - 1, "{written:?}");
    let mut boxed = 0;
    for png in &written {
        assert!(png.to_string_lossy().ends_with(".heatmap.png"));
        let img = image::open(png).unwrap().to_rgb8();
        assert_eq!(
            img.dimensions(),
            (48, 48 + fracture_plot::LEGEND_HEIGHT),
            "the overlay keeps the image's own size, with the legend band below"
        );
        let red = img.pixels().filter(|p| p.0 == [230, 40, 40]).count();
        boxed += usize::from(red >= 8);
    }
    // One outlined box per fractured call, none on the others (and both kinds occur here).
    assert!(
        fractured_calls > 0 && fractured_calls < rows.len() - 1,
        "{rows:?}"
    );
    assert_eq!(boxed, fractured_calls, "{rows:?}");
}

/// Rows of RFC 4180 CSV text (quoted cells with doubled quotes and line breaks).
#[cfg(unix)]
pub(crate) fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut cell) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    rows
}

#[cfg(unix)]
#[test]
fn predict_survives_unusual_names_and_symlink_loops() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let (root, run) = trained_run("predict-names");
    let dir = root.join("odd");
    std::fs::create_dir_all(&dir).unwrap();
    let source = std::fs::read(root.join("data/test/fractured/img_0000.png")).unwrap();
    let names: Vec<&[u8]> = vec![
        b"a,b.png",
        b"say \"hi\".png",
        b"two\nlines.png",
        b"=HYPERLINK(\"x\").png",
        b"-leading.png",
        b"x\xff.png",
        b"x\xfe.png",
    ];
    for n in &names {
        std::fs::write(dir.join(OsStr::from_bytes(n)), &source).unwrap();
    }
    for i in 0..10 {
        std::os::unix::fs::symlink(".", dir.join(format!("loop{i}"))).unwrap();
    }

    let csv = fracture()
        .args(["predict", "--format", "csv", "--model"])
        .arg(&run)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(csv.status.success(), "{}", String::from_utf8_lossy(&csv.stderr));
    let rows = parse_csv(&String::from_utf8(csv.stdout).unwrap());
    assert_eq!(
        rows.len(),
        1 + names.len(),
        "each file once, loops walked once: {rows:?}"
    );
    assert!(rows.iter().all(|r| r.len() == 9), "{rows:?}");
    let paths: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert!(paths.iter().any(|p| p.ends_with("/a,b.png")), "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("/two\nlines.png")), "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("/say \"hi\".png")), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.ends_with("/x\\xFF.png")) && paths.iter().any(|p| p.ends_with("/x\\xFE.png"))
    );
    // Files named on the command line, relative: the cells start with the names themselves.
    let relative = fracture()
        .current_dir(&dir)
        .args(["predict", "--format", "csv", "--model"])
        .arg(&run)
        .args(["--", "=HYPERLINK(\"x\").png", "-leading.png"])
        .output()
        .unwrap();
    assert!(
        relative.status.success(),
        "{}",
        String::from_utf8_lossy(&relative.stderr)
    );
    let rows = parse_csv(&String::from_utf8(relative.stdout).unwrap());
    assert_eq!(rows[1][0], "'=HYPERLINK(\"x\").png", "{rows:?}");
    assert_eq!(rows[2][0], "'-leading.png", "{rows:?}");

    let heatmaps = root.join("heatmaps");
    let json = fracture()
        .args(["predict", "--format", "json", "--model"])
        .arg(&run)
        .arg(&dir)
        .arg("--heatmap")
        .arg(&heatmaps)
        .output()
        .unwrap();
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let preds = value["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), names.len());
    let unique: std::collections::HashSet<&str> = preds.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(unique.len(), names.len(), "distinct files render distinctly");
    assert_eq!(std::fs::read_dir(&heatmaps).unwrap().count(), names.len());

    // The table is for people: a newline in a name is shown escaped and cannot forge a row.
    let table = fracture()
        .args(["predict", "--format", "table", "--model"])
        .arg(&run)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(text.lines().count(), names.len() + 1, "{text}");
    assert!(text.contains("two\\nlines.png"), "{text}");
}

#[test]
fn a_truncated_jpeg_is_an_error_unless_partial_images_are_allowed() {
    let (root, run) = trained_run("predict-partial");
    let img = fracture_testkit::synthetic_xray(640, 640, true, 7);
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .unwrap();
    let bytes = out.into_inner();
    let cut = root.join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let strict = fracture()
        .args(["predict", "--model"])
        .arg(&run)
        .arg(&cut)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert_eq!(strict.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cut.jpg") && stderr.contains("truncated or damaged"),
        "{stderr}"
    );
    // The library names no flag; the command adds the one that accepts the file.
    assert!(stderr.contains("pass --allow-partial"), "{stderr}");
    let lenient = fracture()
        .args(["predict", "--allow-partial", "--model"])
        .arg(&run)
        .arg(&cut)
        .output()
        .unwrap();
    assert!(
        lenient.status.success(),
        "{}",
        String::from_utf8_lossy(&lenient.stderr)
    );
    assert!(String::from_utf8_lossy(&lenient.stdout).contains("cut.jpg"));
    assert!(String::from_utf8_lossy(&lenient.stderr).contains("warning: "));
    // In JSON the accepted partial image carries a warning; a whole one does not.
    let whole = root.join("whole.jpg");
    std::fs::write(&whole, &bytes).unwrap();
    let json = fracture()
        .args(["predict", "--allow-partial", "--format", "json", "--model"])
        .arg(&run)
        .arg(&cut)
        .arg(&whole)
        .output()
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows = value["predictions"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .unwrap()
    };
    assert!(
        row("cut.jpg")["warning"].as_str().unwrap().contains("truncated"),
        "{value}"
    );
    assert!(row("whole.jpg").get("warning").is_none(), "{value}");
}
