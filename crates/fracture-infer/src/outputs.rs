//! Evaluating a trained model on labelled images, predicting unlabelled ones, and the files and
//! charts that record the results.

use std::path::{Path, PathBuf};

use fracture_data::{FolderDataset, Item, LoadOptions, Skipped, Split};
use fracture_eval::{EvalReport, ThresholdRule, calibration_bins, choose_threshold, pr_curve, roc_curve};
use fracture_fs::AtPath;
use fracture_fs::write_atomic;
use fracture_plot::EpochPoint;
use serde::{Deserialize, Serialize};

use crate::csvio::{csv_error, open_csv};
use crate::{EpochReport, Error, Result, TrainedModel, truth};

/// The evaluation report's file name.
pub const REPORT_JSON: &str = "report.json";
/// Per-image predictions.
pub const PREDICTIONS_CSV: &str = "predictions.csv";
/// Charts written by [`write_evaluation`].
pub const CHART_FILES: [&str; 4] = ["confusion.png", "roc.png", "pr.png", "calibration.png"];
/// The forest plot of `eval --groups`.
pub const GROUPS_CHART: &str = "groups.png";
/// The chart of `eval --shifts`.
pub const SHIFTS_CHART: &str = "shifts.png";
/// The sensitivity every acquisition shift should keep at the stored threshold (drawn as the red
/// line of the shift chart).
pub const SHIFT_SENSITIVITY_FLOOR: f64 = 0.85;
pub use crate::layout::TRAINING_CURVES_FILE;

/// How the operating threshold of an evaluation is set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum ThresholdChoice {
    /// The threshold stored with the model (chosen on its validation images during training).
    Stored,
    /// A given threshold.
    Fixed {
        /// The threshold on P(fractured).
        value: f64,
    },
    /// Chosen by a rule on the very images being evaluated (optimistic: for exploration only).
    OnTheseImages {
        /// The rule.
        rule: ThresholdRule,
    },
}

/// A model's results on a set of labelled images.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The report.
    pub report: EvalReport,
    /// How its threshold was set.
    pub threshold_choice: ThresholdChoice,
    /// Whether probabilities average the four flips.
    pub tta: bool,
    /// The images evaluated, in order.
    pub items: Vec<Item>,
    /// P(fractured) per image, in the same order.
    pub probabilities: Vec<f64>,
    /// Files that could not be read.
    pub skipped: Vec<Skipped>,
    /// Per-group and per-shift results, when asked for (see [`crate::robustness`]); written into
    /// `report.json` and charted by [`write_evaluation`].
    pub robustness: crate::robustness::Robustness,
}

impl Evaluation {
    /// What the robustness analyses ([`crate::robustness`]) start from: the images, their
    /// probabilities, the report and whether flips were averaged.
    pub fn baseline(&self) -> crate::robustness::Baseline<'_> {
        crate::robustness::Baseline {
            items: &self.items,
            probabilities: &self.probabilities,
            report: &self.report,
            tta: self.tta,
        }
    }
}

/// Evaluates `model` on labelled images: loads them with the model's own preprocessing, predicts
/// P(fractured) (averaged over flips when `tta`), sets the threshold as `choice` says and builds the
/// report. Unreadable files are skipped and listed; both classes must remain.
pub fn evaluate_items(
    model: &TrainedModel,
    items: &[Item],
    choice: ThresholdChoice,
    tta: bool,
    batch_size: usize,
    options: &LoadOptions,
) -> Result<Evaluation> {
    let dataset = FolderDataset::load(items, model.preprocess(), options)?;
    if dataset.is_empty() {
        return Err(Error::Data(fracture_data::Error::Layout(
            "no readable image to evaluate".into(),
        )));
    }
    let probabilities = model.predictor().with_tta(tta).dataset(&dataset, batch_size)?;
    let actual = truth(&dataset);
    let threshold = match choice {
        ThresholdChoice::Stored => model.threshold(),
        ThresholdChoice::Fixed { value } => value,
        ThresholdChoice::OnTheseImages { rule } => choose_threshold(&probabilities, &actual, rule)?
            .ok_or_else(|| {
                Error::InvalidConfig("choosing a threshold needs images of both classes".into())
            })?,
    };
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Error::InvalidConfig(format!(
            "threshold {threshold} is outside [0, 1]"
        )));
    }
    let report = EvalReport::new(&probabilities, &actual, threshold)?;
    Ok(Evaluation {
        report,
        threshold_choice: choice,
        tta,
        items: dataset.items().to_vec(),
        probabilities,
        skipped: dataset.skipped().to_vec(),
        robustness: Default::default(),
    })
}

/// What `report.json` holds: the report's keys plus where the numbers come from.
#[derive(Debug, Serialize)]
struct ReportFile<'a> {
    #[serde(flatten)]
    report: &'a EvalReport,
    model: &'a Path,
    data: &'a Path,
    split: Option<Split>,
    tta: bool,
    threshold_choice: ThresholdChoice,
    skipped: usize,
    #[serde(flatten)]
    robustness: &'a crate::robustness::Robustness,
}

/// Where an evaluation's inputs came from, for `report.json`.
#[derive(Debug, Clone, Copy)]
pub struct EvalSource<'a> {
    /// The model file.
    pub model: &'a Path,
    /// The data folder.
    pub data: &'a Path,
    /// The split, when the data folder is a dataset root.
    pub split: Option<Split>,
}

fn write(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    write_atomic(path, bytes).at(path)?;
    Ok(path.to_path_buf())
}

/// Writes `report.json`, `predictions.csv` (path, label, p_fractured, predicted) and the charts
/// (confusion matrix, ROC, precision-recall, calibration) into `dir`, plus `training_curves.png` when
/// `metrics_csv` (a run's `metrics.csv`) is given. Returns the files written.
pub fn write_evaluation(
    dir: &Path,
    eval: &Evaluation,
    source: EvalSource<'_>,
    metrics_csv: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).at(dir)?;
    let mut written = Vec::new();
    let file = ReportFile {
        report: &eval.report,
        model: source.model,
        data: source.data,
        split: source.split,
        tta: eval.tta,
        threshold_choice: eval.threshold_choice,
        skipped: eval.skipped.len(),
        robustness: &eval.robustness,
    };
    let json = crate::bundle::json_pretty(&file, "the evaluation report")?;
    written.push(write(&dir.join(REPORT_JSON), json.as_bytes())?);

    let rows: Vec<PredictionRow<'_>> = eval
        .items
        .iter()
        .zip(&eval.probabilities)
        .map(|(item, &p)| PredictionRow {
            path: &item.path,
            truth: Some(item.label),
            p_fractured: p,
            predicted: fracture_data::Label::from_fractured(fracture_eval::is_fractured(
                p,
                eval.report.threshold,
            )),
            evidence: None,
        })
        .collect();
    let csv = predictions_csv(
        &rows,
        CsvColumns {
            truth: true,
            evidence: false,
            shard: None,
        },
    )?;
    written.push(write(&dir.join(PREDICTIONS_CSV), csv.as_bytes())?);

    let actual: Vec<bool> = eval.items.iter().map(|i| i.label.is_fractured()).collect();
    let r = &eval.report;
    let t = r.threshold;
    let ci = |i: Option<fracture_eval::Interval>| {
        i.map(|i| format!(" (95% CI {:.3}-{:.3})", i.lower, i.upper))
            .unwrap_or_default()
    };
    let title = format!(
        "n = {}, {} fractured, threshold {t:.3}{}",
        r.n,
        r.positives,
        if eval.tta { ", TTA" } else { "" }
    );
    let confusion = fracture_plot::confusion_png(&r.confusion, &format!("Confusion matrix ({title})"))?;
    written.push(write(&dir.join(CHART_FILES[0]), &confusion)?);
    let roc = roc_curve(&eval.probabilities, &actual)?.unwrap_or_default();
    let operating = r.sensitivity.zip(r.specificity).map(|(s, sp)| (1.0 - sp, s));
    let roc_png = fracture_plot::roc_png(&roc, r.roc_auc, operating, &format!("ROC{}", ci(r.ci95.roc_auc)))?;
    written.push(write(&dir.join(CHART_FILES[1]), &roc_png)?);
    let pr = pr_curve(&eval.probabilities, &actual)?.unwrap_or_default();
    let prevalence = if r.n > 0 {
        r.positives as f64 / r.n as f64
    } else {
        0.0
    };
    let pr_point = r.recall.zip(r.precision);
    let pr_png = fracture_plot::pr_png(&pr, r.pr_auc, prevalence, pr_point, "Precision-recall")?;
    written.push(write(&dir.join(CHART_FILES[2]), &pr_png)?);
    let bins = calibration_bins(&eval.probabilities, &actual, fracture_eval::ECE_BINS)?;
    let cal = fracture_plot::calibration_png(
        &bins,
        r.ece,
        &format!(
            "Calibration (Brier {})",
            r.brier.map(|b| format!("{b:.3}")).unwrap_or_default()
        ),
    )?;
    written.push(write(&dir.join(CHART_FILES[3]), &cal)?);
    if let Some(groups) = &eval.robustness.groups {
        let png = crate::robustness::groups_png(groups, r, &format!("Subgroups ({title})"))?;
        written.push(write(&dir.join(GROUPS_CHART), &png)?);
    }
    if let Some(shifts) = &eval.robustness.shifts {
        let png = crate::robustness::shifts_png(
            shifts,
            r,
            SHIFT_SENSITIVITY_FLOOR,
            &format!("Acquisition shifts ({title})"),
        )?;
        written.push(write(&dir.join(SHIFTS_CHART), &png)?);
    }
    if let Some(csv) = metrics_csv {
        let points = read_metrics_csv(csv)?;
        let png = fracture_plot::training_curves_png(&points, "Training curves")?;
        written.push(write(&dir.join(TRAINING_CURVES_FILE), &png)?);
    }
    Ok(written)
}

/// A cell a spreadsheet would read as a formula (it starts with `=`, `+`, `-`, `@`, a tab or CR)
/// gets a leading `'`, as spreadsheet vendors and OWASP recommend, so opening the file runs nothing.
pub fn spreadsheet_safe(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

/// Which optional columns a predictions table has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CsvColumns {
    /// The true class (`truth`), for evaluations.
    pub truth: bool,
    /// Where the evidence lies (`peak_x` … `box_h`).
    pub evidence: bool,
    /// The shard of a batch job that wrote the rows (`shard`, `I/N` in every row), for
    /// [`crate::archive::merge`].
    pub shard: Option<crate::archive::Shard>,
}

impl CsvColumns {
    /// The header row's cells.
    fn header(&self) -> Vec<&'static str> {
        let mut header = vec!["path"];
        if self.truth {
            header.push("truth");
        }
        header.extend(["p_fractured", "predicted"]);
        if self.evidence {
            header.extend(["peak_x", "peak_y", "box_x", "box_y", "box_w", "box_h"]);
        }
        if self.shard.is_some() {
            header.push("shard");
        }
        header
    }

    /// A row's cells.
    fn cells(&self, row: &PredictionRow<'_>) -> Vec<String> {
        let mut cells = vec![spreadsheet_safe(&fracture_data::path_text(row.path))];
        if self.truth {
            cells.push(row.truth.map_or("", fracture_data::Label::name).to_string());
        }
        cells.push(format!("{:.6}", row.p_fractured));
        cells.push(row.predicted.name().to_string());
        if self.evidence {
            match row.evidence {
                Some(e) => cells.extend(e.peak.iter().chain(e.region.iter()).map(|v| format!("{v:.1}"))),
                None => cells.extend(std::iter::repeat_n(String::new(), 6)),
            }
        }
        if let Some(shard) = self.shard {
            cells.push(shard.to_string());
        }
        cells
    }

    /// The header row as one line of CSV text, without its newline.
    pub fn header_line(&self) -> String {
        csv_line(&self.header())
    }

    /// `row` as one line of CSV text (quoted where needed), without its newline: what
    /// [`PredictionsCsv`] writes for it.
    pub fn row_line(&self, row: &PredictionRow<'_>) -> String {
        csv_line(&self.cells(row))
    }
}

/// Cells as one CSV line, quoted as the csv crate quotes them, without the newline.
fn csv_line<S: AsRef<[u8]>>(cells: &[S]) -> String {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    // Writing into memory cannot fail.
    let _ = w.write_record(cells);
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes).trim_end_matches('\n').to_string()
}

/// One row of a predictions table.
#[derive(Debug, Clone)]
pub struct PredictionRow<'a> {
    /// The image.
    pub path: &'a Path,
    /// Its class, when known (evaluation).
    pub truth: Option<fracture_data::Label>,
    /// P(fractured).
    pub p_fractured: f64,
    /// The decision at the threshold.
    pub predicted: fracture_data::Label,
    /// Where the evidence lies, when computed.
    pub evidence: Option<crate::evidence::Evidence>,
}

/// The predictions table as CSV (RFC 4180, written with the `csv` crate, so commas, quotes, CR and
/// LF in a path are quoted): `path,truth,p_fractured,predicted` when `with_truth` (evaluation),
/// `path,p_fractured,predicted` otherwise (prediction); the same names for the same facts in both.
/// With `columns.evidence`, `peak_x,peak_y,box_x,box_y,box_w,box_h` follow (image pixels; empty
/// cells for a row without evidence: an empty map). Paths are rendered with [`fracture_data::path_text`] and made
/// [`spreadsheet_safe`].
pub fn predictions_csv(rows: &[PredictionRow<'_>], columns: CsvColumns) -> Result<String> {
    let mut out = PredictionsCsv::new(Vec::new(), columns)?;
    for row in rows {
        out.write(row)?;
    }
    let bytes = out.finish()?;
    String::from_utf8(bytes).map_err(|e| Error::InvalidConfig(e.to_string()))
}

/// [`predictions_csv`] one row at a time, into any writer: the header when made, then each row
/// as it is written (flushed with it, so a reader of a pipe or a crash loses nothing written).
#[derive(Debug)]
pub struct PredictionsCsv<W: std::io::Write> {
    out: csv::Writer<W>,
    columns: CsvColumns,
}

fn csv_failed(e: csv::Error) -> Error {
    Error::InvalidConfig(format!("cannot write the predictions table: {e}"))
}

impl<W: std::io::Write> PredictionsCsv<W> {
    /// Writes the header for `columns` into `writer`.
    pub fn new(writer: W, columns: CsvColumns) -> Result<Self> {
        let mut out = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(writer);
        out.write_record(columns.header()).map_err(csv_failed)?;
        Ok(PredictionsCsv { out, columns })
    }

    /// Writes and flushes one row.
    pub fn write(&mut self, row: &PredictionRow<'_>) -> Result<()> {
        self.out
            .write_record(self.columns.cells(row))
            .map_err(csv_failed)?;
        self.out.flush().map_err(|e| csv_failed(e.into()))
    }

    /// Flushes and hands the writer back.
    pub fn finish(self) -> Result<W> {
        self.out
            .into_inner()
            .map_err(|e| csv_failed(e.into_error().into()))
    }
}

fn epoch_point(r: &EpochReport) -> EpochPoint {
    EpochPoint {
        epoch: r.epoch,
        train_loss: r.train_loss,
        val_loss: r.val_loss,
        val_roc_auc: r.val.roc_auc,
        val_sensitivity: r.val.sensitivity,
        val_specificity: r.val.specificity,
    }
}

/// Draws a run's training curves into `path`.
pub fn write_training_curves(path: &Path, history: &[EpochReport]) -> Result<()> {
    let points: Vec<EpochPoint> = history.iter().map(epoch_point).collect();
    let png = fracture_plot::training_curves_png(&points, "Training curves")?;
    write(path, &png).map(|_| ())
}

/// Reads a run's `metrics.csv` (the columns `fracture_train::run::metrics_csv` writes; others are ignored).
pub fn read_metrics_csv(path: &Path) -> Result<Vec<EpochPoint>> {
    let bad = |line: u64, why: &str| csv_error(path, line, why);
    let (mut reader, header) = open_csv(path)?;
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(e), Some(tl), Some(vl), Some(auc), Some(sens), Some(spec)) = (
        col("epoch"),
        col("train_loss"),
        col("val_loss"),
        col("val_roc_auc"),
        col("val_sensitivity"),
        col("val_specificity"),
    ) else {
        return Err(bad(1, "not a metrics.csv header"));
    };
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| bad(e.position().map_or(0, |p| p.line()), &e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let num = |k: usize| record.get(k).and_then(|c| c.parse::<f64>().ok());
        let epoch = record
            .get(e)
            .and_then(|c| c.parse::<usize>().ok())
            .ok_or_else(|| bad(line, "bad epoch"))?;
        out.push(EpochPoint {
            epoch,
            train_loss: num(tl).unwrap_or(f64::NAN),
            val_loss: num(vl).unwrap_or(f64::NAN),
            val_roc_auc: num(auc),
            val_sensitivity: num(sens),
            val_specificity: num(spec),
        });
    }
    Ok(out)
}

impl crate::Prediction {
    /// This prediction as a row of [`predictions_csv`] (no truth: a prediction does not know it).
    pub fn row(&self) -> PredictionRow<'_> {
        PredictionRow {
            path: &self.path,
            truth: None,
            p_fractured: self.p_fractured,
            predicted: fracture_data::Label::from_fractured(self.fractured),
            evidence: self.evidence,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_tables_quote_cells_and_neutralize_formulas() {
        let names = [
            "a/b.png",
            "a,b.png",
            "say \"hi\".png",
            "two\nlines.png",
            "=HYPERLINK(\"x\")",
            "-2+3",
            "@SUM(A1)",
        ];
        let paths: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
        let rows: Vec<PredictionRow<'_>> = paths
            .iter()
            .map(|p| PredictionRow {
                path: p,
                truth: Some(fracture_data::Label::Fractured),
                p_fractured: 0.25,
                predicted: fracture_data::Label::NotFractured,
                evidence: None,
            })
            .collect();
        let text = predictions_csv(
            &rows,
            CsvColumns {
                truth: true,
                evidence: false,
                shard: None,
            },
        )
        .unwrap();
        assert!(text.starts_with("path,truth,p_fractured,predicted\n"), "{text}");
        assert!(
            text.contains("\na/b.png,fractured,0.250000,not fractured\n"),
            "{text}"
        );
        assert!(text.contains("\n\"a,b.png\","), "{text}");
        assert!(text.contains("\n\"say \"\"hi\"\".png\","), "{text}");
        assert!(text.contains("\n\"two\nlines.png\","), "{text}");
        assert!(text.contains("\n\"'=HYPERLINK(\"\"x\"\")\","), "{text}");
        assert!(
            text.contains("\n'-2+3,") && text.contains("\n'@SUM(A1),"),
            "{text}"
        );
        // A CSV reader gets every path back, formulas neutralized.
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let back: Vec<String> = reader.records().map(|r| r.unwrap()[0].to_string()).collect();
        let expect: Vec<String> = names.iter().map(|n| spreadsheet_safe(n)).collect();
        assert_eq!(back, expect);
        let row = PredictionRow {
            path: Path::new("x.png"),
            truth: None,
            p_fractured: 0.9,
            predicted: fracture_data::Label::Fractured,
            evidence: None,
        };
        let plain = predictions_csv(std::slice::from_ref(&row), CsvColumns::default()).unwrap();
        assert_eq!(plain, "path,p_fractured,predicted\nx.png,0.900000,fractured\n");
        let located = PredictionRow {
            evidence: Some(crate::evidence::Evidence {
                peak: [10.0, 20.0],
                region: [5.0, 6.0, 7.0, 8.5],
            }),
            ..row.clone()
        };
        assert_eq!(
            predictions_csv(
                &[located, row],
                CsvColumns {
                    truth: false,
                    evidence: true,
                    shard: None,
                }
            )
            .unwrap(),
            "path,p_fractured,predicted,peak_x,peak_y,box_x,box_y,box_w,box_h\n\
             x.png,0.900000,fractured,10.0,20.0,5.0,6.0,7.0,8.5\n\
             x.png,0.900000,fractured,,,,,,\n"
        );
    }
}
