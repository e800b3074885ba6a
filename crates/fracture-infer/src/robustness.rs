//! Beyond the average: a model's results per subgroup of the images (from a groups file such as
//! FracAtlas's metadata) and under fixed acquisition shifts of the images (the proxy for another
//! hospital that can be measured on one's own data).

use std::collections::HashMap;
use std::path::Path;

use fracture_data::{FolderDataset, LoadOptions, Shift};
use fracture_eval::{EvalReport, GroupReport, Interval, group_report};
use serde::{Deserialize, Serialize};

use crate::csvio::{csv_error, open_csv};
use crate::localize::image_id;
use crate::{Result, TrainedModel, truth};

/// Columns of a groups file that are never groups: the label itself and counts.
const NOT_GROUPS: [&str; 3] = ["fractured", "label", "fracture_count"];

/// Group membership read from a CSV file: an `id` column (file names without extension) and one
/// 0/1 column per group. Columns holding anything but 0 and 1 (a split name, a count) are not
/// groups and are listed in [`GroupTable::ignored`]; so are `fractured` and `label`, which are the
/// truth rather than a subgroup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupTable {
    /// The group columns, in file order.
    pub groups: Vec<String>,
    /// Columns that are not 0/1 groups.
    pub ignored: Vec<String>,
    /// Each id's membership, one flag per group.
    pub members: HashMap<String, Vec<bool>>,
}

/// Reads a groups file (see [`GroupTable`]). An error names the file and line: a missing `id`
/// column, an id listed twice with different values, an unreadable row.
pub fn read_groups(path: &Path) -> Result<GroupTable> {
    let bad = |line: u64, why: &str| csv_error(path, line, why);
    let (mut reader, header) = open_csv(path)?;
    let names: Vec<String> = header.iter().map(|h| h.trim().to_string()).collect();
    let Some(id) = names.iter().position(|h| h == "id") else {
        return Err(bad(
            1,
            "the header needs an `id` column (file names without extension)",
        ));
    };
    let mut rows: Vec<(u64, String, Vec<String>)> = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| bad(e.position().map_or(0, |p| p.line()), &e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let cells: Vec<String> = record.iter().map(|c| c.trim().to_string()).collect();
        rows.push((line, cells.get(id).cloned().unwrap_or_default(), cells));
    }
    let is_flag = |c: usize| {
        rows.iter()
            .all(|(_, _, cells)| matches!(cells.get(c).map(String::as_str), Some("0" | "1")))
    };
    let (mut groups, mut columns, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
    for (c, name) in names.iter().enumerate() {
        if c == id {
            continue;
        }
        if !rows.is_empty() && is_flag(c) && !NOT_GROUPS.contains(&name.to_lowercase().as_str()) {
            groups.push(name.clone());
            columns.push(c);
        } else {
            ignored.push(name.clone());
        }
    }
    let mut members: HashMap<String, Vec<bool>> = HashMap::new();
    for (line, key, cells) in rows {
        if key.is_empty() {
            return Err(bad(line, "empty id"));
        }
        let flags: Vec<bool> = columns.iter().map(|&c| cells[c] == "1").collect();
        if let Some(old) = members.get(&key)
            && *old != flags
        {
            return Err(bad(line, &format!("id {key} is listed again with other groups")));
        }
        members.insert(key, flags);
    }
    Ok(GroupTable {
        groups,
        ignored,
        members,
    })
}

/// Every group's results on an evaluation, at its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupsSection {
    /// The groups file.
    pub file: String,
    /// Evaluated images whose id the file does not list (in no group).
    pub unmatched: usize,
    /// One report per group, in file order.
    pub groups: Vec<GroupReport>,
}

/// An evaluation as the robustness analyses need it (see `outputs::Evaluation::baseline`).
#[derive(Debug, Clone, Copy)]
pub struct Baseline<'a> {
    /// The images evaluated, in order.
    pub items: &'a [fracture_data::Item],
    /// P(fractured) per image, in the same order.
    pub probabilities: &'a [f64],
    /// The report, with its threshold.
    pub report: &'a EvalReport,
    /// Whether probabilities average the flips.
    pub tta: bool,
}

/// Reports every group of `table` on `eval` (its probabilities and threshold), with 1,000 seeded
/// bootstrap replicates per group.
pub fn evaluate_groups(eval: &Baseline<'_>, table: &GroupTable, file: &Path) -> Result<GroupsSection> {
    let actual: Vec<bool> = eval.items.iter().map(|i| i.label.is_fractured()).collect();
    let rows: Vec<Option<&Vec<bool>>> = eval
        .items
        .iter()
        .map(|i| table.members.get(&image_id(&i.path)))
        .collect();
    let unmatched = rows.iter().filter(|r| r.is_none()).count();
    let mut groups = Vec::with_capacity(table.groups.len());
    for (g, name) in table.groups.iter().enumerate() {
        let members: Vec<bool> = rows.iter().map(|r| r.is_some_and(|flags| flags[g])).collect();
        groups.push(group_report(
            name,
            eval.probabilities,
            &actual,
            &members,
            eval.report.threshold,
            fracture_eval::DEFAULT_RESAMPLES,
            0,
        )?);
    }
    Ok(GroupsSection {
        file: fracture_data::path_text(file),
        unmatched,
        groups,
    })
}

/// The model's results under one acquisition shift, against the unshifted images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftResult {
    /// Its name, e.g. `zoom in 60%`.
    pub name: String,
    /// The shift.
    pub shift: Shift,
    /// Images evaluated (those that could be read and shifted).
    pub n: usize,
    /// ROC-AUC under the shift.
    pub roc_auc: Option<f64>,
    /// Its 95% interval.
    pub roc_auc_ci: Option<Interval>,
    /// ROC-AUC under the shift minus the unshifted ROC-AUC.
    pub delta_roc_auc: Option<f64>,
    /// Sensitivity at the stored threshold.
    pub sensitivity: Option<f64>,
    /// Its 95% interval.
    pub sensitivity_ci: Option<Interval>,
    /// Specificity at the stored threshold.
    pub specificity: Option<f64>,
    /// Its 95% interval.
    pub specificity_ci: Option<Interval>,
    /// Mean P(fractured) of the fractured images under the shift.
    pub mean_p_fractured: Option<f64>,
}

/// Evaluates `model` on the images of `base` (an unshifted evaluation) under each of `shifts`
/// (decoded, shifted, then preprocessed as usual), with the same flips as `base` and at its
/// threshold, reporting each shift's ROC-AUC change against it. `progress(done, total)` is called
/// after each shift.
pub fn evaluate_shifts(
    model: &TrainedModel,
    base: &Baseline<'_>,
    shifts: &[Shift],
    batch_size: usize,
    options: &LoadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<ShiftResult>> {
    let (items, tta) = (base.items, base.tta);
    let base = base.report;
    let predictor = model.predictor().with_tta(tta);
    let mut out = Vec::with_capacity(shifts.len());
    for (k, &shift) in shifts.iter().enumerate() {
        shift.validate()?;
        let opts = LoadOptions {
            shift: Some(shift),
            disk_cache: None,
            ..options.clone()
        };
        let dataset = FolderDataset::load(items, model.preprocess(), &opts)?;
        let probabilities = predictor.dataset(&dataset, batch_size)?;
        let actual = truth(&dataset);
        let r = EvalReport::new(&probabilities, &actual, base.threshold)?;
        let fractured: Vec<f64> = probabilities
            .iter()
            .zip(&actual)
            .filter(|(_, a)| **a)
            .map(|(p, _)| *p)
            .collect();
        out.push(ShiftResult {
            name: shift.name(),
            shift,
            n: r.n,
            roc_auc: r.roc_auc,
            roc_auc_ci: r.ci95.roc_auc,
            delta_roc_auc: r.roc_auc.zip(base.roc_auc).map(|(s, b)| s - b),
            sensitivity: r.sensitivity,
            sensitivity_ci: r.ci95.sensitivity,
            specificity: r.specificity,
            specificity_ci: r.ci95.specificity,
            mean_p_fractured: (!fractured.is_empty())
                .then(|| fractured.iter().sum::<f64>() / fractured.len() as f64),
        });
        progress(k + 1, shifts.len());
    }
    Ok(out)
}

/// The forest plot of the groups: ROC-AUC, sensitivity and specificity per group, the whole
/// evaluation as the dashed reference.
pub fn groups_png(section: &GroupsSection, all: &EvalReport, title: &str) -> Result<Vec<u8>> {
    use fracture_plot::{ForestCell, ForestRow};
    let cell = |v: Option<f64>, i: Option<Interval>| v.map(|value| ForestCell { value, interval: i });
    let rows: Vec<ForestRow> = section
        .groups
        .iter()
        .map(|g| ForestRow {
            label: format!("{} (n {}, {} fx)", g.name, g.n, g.positives),
            cells: vec![
                cell(g.roc_auc, g.ci95.roc_auc),
                cell(g.sensitivity, g.ci95.sensitivity),
                cell(g.specificity, g.ci95.specificity),
            ],
        })
        .collect();
    Ok(fracture_plot::forest_png(
        title,
        &["ROC-AUC", "sensitivity", "specificity"],
        &[all.roc_auc, all.sensitivity, all.specificity],
        &[None, None, None],
        &rows,
    )?)
}

/// The shift chart: ROC-AUC and sensitivity at the stored threshold under each shift, the
/// unshifted values as the dashed reference; sensitivities below `sensitivity_floor` are red.
pub fn shifts_png(
    shifts: &[ShiftResult],
    base: &EvalReport,
    sensitivity_floor: f64,
    title: &str,
) -> Result<Vec<u8>> {
    use fracture_plot::{ForestCell, ForestRow};
    let cell = |v: Option<f64>, i: Option<Interval>| v.map(|value| ForestCell { value, interval: i });
    let mut rows = vec![ForestRow {
        label: "none (as acquired)".into(),
        cells: vec![
            cell(base.roc_auc, base.ci95.roc_auc),
            cell(base.sensitivity, base.ci95.sensitivity),
            cell(base.specificity, base.ci95.specificity),
        ],
    }];
    rows.extend(shifts.iter().map(|s| ForestRow {
        label: s.name.clone(),
        cells: vec![
            cell(s.roc_auc, s.roc_auc_ci),
            cell(s.sensitivity, s.sensitivity_ci),
            cell(s.specificity, s.specificity_ci),
        ],
    }));
    let auc_floor = base.roc_auc.map(|a| a - 0.03);
    Ok(fracture_plot::forest_png(
        title,
        &["ROC-AUC", "sensitivity", "specificity"],
        &[base.roc_auc, base.sensitivity, base.specificity],
        &[auc_floor, Some(sensitivity_floor), None],
        &rows,
    )?)
}

/// Groups and shifts of an evaluation, as `report.json` holds them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Robustness {
    /// Per-group results (`eval --groups`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupsSection>,
    /// Per-shift results (`eval --shifts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shifts: Option<Vec<ShiftResult>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_groups_file_keeps_its_flag_columns_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("fracture-groups-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("meta.csv");
        std::fs::write(
            &f,
            "id,split,hand,leg,fractured,fracture_count\nIMG1,val,1,0,1,2\nIMG2,train,0,1,0,0\n",
        )
        .unwrap();
        let t = read_groups(&f).unwrap();
        assert_eq!(t.groups, ["hand", "leg"]);
        assert_eq!(t.ignored, ["split", "fractured", "fracture_count"]);
        assert_eq!(t.members["IMG1"], [true, false]);
        std::fs::write(&f, "name,hand\nIMG1,1\n").unwrap();
        let e = read_groups(&f).unwrap_err().to_string();
        assert!(e.contains("meta.csv:1") && e.contains("id"), "{e}");
        std::fs::write(&f, "id,hand\nIMG1,1\nIMG1,0\n").unwrap();
        let e = read_groups(&f).unwrap_err().to_string();
        assert!(e.contains("meta.csv:3") && e.contains("IMG1"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
