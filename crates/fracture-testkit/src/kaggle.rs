//! A stand-in for the Kaggle download API and its storage host, on loopback, for tests and offline
//! demonstrations. Nothing here reaches beyond 127.0.0.0/8.
//!
//! The API listens on 127.0.0.1 and answers `GET /api/v1/datasets/download/{owner}/{slug}` with a
//! redirect to the storage host on 127.0.0.2 (another origin, as on kaggle.com), which serves the zip
//! with `Content-Length`, `Range` support and an `x-goog-hash: md5=` header. Every request is logged.
//!
//! The same API listener stands in for figshare's: `GET /v2/articles/{id}` lists the dataset named
//! `figshare/{id}` as one zip file with its size, hexadecimal MD5 and a download address on the
//! storage host ([`KaggleStub::figshare_base_url`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use md5::{Digest, Md5};

/// One request the stub received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StubRequest {
    /// `api` or `storage`.
    pub server: &'static str,
    /// The request path (with query).
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

/// What the storage host says about checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Announce {
    /// The archive's real MD5.
    #[default]
    Correct,
    /// A wrong MD5 (to test verification).
    Wrong,
    /// No checksum header.
    Nothing,
}

/// How the stub behaves.
#[derive(Debug, Clone, Default)]
pub struct StubOptions {
    /// `owner/slug` → zip bytes.
    pub datasets: Vec<(String, Vec<u8>)>,
    /// When set, the API answers 403 unless `Authorization` equals this.
    pub require_auth: Option<String>,
    /// Close the connection after this many body bytes of the first storage response.
    pub drop_first_download_after: Option<usize>,
    /// The first N storage requests get HTTP 503.
    pub unavailable_first: usize,
    /// The checksum header.
    pub announce: Announce,
    /// Fixed ports (API, storage); 0 picks free ones.
    pub ports: (u16, u16),
    /// Stop serving after this long (default 10 minutes): the stub never outlives its use.
    pub lifetime: Option<Duration>,
}

/// A running stub; stops when dropped (or when its lifetime ends).
#[derive(Debug)]
pub struct KaggleStub {
    /// The API base URL to pass as `--base-url` / `FRACTURE_KAGGLE_BASE_URL`.
    pub base_url: String,
    /// The figshare API base URL to pass as `--figshare-url` / `FRACTURE_FIGSHARE_BASE_URL`.
    pub figshare_base_url: String,
    log: Arc<Mutex<Vec<StubRequest>>>,
    stop: Arc<AtomicBool>,
    addrs: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    options: StubOptions,
    storage_base: String,
    log: Arc<Mutex<Vec<StubRequest>>>,
    storage_requests: AtomicUsize,
}

impl KaggleStub {
    /// Starts the two listeners.
    pub fn start(options: StubOptions) -> std::io::Result<KaggleStub> {
        let api = TcpListener::bind(("127.0.0.1", options.ports.0))?;
        let storage = TcpListener::bind(("127.0.0.2", options.ports.1))?;
        let (api_addr, storage_addr) = (api.local_addr()?, storage.local_addr()?);
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + options.lifetime.unwrap_or(Duration::from_secs(600));
        let shared = Arc::new(Shared {
            options,
            storage_base: format!("http://{storage_addr}"),
            log: log.clone(),
            storage_requests: AtomicUsize::new(0),
        });
        let mut threads = Vec::new();
        for (listener, is_api) in [(api, true), (storage, false)] {
            let shared = shared.clone();
            let stop = stop.clone();
            listener.set_nonblocking(true)?;
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                            let _ = if is_api {
                                serve_api(stream, &shared)
                            } else {
                                serve_storage(stream, &shared)
                            };
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Ok(KaggleStub {
            base_url: format!("http://{api_addr}/api/v1"),
            figshare_base_url: format!("http://{api_addr}/v2"),
            log,
            stop,
            addrs: vec![api_addr, storage_addr],
            threads,
        })
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<StubRequest> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The listening addresses (API, storage).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl Drop for KaggleStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_request(stream: &mut TcpStream) -> Option<(String, HashMap<String, String>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && buf.len() < 64 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let path = lines.next()?.split_whitespace().nth(1)?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Some((path, headers))
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn log(shared: &Shared, server: &'static str, path: &str, headers: &HashMap<String, String>) {
    if let Ok(mut l) = shared.log.lock() {
        l.push(StubRequest {
            server,
            path: path.to_string(),
            authorization: headers.get("authorization").cloned(),
            range: headers.get("range").cloned(),
        });
    }
}

fn serve_api(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some((path, headers)) = read_request(&mut stream) else {
        return Ok(());
    };
    log(shared, "api", &path, &headers);
    if let Some(article) = path.strip_prefix("/v2/articles/") {
        return serve_figshare_article(&mut stream, shared, article);
    }
    let Some(dataset) = path.strip_prefix("/api/v1/datasets/download/") else {
        return respond(&mut stream, "404 Not Found", &[], b"{\"message\":\"not found\"}");
    };
    if !shared.options.datasets.iter().any(|(d, _)| d == dataset) {
        return respond(
            &mut stream,
            "404 Not Found",
            &[],
            b"{\"message\":\"dataset not found\"}",
        );
    }
    if let Some(expected) = &shared.options.require_auth
        && headers.get("authorization") != Some(expected)
    {
        let status = if headers.contains_key("authorization") {
            "401 Unauthorized"
        } else {
            "403 Forbidden"
        };
        return respond(&mut stream, status, &[], b"{\"message\":\"permission denied\"}");
    }
    let location = format!(
        "{}/storage/{}.zip?X-Signature=stub",
        shared.storage_base,
        dataset.replace('/', "_")
    );
    respond(&mut stream, "302 Found", &[("Location", location)], b"")
}

fn serve_figshare_article(stream: &mut TcpStream, shared: &Shared, article: &str) -> std::io::Result<()> {
    let name = format!("figshare/{article}");
    let Some((_, zip)) = shared.options.datasets.iter().find(|(d, _)| *d == name) else {
        return respond(
            stream,
            "404 Not Found",
            &[],
            b"{\"message\":\"Entity not found: article\"}",
        );
    };
    let digest = match shared.options.announce {
        Announce::Wrong => Md5::digest(b"something else"),
        _ => Md5::digest(zip),
    };
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let md5 = match shared.options.announce {
        Announce::Nothing => serde_json::Value::Null,
        _ => serde_json::Value::String(hex),
    };
    let body = serde_json::json!({
        "id": article.parse::<u64>().unwrap_or(0),
        "title": "stand-in article",
        "files": [
            {"name": "README.txt", "size": 10, "computed_md5": null,
             "download_url": format!("{}/storage/none", shared.storage_base)},
            {"name": "FracAtlas.zip", "size": zip.len(), "computed_md5": md5,
             "download_url": format!("{}/storage/figshare_{article}.zip", shared.storage_base)}
        ]
    });
    respond(
        stream,
        "200 OK",
        &[("Content-Type", "application/json".into())],
        body.to_string().as_bytes(),
    )
}

fn serve_storage(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some((path, headers)) = read_request(&mut stream) else {
        return Ok(());
    };
    log(shared, "storage", &path, &headers);
    let n = shared.storage_requests.fetch_add(1, Ordering::Relaxed);
    if n < shared.options.unavailable_first {
        return respond(&mut stream, "503 Service Unavailable", &[], b"try again");
    }
    let name = path
        .trim_start_matches("/storage/")
        .split('?')
        .next()
        .unwrap_or_default();
    let Some((_, zip)) = shared
        .options
        .datasets
        .iter()
        .find(|(d, _)| format!("{}.zip", d.replace('/', "_")) == name)
    else {
        return respond(&mut stream, "404 Not Found", &[], b"no such object");
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut extra: Vec<(&str, String)> = vec![("Accept-Ranges", "bytes".into())];
    match shared.options.announce {
        Announce::Correct => extra.push(("x-goog-hash", format!("md5={}", b64.encode(Md5::digest(zip))))),
        Announce::Wrong => extra.push((
            "x-goog-hash",
            format!("md5={}", b64.encode(Md5::digest(b"something else"))),
        )),
        Announce::Nothing => {}
    }
    let start = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let (status, body) = match start {
        Some(s) if s >= zip.len() => {
            extra.push(("Content-Range", format!("bytes */{}", zip.len())));
            return respond(&mut stream, "416 Range Not Satisfiable", &extra, b"");
        }
        Some(s) => {
            extra.push((
                "Content-Range",
                format!("bytes {s}-{}/{}", zip.len() - 1, zip.len()),
            ));
            ("206 Partial Content", &zip[s..])
        }
        None => ("200 OK", &zip[..]),
    };
    if n == shared.options.unavailable_first
        && let Some(cut) = shared.options.drop_first_download_after
    {
        // Promise the whole body, send part of it, hang up.
        let mut head = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in &extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body[..cut.min(body.len())])?;
        stream.flush()?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    respond(&mut stream, status, &extra, body)
}

/// A zip holding `entries` (name, bytes), deflated.
pub fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        writer.start_file(*name, options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// A zip shaped like the Kaggle "Bone Fracture Multi-Region X-ray Data" download:
/// `Bone_Fracture_Binary_Classification/Bone_Fracture_Binary_Classification/{train,val,test}/{fractured,not fractured}/*.jpg`,
/// with `per_class` generated X-ray-like JPEGs of `size` pixels in each of the six folders.
pub fn kaggle_shaped_zip(per_class: usize, size: u32) -> Vec<u8> {
    let root = "Bone_Fracture_Binary_Classification/Bone_Fracture_Binary_Classification";
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seed = 1000;
    for split in ["train", "val", "test"] {
        for (class, fractured) in [("fractured", true), ("not fractured", false)] {
            for i in 0..per_class {
                seed += 1;
                let img = crate::synthetic_xray(size, size, fractured, seed);
                let mut jpeg = std::io::Cursor::new(Vec::new());
                image::DynamicImage::ImageLuma8(img)
                    .write_to(&mut jpeg, image::ImageFormat::Jpeg)
                    .unwrap();
                entries.push((
                    format!("{root}/{split}/{class}/{split}_{i:03}.jpg"),
                    jpeg.into_inner(),
                ));
            }
        }
    }
    let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    zip_of(&refs)
}

/// A zip shaped like the FracAtlas release on figshare: `FracAtlas/images/{Fractured,Non_fractured}/IMG*.jpg`
/// (generated X-ray-like JPEGs of `size` pixels, ids from `IMG0000000`), `FracAtlas/dataset.csv`
/// (label and flags, with the release's header) and `FracAtlas/Annotations/COCO JSON/COCO_fracture_masks.json`
/// (one box per fractured image, at `[8, 8, size/2, size/4]`).
pub fn fracatlas_shaped_zip(fractured: usize, intact: usize, size: u32) -> Vec<u8> {
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut csv = String::from(
        "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique\n",
    );
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..fractured + intact {
        let is_fractured = i < fractured;
        let id = format!("IMG{i:07}");
        let img = crate::synthetic_xray(size, size, is_fractured, 5000 + i as u64);
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageLuma8(img)
            .write_to(&mut jpeg, image::ImageFormat::Jpeg)
            .unwrap();
        let folder = if is_fractured {
            "Fractured"
        } else {
            "Non_fractured"
        };
        entries.push((format!("FracAtlas/images/{folder}/{id}.jpg"), jpeg.into_inner()));
        let f = u8::from(is_fractured);
        csv.push_str(
            &format!(
                "{id}.jpg,{},{},0,0,0,0,0,{f},{f},1,{},0\n",
                i % 2,
                (i + 1) % 2,
                i % 3 == 0
            )
            .replace("true", "1")
            .replace("false", "0"),
        );
        if is_fractured {
            images.push(
                serde_json::json!({"id": i, "file_name": format!("{id}.jpg"), "width": size, "height": size}),
            );
            annotations.push(serde_json::json!({"id": i, "image_id": i, "category_id": 1,
                "bbox": [8.0, 8.0, f64::from(size) / 2.0, f64::from(size) / 4.0], "segmentation": [[]]}));
        }
    }
    entries.push(("FracAtlas/dataset.csv".into(), csv.into_bytes()));
    let coco = serde_json::json!({"images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "fractured"}]});
    entries.push((
        "FracAtlas/Annotations/COCO JSON/COCO_fracture_masks.json".into(),
        coco.to_string().into_bytes(),
    ));
    let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    zip_of(&refs)
}
