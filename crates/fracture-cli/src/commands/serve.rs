//! `fracture serve`: a web page and a JSON API to upload X-rays and see P(fractured) and where the
//! evidence lies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use fracture_train::TrainedModel;
use fracture_train::data::DecodeLimits;
use fracture_train::model::CamMethod;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::commands::pick_device;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// Arguments of `fracture serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A trained model: a run folder (its model.safetensors) or a weight file.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Largest accepted upload, in megabytes.
    #[arg(long, default_value_t = 20.0)]
    max_upload_mb: f64,
    /// Seconds a connection may take to send a request's headers, and may stay idle between
    /// requests; then it is closed.
    #[arg(long, default_value_t = 10.0)]
    header_timeout_secs: f64,
    /// Seconds a request may take to send its body (the upload); then it is answered 408.
    #[arg(long, default_value_t = 60.0)]
    body_timeout_secs: f64,
    /// Most connections open at once; further ones are closed at once until some end. Keep it
    /// below the process's open-file limit (`ulimit -n`).
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// A host name (optionally with `:port`) the server answers to (repeatable). On a loopback
    /// address only `localhost`, `127.0.0.1` and `[::1]` are accepted by default, so that a web page
    /// elsewhere cannot reach the server through a rebound DNS name; on other addresses any host is
    /// accepted unless this is given.
    #[arg(long = "allowed-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,
    /// Run on the CPU even in a GPU build.
    #[arg(long)]
    cpu: bool,
}

struct AppState {
    model: TrainedModel,
    info: serde_json::Value,
    limits: DecodeLimits,
    max_upload: usize,
    /// Longest a request body may take to arrive.
    body_timeout: Duration,
    /// Host names (lower case, without port) requests may name; `None` accepts any.
    allowed_hosts: Option<Vec<String>>,
    /// Inference runs on blocking threads, at most this many at once (the rest queue), so the async
    /// threads stay free to answer.
    inference: Semaphore,
}

#[derive(Debug, Serialize)]
struct Prediction {
    p_fractured: f64,
    label: &'static str,
    threshold: f64,
    ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_png_base64: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PredictQuery {
    #[serde(default)]
    heatmap: Option<String>,
}

/// A JSON error with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let device = pick_device(args.cpu)?;
    let model = TrainedModel::load(&args.model, &device).context("cannot load the model")?;
    let max_upload = (args.max_upload_mb * 1024.0 * 1024.0) as usize;
    let seconds = |name: &str, v: f64| -> anyhow::Result<Duration> {
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            anyhow::bail!("--{name} {v} must be a number of seconds in (0, 86400]");
        }
        Ok(Duration::from_secs_f64(v))
    };
    let header_timeout = seconds("header-timeout-secs", args.header_timeout_secs)?;
    let body_timeout = seconds("body-timeout-secs", args.body_timeout_secs)?;
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections must be at least 1");
    }
    let info = model_info(&model);
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let limits = DecodeLimits {
        max_file_bytes: max_upload as u64,
        ..DecodeLimits::default()
    };
    let state = Arc::new(AppState {
        model,
        info,
        limits,
        max_upload,
        body_timeout,
        allowed_hosts: allowed_hosts(args.addr, &args.allowed_hosts),
        inference: Semaphore::new(workers.min(4)),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        let addr = listener.local_addr()?;
        println!(
            "serving {} at http://{addr}/ (Ctrl-C to stop)",
            state.model.path.display()
        );
        serve_connections(
            listener,
            router(state),
            header_timeout,
            args.max_connections,
            shutdown_signal(),
        )
        .await;
        println!("stopped");
        anyhow::Ok(())
    })
}

/// Accepts connections until `shutdown` resolves, each served by hyper with a header-read timeout
/// (which also bounds how long a keep-alive connection may sit idle), at most `max_connections` at
/// once; then waits up to ten seconds for requests in flight.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors or a connection reset before it was taken: keep serving
                // the connections we have and try again shortly.
                Err(e) => {
                    eprintln!("warning: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the cap: closed at once rather than queued behind connections that may be idle.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true);
        let connection = builder.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(app.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = connection.await;
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {}
    }
}

/// The host names a server on `addr` answers to: the given ones, plus the loopback names when it
/// listens on loopback; `None` (any) on another address without `--allowed-host`.
fn allowed_hosts(addr: SocketAddr, given: &[String]) -> Option<Vec<String>> {
    let mut hosts: Vec<String> = given.iter().map(|h| host_name(h)).collect();
    if addr.ip().is_loopback() {
        hosts.extend(["localhost", "127.0.0.1", "[::1]"].map(String::from));
    } else if hosts.is_empty() {
        return None;
    }
    Some(hosts)
}

/// The host name of a `Host` value: lower case, without the port (`[…]` kept for IPv6).
fn host_name(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    match host.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((v6, _)) => format!("[{v6}]"),
        None => host.split(':').next().unwrap_or_default().to_string(),
    }
}

/// Refuses (421) a request whose `Host` names a host the server does not answer to.
async fn check_host(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if let (Some(allowed), Some(host)) = (&state.allowed_hosts, request.headers().get(header::HOST)) {
        let name = host_name(host.to_str().unwrap_or_default());
        if !allowed.contains(&name) {
            return ApiError(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this server does not answer to the host `{name}` (allowed: {}; add one with --allowed-host)",
                    allowed.join(", ")
                ),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Longest request target (path and query) answered; a longer one gets a JSON 414.
const MAX_URI_BYTES: usize = 8 * 1024;

/// Gives every error answer a JSON body: a longer request target than [`MAX_URI_BYTES`] is refused
/// with 414, and an error the routing layer answered in plain text (a query it cannot parse, for
/// one) is rewritten as `{"error": "…"}` with the same status.
async fn json_errors(request: Request, next: axum::middleware::Next) -> Response {
    let target = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        return ApiError(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target} bytes, over the limit of {MAX_URI_BYTES}"),
        )
        .into_response();
    }
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // Plain-text rejections are short; anything longer is cut, not buffered.
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError(status, text).into_response()
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }),
        )
        .route(
            "/api/health",
            get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route(
            "/api/model",
            get(|state: State<Arc<AppState>>| async move { axum::Json(state.info.clone()) }),
        )
        .route("/api/predict", post(predict))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such page or API route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method".into(),
            )
        })
        // Limits are enforced while reading the body (see read_body), not by a layer.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(state.clone(), check_host))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the upload is larger than the limit of {:.1} MB",
            limit as f64 / (1024.0 * 1024.0)
        ),
    )
}

/// Reads a request body of at most `limit` bytes within `timeout` (else 408). A larger body is
/// still read (and dropped) up to four times the limit, so that the client, which is usually still
/// sending, gets to read the 413 answer instead of a broken connection; past that the connection is
/// closed.
async fn read_body(body: axum::body::Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    tokio::time::timeout(timeout, read_body_inner(body, limit))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!("the upload did not arrive within {:.0} s", timeout.as_secs_f64()),
            ))
        })
}

async fn read_body_inner(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut data = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("the upload was cut off: {e}")))?;
        if let Ok(chunk) = frame.into_data() {
            total += chunk.len();
            if total <= limit {
                data.extend_from_slice(&chunk);
            } else if total > limit.saturating_mul(4) {
                break;
            }
        }
    }
    if total > limit {
        return Err(too_large(limit));
    }
    Ok(Bytes::from(data))
}

/// The image bytes and a name for them, from a multipart form (first file field) or a raw body.
///
/// `max_upload` bounds the image in bytes; `body_timeout` the time the body may take to arrive.
async fn read_upload(
    max_upload: usize,
    body_timeout: Duration,
    request: Request,
) -> Result<(Bytes, String), ApiError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (parts, body) = request.into_parts();
    // Multipart framing adds a little to the image; the image itself is checked exactly below.
    let framing = if multipart { 64 * 1024 } else { 0 };
    // A declared length over the limit is answered before any of the body is read when the client
    // waits for our go-ahead (`Expect: 100-continue`) or when reading it would cost more than four
    // times the limit; otherwise the body is read and dropped (within the body timeout) so that a
    // client still sending gets to read the 413 instead of a reset connection.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let waits = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let limit = (max_upload + framing) as u64;
    if declared.is_some_and(|n| n > limit && (waits || n > limit.saturating_mul(4))) {
        return Err(too_large(max_upload));
    }

    let raw = read_body(body, max_upload + framing, body_timeout)
        .await
        .map_err(|e| {
            if e.0 == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(max_upload)
            } else {
                e
            }
        })?;
    let (bytes, name) = if multipart {
        let request = Request::from_parts(parts, axum::body::Body::from(raw));
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("unreadable multipart form: {e}")))?;
        // The image is the field named `file`; other fields are ignored, a second `file` refused.
        let mut upload: Option<(Bytes, String)> = None;
        loop {
            let field = match form.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) => return Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
            };
            if field.name() != Some("file") {
                continue;
            }
            if upload.is_some() {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "the form has more than one `file` field: send one image per request".into(),
                ));
            }
            let name = field.file_name().unwrap_or("upload").to_string();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
            upload = Some((bytes, name));
        }
        upload.ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "the form has no field named `file`: send the image as `file`".into(),
            )
        })?
    } else {
        (raw, "upload".to_string())
    };
    if bytes.len() > max_upload {
        return Err(too_large(max_upload));
    }
    if bytes.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the upload is empty: send an image file".into(),
        ));
    }
    Ok((bytes, name))
}

async fn predict(
    State(state): State<Arc<AppState>>,
    Query(query): Query<PredictQuery>,
    request: Request,
) -> Response {
    let want_heatmap = query
        .heatmap
        .as_deref()
        .is_some_and(|v| matches!(v, "1" | "true" | "yes"));
    let (bytes, name) = match read_upload(state.max_upload, state.body_timeout, request).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let Ok(_permit) = state.inference.acquire().await else {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()).into_response();
    };
    let worker = state.clone();
    let result =
        tokio::task::spawn_blocking(move || infer(&worker, &bytes, Path::new(&name), want_heatmap)).await;
    match result {
        Ok(Ok(p)) => axum::Json(p).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("inference failed: {e}"),
        )
        .into_response(),
    }
}

fn infer(state: &AppState, bytes: &[u8], origin: &Path, heatmap: bool) -> Result<Prediction, ApiError> {
    let start = Instant::now();
    let bad_image = |e: fracture_train::Error| match e {
        fracture_train::Error::Data(d) => {
            ApiError(StatusCode::BAD_REQUEST, format!("not a readable image: {d}"))
        }
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    };
    let model = &state.model;
    let (p, heatmap_png_base64) = if heatmap {
        let x = model
            .explain_bytes(bytes, origin, &state.limits, CamMethod::default())
            .map_err(bad_image)?;
        let png = x.heatmap_png().map_err(bad_image)?;
        (
            x.p_fractured,
            Some(base64::engine::general_purpose::STANDARD.encode(png)),
        )
    } else {
        (
            model
                .predict_bytes(bytes, origin, &state.limits)
                .map_err(bad_image)?,
            None,
        )
    };
    Ok(Prediction {
        p_fractured: p,
        label: model.decide(p).name(),
        threshold: model.threshold(),
        ms: start.elapsed().as_secs_f64() * 1000.0,
        heatmap_png_base64,
    })
}

/// What `/api/model` says: name, architecture, input, threshold and the training run's validation.
fn model_info(model: &TrainedModel) -> serde_json::Value {
    let meta = &model.meta;
    let name = model
        .path
        .parent()
        .filter(|_| {
            model
                .path
                .file_name()
                .is_some_and(|f| f == fracture_train::bundle::MODEL_FILE)
        })
        .and_then(Path::file_name)
        .or_else(|| model.path.file_stem())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let val = meta.validation.as_ref().map(|v| &v.val);
    let op = meta.operating_point.as_ref();
    serde_json::json!({
        "name": name,
        "arch": model.model.config().arch_name(),
        "config": model.model.config(),
        "image_size": meta.preprocess.size,
        "preprocess": meta.preprocess,
        "threshold": meta.threshold,
        "threshold_rule": meta.threshold_rule,
        "validation": {
            "epoch": meta.validation.as_ref().map(|v| v.epoch),
            "roc_auc": val.and_then(|v| v.roc_auc),
            "pr_auc": val.and_then(|v| v.pr_auc),
            "n": val.map(|v| v.n),
            "positives": val.map(|v| v.positives),
            "sensitivity": op.and_then(|o| o.sensitivity),
            "specificity": op.and_then(|o| o.specificity),
            "ci95": op.map(|o| &o.ci95),
        },
        "train": meta.train,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderName;

    const MAX_UPLOAD: usize = 64 * 1024;

    /// A request from fuzz bytes: `Name: value` lines up to an empty line are headers (unusable
    /// ones skipped), the rest is the body.
    fn request(input: &[u8]) -> Request {
        let split = input.windows(2).position(|w| w == b"\n\n");
        let (head, body) = match split {
            Some(at) => (&input[..at], &input[at + 2..]),
            None => (&input[..0], input),
        };
        let mut builder = axum::http::Request::builder().method("POST").uri("/api/predict");
        for line in head.split(|&b| b == b'\n') {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                axum::http::HeaderValue::from_bytes(value),
            ) {
                builder = builder.header(name, value);
            }
        }
        builder
            .body(axum::body::Body::from(body.to_vec()))
            .unwrap_or_else(|_| Request::new(axum::body::Body::empty()))
    }

    fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = b"content-type: multipart/form-data; boundary=XyZ\n\n".to_vec();
        for (name, file, data) in parts {
            out.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"");
            out.extend_from_slice(name.as_bytes());
            out.push(b'"');
            if let Some(file) = file {
                out.extend_from_slice(b"; filename=\"");
                out.extend_from_slice(file.as_bytes());
                out.push(b'"');
            }
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    fn png() -> Vec<u8> {
        let img = fracture_train::data::image::GrayImage::from_fn(12, 9, |x, y| {
            fracture_train::data::image::Luma([(x * 20 + y) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, fracture_train::data::image::ImageFormat::Png)
            .unwrap_or_default();
        out.into_inner()
    }

    fn upload(input: &[u8]) -> Result<(Bytes, String), ApiError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        runtime.block_on(read_upload(MAX_UPLOAD, Duration::from_secs(5), request(input)))
    }

    #[test]
    fn the_upload_reader_takes_the_file_field_and_refuses_the_rest() {
        let image = png();
        let (bytes, name) = upload(&multipart(&[
            ("note", None, b"hello"),
            ("file", Some("x.png"), &image),
        ]))
        .unwrap_or_else(|e| panic!("{}", e.1));
        assert_eq!((&bytes[..], name.as_str()), (&image[..], "x.png"));
        let two = multipart(&[("file", Some("a.png"), &image), ("file", Some("b.png"), &image)]);
        assert!(upload(&two).is_err_and(|e| e.0 == StatusCode::BAD_REQUEST && e.1.contains("more than one")));
        let none = multipart(&[("other", Some("a.png"), &image)]);
        assert!(
            upload(&none).is_err_and(|e| e.0 == StatusCode::BAD_REQUEST && e.1.contains("no field named"))
        );
        let mut raw = b"content-type: image/png\n\n".to_vec();
        raw.extend_from_slice(&image);
        assert_eq!(
            &upload(&raw).unwrap_or_else(|e| panic!("{}", e.1)).0[..],
            &image[..]
        );
        let mut big = b"content-type: image/png\n\n".to_vec();
        big.resize(big.len() + MAX_UPLOAD + 1, 7);
        assert!(upload(&big).is_err_and(|e| e.0 == StatusCode::PAYLOAD_TOO_LARGE));
        assert!(upload(b"content-type: image/png\n\n").is_err_and(|e| e.0 == StatusCode::BAD_REQUEST));
    }

    /// The upload path under the fuzzer: mutated multipart forms and raw bodies (headers included)
    /// through the body reader, the form parser and then the image decoder. Every case ends in an
    /// image of at most the upload limit or a 400/408/413 answer with a message, never a panic.
    #[test]
    fn fuzz_upload_path() {
        let image = png();
        let mut raw = b"content-type: application/octet-stream\ncontent-length: 200\n\n".to_vec();
        raw.extend_from_slice(&image);
        let seeds = vec![
            multipart(&[("note", None, b"hello"), ("file", Some("x.png"), &image)]),
            multipart(&[("file", Some("a.png"), &image), ("file", Some("b.png"), &image)]),
            multipart(&[("file", None, &image)]),
            raw,
            b"content-type: multipart/form-data; boundary=\"a b\"\nexpect: 100-continue\n\n--a b\r\n"
                .to_vec(),
        ];
        let limits = DecodeLimits::default();
        let preprocess = fracture_train::data::PreprocessConfig::with_size(32);
        let (mut accepted, mut decoded) = (0u64, 0u64);
        let cases =
            fracture_testkit::fuzz_bytes("upload", 0x5EED_F00D, &seeds, |input| match upload(input) {
                Ok((bytes, _)) => {
                    assert!(!bytes.is_empty() && bytes.len() <= MAX_UPLOAD);
                    accepted += 1;
                    decoded += u64::from(
                        preprocess
                            .load_bytes(&bytes, Path::new("upload"), &limits)
                            .is_ok(),
                    );
                }
                Err(ApiError(status, message)) => {
                    assert!(
                        [
                            StatusCode::BAD_REQUEST,
                            StatusCode::REQUEST_TIMEOUT,
                            StatusCode::PAYLOAD_TOO_LARGE
                        ]
                        .contains(&status),
                        "{status}: {message}"
                    );
                    assert!(!message.is_empty());
                }
            });
        println!("fuzz upload: {accepted} of {cases} uploads accepted, {decoded} of them decoded");
        assert!(accepted > 0, "the seeds reach the decoder");
    }
}
