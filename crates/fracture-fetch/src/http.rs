//! Resumable downloads over HTTP(S): redirects followed by hand (credentials never leave the API's
//! origin), `Range` resumption into a `.part` file, retries with backoff.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Error, Event};
use fracture_fs::AtPath;

/// Checksums a server announced for the whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Announced {
    /// Base64 MD5 (from `x-goog-hash: md5=` or `Content-MD5`).
    pub(crate) md5: Option<String>,
    /// Base64 big-endian CRC32C (from `x-goog-hash: crc32c=`).
    pub(crate) crc32c: Option<String>,
}

/// How a download ended short of success, for the caller to decide.
#[derive(Debug)]
pub(crate) enum Failure {
    /// HTTP 401 or 403 from the API.
    Refused(u16),
    /// Anything else.
    Other(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

pub(crate) struct Client {
    agent: ureq::Agent,
    pub(crate) retries: u32,
    pub(crate) backoff: Duration,
}

/// Scheme, host and port of a URL, lower-cased, with default ports filled in.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?.to_lowercase();
    let scheme = scheme.to_lowercase();
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority
    } else {
        let port = if scheme == "https" { 443 } else { 80 };
        format!("{authority}:{port}")
    };
    Some(format!("{scheme}://{with_port}"))
}

/// Resolves a `Location` header against the URL that sent it.
fn resolve(location: &str, base: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(path) = location.strip_prefix("//") {
        return format!("{scheme}://{path}");
    }
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}");
    }
    let dir = match base.rfind('/') {
        Some(i) if i > scheme.len() + 2 => &base[..=i],
        _ => base,
    };
    format!("{dir}{location}")
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn announced(resp: &ureq::http::Response<ureq::Body>) -> Announced {
    let mut a = Announced::default();
    for value in resp.headers().get_all("x-goog-hash") {
        for part in value.to_str().unwrap_or_default().split(',') {
            match part.trim().split_once('=') {
                Some(("md5", v)) => a.md5 = Some(v.to_string()),
                Some(("crc32c", v)) => a.crc32c = Some(v.to_string()),
                _ => {}
            }
        }
    }
    if a.md5.is_none() {
        a.md5 = header(resp, "content-md5");
    }
    a
}

/// `bytes START-END/TOTAL` → (START, TOTAL); `bytes */TOTAL` → (None, TOTAL).
fn content_range(value: &str) -> (Option<u64>, Option<u64>) {
    let Some(rest) = value.trim().strip_prefix("bytes ") else {
        return (None, None);
    };
    let (range, total) = rest.split_once('/').unwrap_or((rest, "*"));
    let start = range.split_once('-').and_then(|(s, _)| s.parse().ok());
    (start, total.parse().ok())
}

/// Whether a transport error means the server could not be reached at all.
fn unreachable(e: &ureq::Error) -> bool {
    if e.to_string().contains("failed to lookup address") {
        return true;
    }
    match e {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::NetworkUnreachable
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::AddrNotAvailable
        ),
        _ => false,
    }
}

impl Client {
    pub(crate) fn new(connect_timeout: Duration, retries: u32, backoff: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(connect_timeout))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(concat!("fracture-fetch/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Client {
            agent,
            retries,
            backoff,
        }
    }

    /// GET `url`, following up to 10 redirects; `Authorization` is sent only to the origin of `url`.
    fn get(
        &self,
        url: &str,
        auth: Option<&str>,
        offset: u64,
    ) -> std::result::Result<(ureq::http::Response<ureq::Body>, String), (ureq::Error, String)> {
        let home = origin(url);
        let mut current = url.to_string();
        for _ in 0..10 {
            let mut req = self.agent.get(&current);
            if let Some(a) = auth
                && origin(&current) == home
            {
                req = req.header("Authorization", a);
            }
            if offset > 0 {
                req = req.header("Range", format!("bytes={offset}-"));
            }
            let resp = req.call().map_err(|e| (e, current.clone()))?;
            let status = resp.status().as_u16();
            if (300..400).contains(&status)
                && let Some(location) = header(&resp, "location")
            {
                current = resolve(&location, &current);
                continue;
            }
            return Ok((resp, current));
        }
        Err((ureq::Error::TooManyRedirects, current))
    }

    /// The pause after failed attempt `attempt` (1-based): the backoff, doubled per attempt, at most
    /// 30 s.
    fn retry_wait(&self, attempt: u32) -> Duration {
        self.backoff
            .saturating_mul(1 << (attempt - 1).min(5))
            .min(Duration::from_secs(30))
    }

    /// GETs a small document (an API answer) of at most `max_bytes`, retrying server errors and
    /// dropped connections; an unreachable server fails at once.
    pub(crate) fn get_small(&self, url: &str, max_bytes: u64) -> crate::Result<Vec<u8>> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let reason = match self.get(url, None, 0) {
                Err((e, at)) if unreachable(&e) || attempt >= 2 => {
                    return Err(Error::Unreachable {
                        url: at,
                        reason: e.to_string(),
                    });
                }
                Err((e, _)) => e.to_string(),
                Ok((mut resp, at)) => match resp.status().as_u16() {
                    200 => {
                        let mut body = Vec::new();
                        match resp
                            .body_mut()
                            .as_reader()
                            .take(max_bytes + 1)
                            .read_to_end(&mut body)
                        {
                            Ok(_) if body.len() as u64 > max_bytes => {
                                return Err(Error::GaveUp {
                                    url: at,
                                    attempts: attempt,
                                    reason: format!("the answer is larger than {max_bytes} bytes"),
                                });
                            }
                            Ok(_) => return Ok(body),
                            Err(e) => format!("the connection dropped ({e})"),
                        }
                    }
                    status @ (500..=599 | 408 | 429) => format!("HTTP {status} from {at}"),
                    status => return Err(Error::Http { url: at, status }),
                },
            };
            if attempt > self.retries {
                return Err(Error::GaveUp {
                    url: url.to_string(),
                    attempts: attempt,
                    reason,
                });
            }
            let wait = self.retry_wait(attempt);
            std::thread::sleep(wait);
        }
    }

    /// Downloads `url` into `part` (resuming from its current length), retrying server errors and
    /// dropped connections. Returns the checksums the file server announced.
    pub(crate) fn download(
        &self,
        url: &str,
        auth: Option<&str>,
        part: &Path,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> std::result::Result<Announced, Failure> {
        let mut attempt = 0u32;
        let mut received_any = false;
        loop {
            attempt += 1;
            let offset = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
            let target = Target {
                url,
                auth,
                part,
                offset,
                attempt,
            };
            let outcome = self.try_once(&target, &mut received_any, on_event);
            let reason = match outcome {
                Ok(Some(announced)) => return Ok(announced),
                Ok(None) => "the connection closed before the end of the file".to_string(),
                Err(Step::Fatal(f)) => return Err(f),
                Err(Step::Retry(reason)) => reason,
            };
            if attempt > self.retries {
                return Err(Failure::Other(Error::GaveUp {
                    url: url.to_string(),
                    attempts: attempt,
                    reason,
                }));
            }
            let wait = self.retry_wait(attempt);
            on_event(Event::Retry {
                attempt,
                wait,
                reason: &reason,
            });
            std::thread::sleep(wait);
        }
    }

    /// One request. `Ok(Some)` = complete; `Ok(None)` = body cut short (retry resumes).
    fn try_once(
        &self,
        target: &Target<'_>,
        received_any: &mut bool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> std::result::Result<Option<Announced>, Step> {
        let Target {
            url,
            auth,
            part,
            offset,
            attempt,
        } = *target;
        let (mut resp, final_url) = match self.get(url, auth, offset) {
            Ok(r) => r,
            // Nothing ever came back: a clear no-route error ends it at once, anything else after one
            // retry, so that an offline machine hears about it within seconds.
            Err((e, at)) if !*received_any && (unreachable(&e) || attempt >= 2) => {
                return Err(Step::Fatal(Failure::Other(Error::Unreachable {
                    url: at,
                    reason: e.to_string(),
                })));
            }
            Err((e, _)) => return Err(Step::Retry(e.to_string())),
        };
        *received_any = true;
        let status = resp.status().as_u16();
        let (range_start, range_total) = header(&resp, "content-range")
            .map(|v| content_range(&v))
            .unwrap_or((None, None));
        let mut start = offset;
        match status {
            200 => start = 0,
            206 => {
                if range_start != Some(offset) {
                    start = 0;
                }
            }
            416 => {
                // Nothing left to send: complete if the server's total is what we hold.
                if range_total == Some(offset) && offset > 0 {
                    return Ok(Some(announced(&resp)));
                }
                let _ = std::fs::remove_file(part);
                return Err(Step::Retry("the server refused to resume; starting over".into()));
            }
            401 | 403 => return Err(Step::Fatal(Failure::Refused(status))),
            404 => {
                return Err(Step::Fatal(Failure::Other(Error::Http {
                    url: final_url,
                    status,
                })));
            }
            500..=599 | 408 | 429 => return Err(Step::Retry(format!("HTTP {status} from {final_url}"))),
            _ => {
                return Err(Step::Fatal(Failure::Other(Error::Http {
                    url: final_url,
                    status,
                })));
            }
        }
        let announced = announced(&resp);
        let length: Option<u64> = header(&resp, "content-length").and_then(|v| v.parse().ok());
        let total = range_total.or(length.map(|l| l + start));
        let fatal = |e: fracture_fs::PathError| Step::Fatal(Failure::Other(Error::from(e)));
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(start > 0)
            .truncate(start == 0)
            .open(part)
            .at(part)
            .map_err(fatal)?;
        let mut done = start;
        on_event(Event::Progress {
            downloaded: done,
            total,
        });
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut last = Instant::now();
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    file.write_all(&buf[..n]).at(part).map_err(fatal)?;
                    done += n as u64;
                    if last.elapsed() >= Duration::from_millis(100) {
                        on_event(Event::Progress {
                            downloaded: done,
                            total,
                        });
                        last = Instant::now();
                    }
                }
                Err(e) => {
                    file.sync_all().at(part).map_err(fatal)?;
                    return Err(Step::Retry(format!(
                        "the connection dropped after {done} bytes ({e})"
                    )));
                }
            }
        }
        file.sync_all().at(part).map_err(fatal)?;
        on_event(Event::Progress {
            downloaded: done,
            total,
        });
        match total {
            Some(t) if done < t => Ok(None),
            _ => Ok(Some(announced)),
        }
    }
}

enum Step {
    Fatal(Failure),
    Retry(String),
}

/// One attempt's request: where from, with which credential, into which file, from which byte.
#[derive(Clone, Copy)]
struct Target<'a> {
    url: &'a str,
    auth: Option<&'a str>,
    part: &'a Path,
    offset: u64,
    attempt: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert_eq!(
            origin("https://www.kaggle.com/api/v1/x"),
            Some("https://www.kaggle.com:443".into())
        );
        assert_eq!(
            origin("HTTPS://WWW.Kaggle.com:443/"),
            Some("https://www.kaggle.com:443".into())
        );
        assert_ne!(
            origin("http://127.0.0.1:8080/a"),
            origin("http://127.0.0.2:8080/a")
        );
        assert_ne!(
            origin("http://127.0.0.1:8080/a"),
            origin("http://127.0.0.1:8081/a")
        );
        assert_ne!(origin("https://a.com/"), origin("http://a.com/"));
    }

    #[test]
    fn locations_resolve_against_their_base() {
        let base = "http://h:1/api/v1/datasets/download/o/s";
        assert_eq!(resolve("http://x:2/f.zip", base), "http://x:2/f.zip");
        assert_eq!(resolve("/f.zip?sig=1", base), "http://h:1/f.zip?sig=1");
        assert_eq!(resolve("//cdn/f.zip", base), "http://cdn/f.zip");
        assert_eq!(
            resolve("f.zip", base),
            "http://h:1/api/v1/datasets/download/o/f.zip"
        );
    }

    #[test]
    fn content_range_parses() {
        assert_eq!(content_range("bytes 100-199/1000"), (Some(100), Some(1000)));
        assert_eq!(content_range("bytes */1000"), (None, Some(1000)));
        assert_eq!(content_range("bytes 0-9/*"), (Some(0), None));
        assert_eq!(content_range("junk"), (None, None));
    }
}
