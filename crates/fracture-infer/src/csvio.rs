//! Reading the CSV files a user gives (box files, group tables, metrics): errors name the file and
//! line.

use std::path::Path;

use crate::Error;
use crate::Result;

/// An error about line `line` of the CSV file `path`.
pub(crate) fn csv_error(path: &Path, line: u64, why: &str) -> Error {
    Error::InvalidConfig(format!("{}:{line}: {why}", path.display()))
}

/// Opens the CSV file `path` and reads its header row; a file that cannot be opened is an I/O error
/// naming it, a header that cannot be read an error naming line 1.
pub(crate) fn open_csv(path: &Path) -> Result<(csv::Reader<std::fs::File>, csv::StringRecord)> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| match e.into_kind() {
        csv::ErrorKind::Io(io) => Error::Io(fracture_fs::PathError::new(path, io)),
        other => csv_error(path, 1, &format!("{other:?}")),
    })?;
    let header = reader
        .headers()
        .map_err(|e| csv_error(path, 1, &e.to_string()))?
        .clone();
    Ok((reader, header))
}
