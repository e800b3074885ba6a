//! `fracture serve`: a web page and a JSON API to upload X-rays and see P(fractured) and where the
//! evidence lies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use fracture_train::data::DecodeLimits;
use fracture_train::model::CamMethod;
use fracture_train::{TrainedModel, VALIDATION_KEY};
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
    /// Run on the CPU even in a GPU build.
    #[arg(long)]
    cpu: bool,
}

struct AppState {
    model: TrainedModel,
    info: serde_json::Value,
    limits: DecodeLimits,
    max_upload: usize,
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
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        println!("stopped");
        anyhow::Ok(())
    })
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
        // Limits are enforced while reading the body (see read_body), not by a layer.
        .layer(DefaultBodyLimit::disable())
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

/// Reads a request body of at most `limit` bytes. A larger body is still read (and dropped) up to
/// four times the limit, so that the client, which is usually still sending, gets to read the 413
/// answer instead of a broken connection; past that the connection is closed.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
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
async fn read_upload(state: &AppState, request: Request) -> Result<(Bytes, String), ApiError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (parts, body) = request.into_parts();
    // Multipart framing adds a little to the image; the image itself is checked exactly below.
    let framing = if multipart { 64 * 1024 } else { 0 };
    let raw = read_body(body, state.max_upload + framing).await.map_err(|e| {
        if e.0 == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(state.max_upload)
        } else {
            e
        }
    })?;
    let (bytes, name) = if multipart {
        let request = Request::from_parts(parts, axum::body::Body::from(raw));
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("unreadable multipart form: {e}")))?;
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "the form has no file field".into(),
                ));
            }
            Err(e) => return Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        };
        let name = field.file_name().unwrap_or("upload").to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
        (bytes, name)
    } else {
        (raw, "upload".to_string())
    };
    if bytes.len() > state.max_upload {
        return Err(too_large(state.max_upload));
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
    let (bytes, name) = match read_upload(&state, request).await {
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
    let fractured = p >= model.threshold;
    Ok(Prediction {
        p_fractured: p,
        label: if fractured { "fractured" } else { "not fractured" },
        threshold: model.threshold,
        ms: start.elapsed().as_secs_f64() * 1000.0,
        heatmap_png_base64,
    })
}

/// What `/api/model` says: name, architecture, input, threshold and the training run's validation.
fn model_info(model: &TrainedModel) -> serde_json::Value {
    let meta = |key: &str| -> serde_json::Value {
        model
            .model
            .metadata
            .get(key)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let validation = meta(VALIDATION_KEY);
    let op = meta(fracture_train::OPERATING_POINT_KEY);
    let name = model
        .path
        .parent()
        .filter(|_| {
            model
                .path
                .file_name()
                .is_some_and(|f| f == fracture_train::MODEL_FILE)
        })
        .and_then(Path::file_name)
        .or_else(|| model.path.file_stem())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    serde_json::json!({
        "name": name,
        "path": model.path,
        "arch": model.model.config().arch_name(),
        "config": model.model.config(),
        "image_size": model.preprocess.size,
        "preprocess": model.preprocess,
        "threshold": model.threshold,
        "threshold_rule": meta(fracture_train::THRESHOLD_RULE_KEY),
        "validation": {
            "epoch": validation.get("epoch"),
            "roc_auc": validation.pointer("/val/roc_auc"),
            "pr_auc": validation.pointer("/val/pr_auc"),
            "n": validation.pointer("/val/n"),
            "positives": validation.pointer("/val/positives"),
            "sensitivity": op.get("sensitivity"),
            "specificity": op.get("specificity"),
            "ci95": op.get("ci95"),
        },
        "train": meta(fracture_train::TRAIN_KEY),
    })
}
