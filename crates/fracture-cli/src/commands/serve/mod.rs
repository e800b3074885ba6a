//! `fracture serve`: a web page and a JSON API to upload X-rays and see P(fractured) and where the
//! evidence lies.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use fracture_infer::TrainedModel;
use fracture_infer::data::DecodeLimits;
use fracture_infer::model::CamMethod;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

mod http;
mod upload;

use http::{allowed_hosts, check_host, json_errors, security_headers, serve_connections};
use upload::read_upload;

const INDEX_HTML: &str = include_str!("../../../web/index.html");
const APP_JS: &str = include_str!("../../../web/app.js");
const STYLE_CSS: &str = include_str!("../../../web/style.css");

/// Arguments of `fracture serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    model: crate::commands::ModelArgs,
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
    /// Most uploads admitted at once (being received, waiting for inference, or inferring); a
    /// further one is answered 503 with `Retry-After` before its body is read, so memory stays
    /// bounded by about this many times `--max-upload-mb` whatever the number of connections.
    #[arg(long, default_value_t = 8)]
    max_queued_uploads: usize,
    /// A host name (optionally with `:port`) the server answers to (repeatable). On a loopback
    /// address only `localhost`, `127.0.0.1` and `[::1]` are accepted by default, so that a web page
    /// elsewhere cannot reach the server through a rebound DNS name; on other addresses any host is
    /// accepted unless this is given.
    #[arg(long = "allowed-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,
    #[command(flatten)]
    device: crate::commands::DeviceArgs,
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
    /// Uploads admitted at once, from the first byte of the body to the answer.
    uploads: Semaphore,
    /// Its size, for the 503 message.
    max_queued_uploads: usize,
}

#[derive(Debug, Serialize)]
struct Prediction {
    p_fractured: f64,
    predicted: &'static str,
    threshold: f64,
    ms: f64,
    /// The image's own size, `[width, height]` pixels (the frame of `evidence`).
    image_size: [u32; 2],
    /// Where the evidence lies: `{"peak": [x, y], "box": [x, y, w, h]}` in the image's pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence: Option<fracture_infer::evidence::Evidence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_png_base64: Option<String>,
    /// For a DICOM upload (which browsers cannot show): the windowed 8-bit image as a PNG, at
    /// most 1,024 px on its longer side. Never any patient attribute.
    #[serde(skip_serializing_if = "Option::is_none")]
    image_png_base64: Option<String>,
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
    let device = args.device.open()?;
    let model = args.model.load(&device)?;
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
    if args.max_queued_uploads == 0 {
        anyhow::bail!("--max-queued-uploads must be at least 1");
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
        uploads: Semaphore::new(args.max_queued_uploads),
        max_queued_uploads: args.max_queued_uploads,
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
        .layer(axum::middleware::from_fn(security_headers))
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

async fn predict(
    State(state): State<Arc<AppState>>,
    Query(query): Query<PredictQuery>,
    request: Request,
) -> Response {
    let want_heatmap = query
        .heatmap
        .as_deref()
        .is_some_and(|v| matches!(v, "1" | "true" | "yes"));
    // Admission before a byte of the body is read: the bytes in flight are bounded by the queue,
    // not by the number of connections.
    let Ok(_admitted) = state.uploads.try_acquire() else {
        let mut busy = ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy ({} uploads in progress); try again in a moment",
                state.max_queued_uploads
            ),
        )
        .into_response();
        busy.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
        return busy;
    };
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
    let bad_image = |e: fracture_infer::Error| match e {
        fracture_infer::Error::Data(d) => {
            ApiError(StatusCode::BAD_REQUEST, format!("not a readable image: {d}"))
        }
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    };
    let model = &state.model;
    // The map costs one more pass through the head: every answer says where the evidence lies.
    let x = model
        .predictor()
        .with_limits(state.limits)
        .explain(
            bytes,
            origin,
            CamMethod::default(),
            model.model.net.default_cam_layer(),
        )
        .map_err(bad_image)?;
    let heatmap_png_base64 = if heatmap {
        let png = x.heatmap_png().map_err(bad_image)?;
        Some(base64::engine::general_purpose::STANDARD.encode(png))
    } else {
        None
    };
    let image_png_base64 = if fracture_infer::data::is_dicom(bytes) {
        Some(base64::engine::general_purpose::STANDARD.encode(display_png(&x.image).map_err(bad_image)?))
    } else {
        None
    };
    let p = x.p_fractured;
    Ok(Prediction {
        p_fractured: p,
        predicted: model.decide(p).name(),
        threshold: model.threshold(),
        ms: start.elapsed().as_secs_f64() * 1000.0,
        image_size: [x.image.width(), x.image.height()],
        evidence: x.evidence(),
        heatmap_png_base64,
        image_png_base64,
    })
}

/// A gray image as PNG bytes, scaled down so its longer side is at most 1,024 px.
fn display_png(image: &fracture_infer::data::image::GrayImage) -> Result<Vec<u8>, fracture_infer::Error> {
    use fracture_infer::data::image::{ImageFormat, imageops};
    let (w, h) = image.dimensions();
    let scale = (1024.0 / f64::from(w.max(h))).min(1.0);
    let small = imageops::resize(
        image,
        ((f64::from(w) * scale).round() as u32).max(1),
        ((f64::from(h) * scale).round() as u32).max(1),
        imageops::FilterType::Triangle,
    );
    let mut out = std::io::Cursor::new(Vec::new());
    small
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| fracture_infer::Error::InvalidConfig(format!("cannot encode the image: {e}")))?;
    Ok(out.into_inner())
}

/// What `/api/model` says: name, architecture, input, threshold, the training run's validation, and
/// the precision it predicts in (with the BF16 backend when bf16).
fn model_info(model: &TrainedModel) -> serde_json::Value {
    let meta = &model.meta;
    let name = model
        .path
        .parent()
        .filter(|_| {
            model
                .path
                .file_name()
                .is_some_and(|f| f == fracture_infer::bundle::MODEL_FILE)
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
        "threshold_stability": meta.threshold_stability,
        "calibration": meta.calibration,
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
        "precision": model.precision(),
        "bf16_backend": (model.precision() == fracture_infer::model::Precision::Bf16)
            .then(fracture_infer::kernels::bf16_backend),
    })
}
