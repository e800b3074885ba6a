//! `cargo xtask docs`: builds the book in `docs/` with mdBook and checks every link inside it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

type DynError = Box<dyn std::error::Error>;

/// Builds `docs/` into `docs/book/` and checks its links: each relative link must name a file of
/// the book and, with `#anchor`, an element with that id in it. Links to other sites are not
/// followed (there is no network here). Returns an error listing every broken link.
pub(crate) fn run(root: &Path) -> Result<(), DynError> {
    let book = root.join("docs");
    let mdbook = std::env::var("MDBOOK").unwrap_or_else(|_| "mdbook".into());
    let status = Command::new(&mdbook)
        .arg("build")
        .arg(&book)
        .status()
        .map_err(|e| {
            format!("cannot run `{mdbook}` ({e}): install it with `cargo install mdbook --no-default-features`, or set MDBOOK")
        })?;
    if !status.success() {
        return Err(format!("`{mdbook} build docs` failed ({status})").into());
    }
    let out = book.join("book");
    let broken = check_links(&out)?;
    if broken.is_empty() {
        println!("docs: built into {}, every internal link resolves", out.display());
        Ok(())
    } else {
        Err(format!(
            "{} broken link(s) in the book:\n  {}",
            broken.len(),
            broken.join("\n  ")
        )
        .into())
    }
}

/// Every `href`/`src` value in an HTML text.
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    out
}

/// Every `id` value in an HTML text.
fn ids(html: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut rest = html;
    while let Some(i) = rest.find(" id=\"") {
        rest = &rest[i + 5..];
        if let Some(end) = rest.find('"') {
            out.insert(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    out
}

fn html_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            html_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "html") {
            out.push(path);
        }
    }
    Ok(())
}

/// The broken internal links of the built book at `out`, as `page: link (why)`.
pub(crate) fn check_links(out: &Path) -> Result<Vec<String>, DynError> {
    let mut pages = Vec::new();
    html_files(out, &mut pages)?;
    pages.sort();
    let mut texts: HashMap<PathBuf, String> = HashMap::new();
    for p in &pages {
        texts.insert(p.canonicalize()?, std::fs::read_to_string(p)?);
    }
    let mut broken = Vec::new();
    for page in &pages {
        let here = page.canonicalize()?;
        let text = &texts[&here];
        for link in links(text) {
            let external = link.contains("://") || link.starts_with("mailto:") || link.starts_with("data:");
            if external || link.is_empty() || link.starts_with("javascript:") {
                continue;
            }
            let (file, anchor) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.as_str(), None),
            };
            let file = file.split('?').next().unwrap_or(file);
            let target = if file.is_empty() {
                here.clone()
            } else {
                let joined = here.parent().unwrap_or(out).join(file);
                match joined.canonicalize() {
                    Ok(t) => t,
                    Err(_) => {
                        broken.push(format!("{}: {link} (no such file)", page.display()));
                        continue;
                    }
                }
            };
            if let Some(anchor) = anchor.filter(|a| !a.is_empty()) {
                let target_text = match texts.get(&target) {
                    Some(t) => t.clone(),
                    None => std::fs::read_to_string(&target).unwrap_or_default(),
                };
                if !ids(&target_text).contains(anchor) {
                    broken.push(format!(
                        "{}: {link} (no element with id `{anchor}`)",
                        page.display()
                    ));
                }
            }
        }
    }
    Ok(broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_files_and_anchors_are_found_and_good_links_pass() {
        let dir = std::env::temp_dir().join(format!("xtask-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(
            dir.join("a.html"),
            r##"<h1 id="top">A</h1><a href="sub/b.html#here">ok</a><a href="#top">ok</a>
               <a href="missing.html">bad</a><a href="sub/b.html#nowhere">bad</a><a href="https://x.org/y">ext</a>"##,
        )
        .unwrap();
        std::fs::write(
            dir.join("sub/b.html"),
            r#"<h2 id="here">B</h2><img src="../a.html">"#,
        )
        .unwrap();
        let broken = check_links(&dir).unwrap();
        assert_eq!(broken.len(), 2, "{broken:?}");
        assert!(
            broken[0].contains("missing.html") && broken[1].contains("nowhere"),
            "{broken:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
