//! Finding Kaggle credentials where Kaggle's own tools keep them. Values are never logged or shown.

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine;

/// A credential for the Kaggle API.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// An API token, sent as `Authorization: Bearer <token>`.
    Bearer(String),
    /// A user name and API key, sent as HTTP basic authentication.
    Basic {
        /// Kaggle user name.
        username: String,
        /// API key.
        key: String,
    },
}

impl std::fmt::Debug for Credential {
    /// Redacted: a credential's value never appears in logs or errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Credential::Basic { .. } => f.write_str("Basic(<redacted>)"),
        }
    }
}

impl Credential {
    /// The value of the `Authorization` header.
    pub(crate) fn header(&self) -> String {
        match self {
            Credential::Bearer(token) => format!("Bearer {token}"),
            Credential::Basic { username, key } => {
                let raw = format!("{username}:{key}");
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
            }
        }
    }
}

/// Where to look: environment variables and the home folder. [`CredentialLookup::from_process`]
/// reads the real ones; tests build their own.
#[derive(Debug, Clone, Default)]
pub struct CredentialLookup {
    /// Environment variables.
    pub vars: HashMap<String, String>,
    /// The home folder.
    pub home: Option<PathBuf>,
}

/// The credential found, and every source looked at (names only).
#[derive(Debug, Clone)]
pub struct Found {
    /// The first credential found, with the name of its source.
    pub credential: Option<(String, Credential)>,
    /// Every source looked at, in order.
    pub tried: Vec<String>,
}

impl CredentialLookup {
    /// This process's environment and home folder.
    pub fn from_process() -> Self {
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("KAGGLE_") || k == "XDG_CONFIG_HOME")
            .collect();
        let home = std::env::var_os("HOME")
            .or_else(|| std::env::var_os("USERPROFILE"))
            .map(PathBuf::from);
        CredentialLookup { vars, home }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// Looks, in the order Kaggle's tools read them: `KAGGLE_API_TOKEN` (the token, or a path to a
    /// file holding it), `~/.kaggle/access_token`, `kaggle.json` in `$KAGGLE_CONFIG_DIR`, `~/.kaggle`
    /// and `$XDG_CONFIG_HOME/kaggle` (default `~/.config/kaggle`), then `KAGGLE_USERNAME` +
    /// `KAGGLE_KEY`. The first one found is used.
    pub fn find(&self) -> Found {
        let mut tried = Vec::new();
        let home = self.home.clone();

        tried.push("KAGGLE_API_TOKEN".to_string());
        if let Some(v) = self.var("KAGGLE_API_TOKEN") {
            let path = PathBuf::from(v);
            let token = if path.is_file() {
                read_trimmed(&path)
            } else {
                Some(v.to_string())
            };
            if let Some(token) = token.filter(|t| !t.is_empty()) {
                return Found {
                    credential: Some(("KAGGLE_API_TOKEN".into(), Credential::Bearer(token))),
                    tried,
                };
            }
        }
        if let Some(home) = &home {
            let path = home.join(".kaggle/access_token");
            tried.push(path.display().to_string());
            if let Some(token) = read_trimmed(&path).filter(|t| !t.is_empty()) {
                return Found {
                    credential: Some((path.display().to_string(), Credential::Bearer(token))),
                    tried,
                };
            }
        }
        let mut json_dirs: Vec<PathBuf> = Vec::new();
        if let Some(dir) = self.var("KAGGLE_CONFIG_DIR") {
            json_dirs.push(PathBuf::from(dir));
        }
        if let Some(home) = &home {
            json_dirs.push(home.join(".kaggle"));
        }
        match (self.var("XDG_CONFIG_HOME"), &home) {
            (Some(xdg), _) => json_dirs.push(PathBuf::from(xdg).join("kaggle")),
            (None, Some(home)) => json_dirs.push(home.join(".config/kaggle")),
            (None, None) => {}
        }
        for dir in json_dirs {
            let path = dir.join("kaggle.json");
            tried.push(path.display().to_string());
            if let Some(c) = read_kaggle_json(&path) {
                return Found {
                    credential: Some((path.display().to_string(), c)),
                    tried,
                };
            }
        }
        tried.push("KAGGLE_USERNAME + KAGGLE_KEY".to_string());
        if let (Some(username), Some(key)) = (self.var("KAGGLE_USERNAME"), self.var("KAGGLE_KEY")) {
            let c = Credential::Basic {
                username: username.to_string(),
                key: key.to_string(),
            };
            return Found {
                credential: Some(("KAGGLE_USERNAME + KAGGLE_KEY".into(), c)),
                tried,
            };
        }
        Found {
            credential: None,
            tried,
        }
    }
}

fn read_trimmed(path: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_kaggle_json(path: &std::path::Path) -> Option<Credential> {
    #[derive(serde::Deserialize)]
    struct KaggleJson {
        username: String,
        key: String,
    }
    let text = std::fs::read_to_string(path).ok()?;
    let j: KaggleJson = serde_json::from_str(&text).ok()?;
    (!j.username.is_empty() && !j.key.is_empty()).then_some(Credential::Basic {
        username: j.username,
        key: j.key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fracture-creds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn lookup(vars: &[(&str, &str)], home: Option<PathBuf>) -> CredentialLookup {
        CredentialLookup {
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            home,
        }
    }

    #[test]
    fn order_follows_kaggles_tools() {
        let home = dir("order");
        std::fs::create_dir_all(home.join(".kaggle")).unwrap();
        std::fs::write(home.join(".kaggle/kaggle.json"), r#"{"username":"u","key":"k"}"#).unwrap();
        let both = [("KAGGLE_USERNAME", "envuser"), ("KAGGLE_KEY", "envkey")];
        let found = lookup(&both, Some(home.clone())).find();
        assert_eq!(
            found.credential.unwrap().1,
            Credential::Basic {
                username: "u".into(),
                key: "k".into()
            }
        );
        std::fs::write(home.join(".kaggle/access_token"), "tok\n").unwrap();
        let found = lookup(&both, Some(home.clone())).find();
        assert_eq!(found.credential.unwrap().1, Credential::Bearer("tok".into()));
        let found = lookup(&[("KAGGLE_API_TOKEN", "direct")], Some(home.clone())).find();
        assert_eq!(found.credential.unwrap().1, Credential::Bearer("direct".into()));
        let token_file = home.join("token.txt");
        std::fs::write(&token_file, " from-file \n").unwrap();
        let found = lookup(&[("KAGGLE_API_TOKEN", token_file.to_str().unwrap())], Some(home)).find();
        assert_eq!(
            found.credential.unwrap().1,
            Credential::Bearer("from-file".into())
        );
    }

    #[test]
    fn env_pair_is_last_and_nothing_found_lists_every_source() {
        let home = dir("none");
        let found = lookup(
            &[("KAGGLE_USERNAME", "a"), ("KAGGLE_KEY", "b")],
            Some(home.clone()),
        )
        .find();
        let (source, c) = found.credential.unwrap();
        assert_eq!(source, "KAGGLE_USERNAME + KAGGLE_KEY");
        assert_eq!(c.header(), "Basic YTpi");
        let xdg = dir("xdg");
        let found = lookup(&[("XDG_CONFIG_HOME", xdg.to_str().unwrap())], Some(home)).find();
        assert!(found.credential.is_none());
        let tried = found.tried.join(" | ");
        assert!(
            tried.contains("KAGGLE_API_TOKEN") && tried.contains("access_token"),
            "{tried}"
        );
        assert!(
            tried.contains(&xdg.join("kaggle/kaggle.json").display().to_string()),
            "{tried}"
        );
        assert!(tried.ends_with("KAGGLE_USERNAME + KAGGLE_KEY"), "{tried}");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credential::Basic {
            username: "user".into(),
            key: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!format!("{:?}", Credential::Bearer("s3cret".into())).contains("s3cret"));
    }
}
