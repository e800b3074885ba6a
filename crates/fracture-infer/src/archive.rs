//! Scoring an archive in pieces: which images a shard of a batch job owns, result files that are
//! written a row at a time and resumed after a crash, and the merge of the shards' files.
//!
//! A shard `I/N` owns the images whose key (the path below the folder given, `/`-separated) hashes
//! to `I` modulo `N` with 64-bit FNV-1a: the same on every machine and in every run, whatever the
//! order or the other files, so `N` processes on `N` machines split an archive without talking to
//! each other. Each shard writes JSON Lines (one object per line) or CSV rows, each flushed as it
//! is written: a process killed at any point leaves every finished row and at most one cut-off
//! line, which [`ResultsFile::open`] with `resume` cuts away before appending. [`merge`] joins the
//! shards' files, refuses an image written twice and reports the shards it found no rows of.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};
use fracture_fs::AtPath;

/// One shard of an archive: index `index` of `count` (`0 ≤ index < count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard's number, from 0.
    pub index: u32,
    /// How many shards the archive is split into.
    pub count: u32,
}

/// The environment variables [`Shard::parse`] reads for `auto/N`, in order: Kubernetes' Indexed
/// Job index, then Slurm's array task id (less `SLURM_ARRAY_TASK_MIN`, so an array numbered from 1
/// works too).
pub const SHARD_INDEX_VARIABLES: [&str; 2] = ["JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"];

impl Shard {
    /// The whole archive as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// `I/N` (e.g. `2/8`), or `auto/N`, whose index comes from the job scheduler's environment
    /// (see [`SHARD_INDEX_VARIABLES`]); `env` looks a variable up (`std::env::var(..).ok()` in a
    /// program). An error says what is wrong with `spec`.
    pub fn parse(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        let bad = |why: String| Error::InvalidConfig(format!("shard `{spec}`: {why}"));
        let (index, count) = spec
            .split_once('/')
            .ok_or_else(|| bad("expected I/N (e.g. 0/4) or auto/N".into()))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| bad(format!("the shard count `{count}` is not a whole number above 0")))?;
        let index: u32 = if index.trim() == "auto" {
            let (name, value) = SHARD_INDEX_VARIABLES
                .iter()
                .find_map(|&name| env(name).map(|v| (name, v)))
                .ok_or_else(|| {
                    bad(format!(
                        "auto needs {} (a Kubernetes Indexed Job) or {} (a Slurm array job) in the environment",
                        SHARD_INDEX_VARIABLES[0], SHARD_INDEX_VARIABLES[1]
                    ))
                })?;
            let raw: u64 = value
                .trim()
                .parse()
                .map_err(|_| bad(format!("{name}={value} is not a whole number")))?;
            let first: u64 = if name == "SLURM_ARRAY_TASK_ID" {
                match env("SLURM_ARRAY_TASK_MIN") {
                    Some(min) => min
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("SLURM_ARRAY_TASK_MIN={min} is not a whole number")))?,
                    None => 0,
                }
            } else {
                0
            };
            let index = raw
                .checked_sub(first)
                .ok_or_else(|| bad(format!("{name}={raw} is below SLURM_ARRAY_TASK_MIN={first}")))?;
            u32::try_from(index).map_err(|_| bad(format!("{name}={raw} is too large")))?
        } else {
            index
                .trim()
                .parse()
                .map_err(|_| bad(format!("the index `{index}` is not a whole number (or auto)")))?
        };
        if index >= count {
            return Err(bad(format!("the index {index} is not below the count {count}")));
        }
        Ok(Shard { index, count })
    }

    /// Whether this shard owns the image with key `key` (see [`shard_key`]).
    pub fn owns(&self, key: &str) -> bool {
        stable_hash(key) % u64::from(self.count) == u64::from(self.index)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// 64-bit FNV-1a of `s`'s UTF-8 bytes: fixed by its definition, so shards agree across machines,
/// builds and versions.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The key that decides an image's shard: its path below `root` (the folder given on the command
/// line), components joined by `/`; for a file given by itself, its file name. Independent of
/// where the archive is mounted.
pub fn shard_key(root: &Path, file: &Path) -> String {
    let below = file.strip_prefix(root).ok().filter(|p| !p.as_os_str().is_empty());
    match below {
        Some(rel) => rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/"),
        None => file.file_name().map_or_else(
            || fracture_data::path_text(file),
            |n| n.to_string_lossy().into_owned(),
        ),
    }
}

/// The format of a result file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// One JSON object per line; its `path` field names the image.
    JsonLines,
    /// A header row, then one row per image; its first column (`path`) names the image.
    Csv,
}

impl RowFormat {
    /// The format a file's name says (`.jsonl`/`.ndjson` or `.csv`), if any.
    pub fn from_extension(path: &Path) -> Option<RowFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(RowFormat::JsonLines),
            "csv" => Some(RowFormat::Csv),
            _ => None,
        }
    }
}

/// A result file open for appending rows, each flushed as it is written.
#[derive(Debug)]
pub struct ResultsFile {
    file: std::fs::File,
    /// The names (the `path` field or column) of the rows already in the file.
    pub done: HashSet<String>,
    /// Bytes of a cut-off last line removed when resuming (0 when there was none).
    pub cut_bytes: usize,
}

impl ResultsFile {
    /// Opens `path` for `format` rows. Without `resume`, the file is created (an existing one is an
    /// error: results are never overwritten by accident) and, for CSV, `csv_header` written. With
    /// `resume`, an existing file is read: a last line without its newline (a row cut off by a
    /// crash) is removed, every other row must parse, and their names are kept in
    /// [`ResultsFile::done`]; a CSV file's header must equal `csv_header`. A missing file is
    /// created as without `resume`.
    pub fn open(path: &Path, format: RowFormat, csv_header: &str, resume: bool) -> Result<ResultsFile> {
        let io = |e| Error::Io(fracture_fs::PathError::new(path, e));
        if !(resume && path.exists()) {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Error::InvalidConfig(format!(
                            "{} already exists: resume it, or choose another file",
                            path.display()
                        ))
                    } else {
                        io(e)
                    }
                })?;
            if format == RowFormat::Csv {
                writeln!(file, "{csv_header}").map_err(io)?;
                file.flush().map_err(io)?;
            }
            return Ok(ResultsFile {
                file,
                done: HashSet::new(),
                cut_bytes: 0,
            });
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io)?;
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let cut_bytes = text.len() - whole;
        text.truncate(whole);
        let mut done = HashSet::new();
        let mut rows = read_rows(&text, format, path)?;
        if format == RowFormat::Csv {
            match rows.header.as_deref() {
                Some(h) if h == csv_header => {}
                Some(h) => {
                    return Err(Error::InvalidConfig(format!(
                        "{}: its header `{h}` differs from this run's `{csv_header}` (other options?)",
                        path.display()
                    )));
                }
                None => {
                    // Not even the header survived: write it again.
                    text.extend_from_slice(csv_header.as_bytes());
                    text.push(b'\n');
                }
            }
        }
        for Row { line, name, .. } in rows.rows.drain(..) {
            if !done.insert(name.clone()) {
                return Err(Error::InvalidConfig(format!(
                    "{}:{line}: `{name}` is written twice",
                    path.display()
                )));
            }
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(&text).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(ResultsFile {
            file,
            done,
            cut_bytes,
        })
    }
}

/// Rows written through [`std::io::Write`] go straight to the file (no buffer): write each row with
/// one `write_all` so that a crash cuts at most that row.
impl Write for ResultsFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The rows of a result file, after the CSV header (for CSV).
struct Rows {
    header: Option<String>,
    rows: Vec<Row>,
}

/// One row of a result file.
struct Row {
    /// Its line number (from 1).
    line: usize,
    /// The image it names (the `path` field or first column).
    name: String,
    /// Its shard (`I/N`), when the row carries one (the `shard` field or column).
    shard: Option<String>,
    /// Its text, without the newline.
    text: String,
}

/// Parses whole lines of a result file; an error names the file and line.
fn read_rows(text: &[u8], format: RowFormat, path: &Path) -> Result<Rows> {
    let bad = |line: usize, why: &str| Error::InvalidConfig(format!("{}:{line}: {why}", path.display()));
    let mut header = None;
    let mut rows = Vec::new();
    match format {
        RowFormat::JsonLines => {
            for (i, line) in text.lines().enumerate() {
                let line = line.at(path)?;
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| bad(i + 1, &format!("not a JSON object ({e})")))?;
                let name = value
                    .get("path")
                    .and_then(|p| p.as_str())
                    .ok_or_else(|| bad(i + 1, "the row has no `path`"))?;
                rows.push(Row {
                    line: i + 1,
                    name: name.to_string(),
                    shard: value.get("shard").and_then(|s| s.as_str()).map(str::to_string),
                    text: line.clone(),
                });
            }
        }
        RowFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(text);
            let mut records = Vec::new();
            for (i, record) in reader.records().enumerate() {
                let record = record.map_err(|e| bad(i + 1, &format!("not a CSV row ({e})")))?;
                let start = record.position().map_or(0, |p| p.byte() as usize);
                records.push((start, record));
            }
            // Each row's own text runs from its start to the next row's (quoted newlines included).
            let ends: Vec<usize> = records
                .iter()
                .skip(1)
                .map(|(s, _)| *s)
                .chain([text.len()])
                .collect();
            let mut shard_column = None;
            for (i, ((start, record), end)) in records.into_iter().zip(ends).enumerate() {
                let line = String::from_utf8_lossy(&text[start..end])
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                if i == 0 {
                    shard_column = record.iter().position(|c| c == "shard");
                    header = Some(line);
                    continue;
                }
                let name = record.get(0).ok_or_else(|| bad(i + 1, "the row is empty"))?;
                rows.push(Row {
                    line: i + 1,
                    name: name.to_string(),
                    shard: shard_column.and_then(|c| record.get(c)).map(str::to_string),
                    text: line,
                });
            }
        }
    }
    Ok(Rows { header, rows })
}

/// What [`merge`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Rows written.
    pub rows: usize,
    /// The shard count the rows name (`None` when they name none: files of unsharded runs, or
    /// CSV written without a `shard` column).
    pub count: Option<u32>,
    /// Shards (of `count`) without a single row: one that did not run or did not finish its first
    /// image, or one that owned no image.
    pub missing_shards: Vec<u32>,
}

/// Joins result files (all JSON Lines or all CSV with one header) into `out`, rows sorted by image
/// name. Refuses an image found twice (naming both files), files of different formats or headers,
/// and rows that name different shard counts; a cut-off last line (a shard still running or
/// killed) is an error too, naming the file, so an unfinished shard is not merged by mistake.
/// Shards without a row are an error unless `allow_gaps` (then they are in the report). `out` is
/// written whole to a temporary file first and then renamed, never left half-written.
pub fn merge(inputs: &[PathBuf], out: &Path, allow_gaps: bool) -> Result<MergeReport> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::InvalidConfig("nothing to merge: no shard files given".into()))?;
    let format = RowFormat::from_extension(first).unwrap_or(RowFormat::JsonLines);
    let mut header: Option<String> = None;
    let mut by_name: BTreeMap<String, (String, &Path)> = BTreeMap::new();
    let mut shards: BTreeSet<u32> = BTreeSet::new();
    let mut count: Option<u32> = None;
    for input in inputs {
        if RowFormat::from_extension(input).is_some_and(|f| f != format) {
            return Err(Error::InvalidConfig(format!(
                "{} is not in the format of {} (all shard files must be JSON Lines, or all CSV)",
                input.display(),
                first.display()
            )));
        }
        let text = std::fs::read(input).at(input)?;
        if text.last().is_some_and(|&b| b != b'\n') {
            return Err(Error::InvalidConfig(format!(
                "{}: its last line is cut off (a shard still running, or killed): resume it first",
                input.display()
            )));
        }
        let rows = read_rows(&text, format, input)?;
        if format == RowFormat::Csv {
            let h = rows
                .header
                .clone()
                .ok_or_else(|| Error::InvalidConfig(format!("{}: no header row", input.display())))?;
            match &header {
                Some(want) if *want != h => {
                    return Err(Error::InvalidConfig(format!(
                        "{}: its header `{h}` differs from {}'s `{want}`",
                        input.display(),
                        first.display()
                    )));
                }
                _ => header = Some(h),
            }
        }
        for Row {
            line,
            name,
            shard,
            text: row,
        } in rows.rows
        {
            if let Some(spec) = shard {
                let s = Shard::parse(&spec, |_| None)
                    .map_err(|e| Error::InvalidConfig(format!("{}:{line}: {e}", input.display())))?;
                if count.is_some_and(|c| c != s.count) {
                    return Err(Error::InvalidConfig(format!(
                        "{}:{line}: shard {s} of a split into {} shards, but earlier rows were of {} shards",
                        input.display(),
                        s.count,
                        count.unwrap_or_default()
                    )));
                }
                count = Some(s.count);
                shards.insert(s.index);
            }
            if let Some((_, other)) = by_name.get(&name) {
                return Err(Error::InvalidConfig(format!(
                    "`{name}` is in both {} and {}:{line} (overlapping shards?)",
                    other.display(),
                    input.display()
                )));
            }
            by_name.insert(name, (row, input.as_path()));
        }
    }
    let missing_shards: Vec<u32> =
        count.map_or_else(Vec::new, |c| (0..c).filter(|i| !shards.contains(i)).collect());
    if !missing_shards.is_empty() && !allow_gaps {
        let list: Vec<String> = missing_shards.iter().map(u32::to_string).collect();
        return Err(Error::InvalidConfig(format!(
            "no rows from shard(s) {} of {}: a shard that did not run or whose file was not given \
             (allow gaps to merge anyway, e.g. for a shard that owns no image)",
            list.join(", "),
            count.unwrap_or_default()
        )));
    }
    let mut text = String::new();
    if let Some(h) = &header {
        text.push_str(h);
        text.push('\n');
    }
    for (row, _) in by_name.values() {
        text.push_str(row);
        text.push('\n');
    }
    fracture_fs::write_atomic(out, text.as_bytes()).at(out)?;
    Ok(MergeReport {
        rows: by_name.len(),
        count,
        missing_shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn shard_specs_parse_and_bad_ones_say_why() {
        assert_eq!(Shard::parse("2/8", no_env).unwrap(), Shard { index: 2, count: 8 });
        for (spec, why) in [
            ("8/8", "not below the count"),
            ("1/0", "above 0"),
            ("x/4", "not a whole number"),
            ("3", "expected I/N"),
            ("auto/4", "JOB_COMPLETION_INDEX"),
        ] {
            let err = Shard::parse(spec, no_env).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(spec), "{spec}: {err}");
        }
        let k8s = |name: &str| (name == "JOB_COMPLETION_INDEX").then(|| "3".to_string());
        assert_eq!(Shard::parse("auto/4", k8s).unwrap(), Shard { index: 3, count: 4 });
        // Slurm arrays numbered from 1 map onto 0..N.
        let slurm = |name: &str| match name {
            "SLURM_ARRAY_TASK_ID" => Some("4".to_string()),
            "SLURM_ARRAY_TASK_MIN" => Some("1".to_string()),
            _ => None,
        };
        assert_eq!(
            Shard::parse("auto/4", slurm).unwrap(),
            Shard { index: 3, count: 4 }
        );
        let too_big = |name: &str| (name == "JOB_COMPLETION_INDEX").then(|| "4".to_string());
        assert!(Shard::parse("auto/4", too_big).is_err());
    }

    #[test]
    fn the_hash_is_fnv1a_and_shards_split_the_keys() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash("foobar"), 0x8594_4171_f739_67e8);
        let keys: Vec<String> = (0..400).map(|i| format!("hand/IMG{i:04}.jpg")).collect();
        let mut owners = [0usize; 4];
        for k in &keys {
            let owned: Vec<u32> = (0..4).filter(|&i| Shard { index: i, count: 4 }.owns(k)).collect();
            assert_eq!(owned.len(), 1, "{k} is owned by {owned:?}");
            owners[owned[0] as usize] += 1;
        }
        assert!(owners.iter().all(|&n| (70..=130).contains(&n)), "{owners:?}");
    }

    #[test]
    fn keys_are_relative_and_slash_separated() {
        let root = Path::new("/archive/xr");
        assert_eq!(shard_key(root, &root.join("hand").join("a.png")), "hand/a.png");
        assert_eq!(shard_key(Path::new("/x/a.png"), Path::new("/x/a.png")), "a.png");
    }

    #[test]
    fn resume_cuts_a_cut_off_row_and_merge_refuses_overlaps() {
        let dir = fracture_testkit::fresh_dir(&std::env::temp_dir(), "fracture-archive-resume");
        let a = dir.join("a.jsonl");
        {
            let mut f = ResultsFile::open(&a, RowFormat::JsonLines, "", false).unwrap();
            f.write_all(b"{\"path\":\"x.png\",\"p_fractured\":0.5,\"shard\":\"0/2\"}\n")
                .unwrap();
        }
        // A second open without resume refuses to overwrite.
        assert!(ResultsFile::open(&a, RowFormat::JsonLines, "", false).is_err());
        // A crash mid-row leaves a line without its newline.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&a)
            .unwrap()
            .write_all(br#"{"path":"y.pn"#)
            .unwrap();
        let f = ResultsFile::open(&a, RowFormat::JsonLines, "", true).unwrap();
        assert_eq!(f.done, HashSet::from(["x.png".to_string()]));
        assert_eq!(f.cut_bytes, 13);
        drop(f);
        let b = dir.join("b.jsonl");
        std::fs::write(&b, "{\"path\":\"x.png\",\"shard\":\"1/2\"}\n").unwrap();
        let err = merge(&[a.clone(), b.clone()], &dir.join("m.jsonl"), false).unwrap_err();
        assert!(err.to_string().contains("x.png"), "{err}");
        std::fs::write(&b, "{\"path\":\"z.png\",\"shard\":\"1/3\"}\n").unwrap();
        let err = merge(&[a.clone(), b.clone()], &dir.join("m.jsonl"), false).unwrap_err();
        assert!(err.to_string().contains("3 shards"), "{err}");
        std::fs::write(&b, "").unwrap();
        let err = merge(&[a.clone(), b.clone()], &dir.join("m.jsonl"), false).unwrap_err();
        assert!(err.to_string().contains("shard(s) 1 of 2"), "{err}");
        let report = merge(&[a, b], &dir.join("m.jsonl"), true).unwrap();
        assert_eq!(report.rows, 1);
        assert_eq!(report.missing_shards, vec![1]);
    }

    #[test]
    fn csv_files_resume_against_their_header() {
        let dir = fracture_testkit::fresh_dir(&std::env::temp_dir(), "fracture-archive-csv");
        let a = dir.join("a.csv");
        let mut f = ResultsFile::open(&a, RowFormat::Csv, "path,p_fractured", false).unwrap();
        f.write_all(b"a.png,0.250000\n").unwrap();
        drop(f);
        let err = ResultsFile::open(&a, RowFormat::Csv, "path,p_fractured,shard", true).unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
        let f = ResultsFile::open(&a, RowFormat::Csv, "path,p_fractured", true).unwrap();
        assert_eq!(f.done.len(), 1);
    }
}
