//! Paths as text for outputs (JSON, CSV, tables): every path renders, and two different paths
//! render differently.

use std::path::Path;

/// `path` as text. Valid UTF-8 renders as itself; on Unix, each byte that is not part of valid
/// UTF-8 renders as `\xHH` (two upper-case hex digits), so unlike `Path::display` or
/// `to_string_lossy` two names that differ only in such bytes stay distinct (a name that
/// literally contains such an escape is the one ambiguity). Elsewhere, the lossy conversion.
pub fn path_text(path: &Path) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let mut out = String::new();
        for chunk in path.as_os_str().as_bytes().utf8_chunks() {
            out.push_str(chunk.valid());
            for b in chunk.invalid() {
                out.push_str(&format!("\\x{b:02X}"));
            }
        }
        out
    }
    #[cfg(not(unix))]
    {
        path.to_string_lossy().into_owned()
    }
}

/// `text` with every control character escaped (`\n`, `\r`, `\t`, else `\u{HH}`), so that a
/// file name holding a newline cannot forge a row of a table or a line of a report.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:02X}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// `path` for human-readable output (tables, warnings, errors): [`path_text`] with control
/// characters escaped ([`escape_controls`]). Machine formats (JSON, CSV) quote names instead and
/// use [`path_text`].
pub fn path_shown(path: &Path) -> String {
    escape_controls(&path_text(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_display() {
        assert_eq!(
            path_shown(Path::new("a/two\nlines\r\t\u{1b}[31m.jpg")),
            "a/two\\nlines\\r\\t\\u{1B}[31m.jpg"
        );
        assert_eq!(path_shown(Path::new("plain ü.png")), "plain ü.png");
    }

    #[test]
    fn valid_names_are_unchanged() {
        assert_eq!(
            path_text(Path::new("a/not fractured/ü ,\"x\".png")),
            "a/not fractured/ü ,\"x\".png"
        );
    }

    #[cfg(unix)]
    #[test]
    fn invalid_bytes_are_escaped_and_stay_distinct() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let a = path_text(Path::new(OsStr::from_bytes(b"dir/x\xff.png")));
        let b = path_text(Path::new(OsStr::from_bytes(b"dir/x\xfe.png")));
        assert_eq!(a, "dir/x\\xFF.png");
        assert_ne!(a, b);
        let lossy = |b: &[u8]| Path::new(OsStr::from_bytes(b)).to_string_lossy().into_owned();
        assert_eq!(
            lossy(b"x\xff"),
            lossy(b"x\xfe"),
            "what the lossy conversion would have merged"
        );
    }
}
