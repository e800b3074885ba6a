//! Reading the extracted release: its files, the class a folder names, `dataset.csv` and the
//! COCO annotation files' fracture boxes.

use super::*;
use fracture_fs::AtPath;

/// Every file under `root`, depth first, in name order.
pub(super) fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .at(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries.into_iter().rev() {
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

pub(super) fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The class a release folder stands for: `Some(0)` fractured, `Some(1)` not fractured.
pub(super) fn folder_class(path: &Path) -> Option<usize> {
    let folder = path.parent()?.file_name()?.to_string_lossy().to_lowercase();
    let folder = folder.replace(['-', ' '], "_");
    match folder.as_str() {
        "fractured" => Some(0),
        "non_fractured" | "not_fractured" | "nonfractured" => Some(1),
        _ => None,
    }
}

/// One row of `dataset.csv`.
pub(super) struct Row {
    pub(super) id: String,
    pub(super) class: usize,
    pub(super) fields: BTreeMap<String, String>,
}

pub(super) fn read_dataset_csv(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let unquote = |c: &str| c.trim().trim_matches('"').to_string();
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| release(path, "is empty"))?
        .split(',')
        .map(|c| unquote(c).trim_start_matches('\u{feff}').to_lowercase())
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(id_col), Some(label_col)) = (col("image_id"), col("fractured")) else {
        return Err(release(
            path,
            format!("the header needs the columns image_id and fractured (it has {header:?})"),
        ));
    };
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let cells: Vec<String> = line.split(',').map(unquote).collect();
        let bad = |why: &str| release(path, format!("line {}: {why}", i + 2));
        if cells.len() != header.len() {
            return Err(bad(&format!(
                "{} fields where the header has {}",
                cells.len(),
                header.len()
            )));
        }
        let class = match cells[label_col].as_str() {
            "1" => 0,
            "0" => 1,
            other => return Err(bad(&format!("`fractured` is `{other}`, not 0 or 1"))),
        };
        let id = stem(Path::new(&cells[id_col]));
        if id.is_empty() {
            return Err(bad("an empty image_id"));
        }
        let fields = META_COLUMNS
            .iter()
            .filter_map(|c| col(c).map(|k| (c.to_string(), cells[k].clone())))
            .collect();
        rows.push(Row { id, class, fields });
    }
    Ok(rows)
}

/// Boxes per image id from the COCO annotation files under `raw` (`[x, y, w, h]` in pixels).
pub(super) fn read_coco_boxes(files: &[PathBuf]) -> Result<HashMap<String, Vec<[f64; 4]>>> {
    let mut out: HashMap<String, Vec<[f64; 4]>> = HashMap::new();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")))
    {
        let bytes = std::fs::read(path).at(path)?;
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let (Some(images), Some(annotations)) = (doc["images"].as_array(), doc["annotations"].as_array())
        else {
            continue;
        };
        let names: HashMap<i64, String> = images
            .iter()
            .filter_map(|im| Some((im["id"].as_i64()?, stem(Path::new(im["file_name"].as_str()?)))))
            .collect();
        for a in annotations {
            let Some(name) = a["image_id"].as_i64().and_then(|i| names.get(&i)) else {
                return Err(release(
                    path,
                    "an annotation names an image the file does not list",
                ));
            };
            let b: Vec<f64> = a["bbox"]
                .as_array()
                .map(|v| v.iter().filter_map(serde_json::Value::as_f64).collect())
                .unwrap_or_default();
            match b[..] {
                [x, y, w, h] if x >= 0.0 && y >= 0.0 && w > 0.0 && h > 0.0 => {
                    out.entry(name.clone()).or_default().push([x, y, w, h]);
                }
                _ => {
                    return Err(release(
                        path,
                        format!("the box of {name} is not [x, y, w, h] in pixels"),
                    ));
                }
            }
        }
    }
    Ok(out)
}
