//! The HTTP layer under the routes: the accept loop with its timeouts and connection cap, the host
//! check against DNS rebinding, and JSON bodies for every error answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::{ApiError, AppState};

pub(super) async fn serve_connections(
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
pub(super) fn allowed_hosts(addr: SocketAddr, given: &[String]) -> Option<Vec<String>> {
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

/// Refuses a request that could come from another site or be misrouted, before its body is read:
/// two `Host` headers (400); an absolute-form target whose host differs from `Host` (400); a
/// `Host` the server does not answer to (421); and a state-changing request (any method but GET,
/// HEAD and OPTIONS) that a browser marks as cross-site, by `Sec-Fetch-Site` or by an `Origin`
/// other than the server's own (403). A page on another site can post a form or a no-cors fetch
/// to a local server without a preflight; this is what stops it.
pub(super) async fn check_host(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    match refusal(&state, &request) {
        Some(e) => e.into_response(),
        None => next.run(request).await,
    }
}

fn refusal(state: &AppState, request: &Request) -> Option<ApiError> {
    let headers = request.headers();
    let bad = |text: String| Some(ApiError(StatusCode::BAD_REQUEST, text));
    if headers.get_all(header::HOST).iter().count() > 1 {
        return bad("the request has more than one Host header".into());
    }
    let host = headers
        .get(header::HOST)
        .map(|h| host_name(h.to_str().unwrap_or_default()));
    if let Some(authority) = request.uri().authority() {
        let target = host_name(authority.as_str());
        if host.as_ref().is_some_and(|h| *h != target) {
            return bad(format!(
                "the request target names the host `{target}`, its Host header another"
            ));
        }
    }
    let name = host.or_else(|| request.uri().authority().map(|a| host_name(a.as_str())));
    if let (Some(allowed), Some(name)) = (&state.allowed_hosts, &name)
        && !allowed.contains(name)
    {
        return Some(ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server does not answer to the host `{name}` (allowed: {}; add one with --allowed-host)",
                allowed.join(", ")
            ),
        ));
    }
    let safe = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if safe {
        return None;
    }
    let forbidden = |why: String| {
        Some(ApiError(
            StatusCode::FORBIDDEN,
            format!("cross-origin requests are refused: {why}"),
        ))
    };
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return forbidden(format!("Sec-Fetch-Site is `{site}`"));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default().trim().to_ascii_lowercase();
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .map(|rest| rest.split('/').next().unwrap_or_default().to_string());
        let own = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.trim().to_ascii_lowercase());
        if origin_host.is_none() || origin_host != own {
            return forbidden(format!("Origin `{origin}` is not this server"));
        }
    }
    None
}

/// The Content-Security-Policy of every answer: the page's own script, style and API only;
/// images from the page, `data:` (heatmaps) and `blob:` (the chosen file); no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Adds the browser-hardening headers to every answer: Content-Security-Policy,
/// `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`.
pub(super) async fn security_headers(request: Request, next: axum::middleware::Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// Longest request target (path and query) answered; a longer one gets a JSON 414.
const MAX_URI_BYTES: usize = 8 * 1024;

/// Gives every error answer a JSON body: a longer request target than [`MAX_URI_BYTES`] is refused
/// with 414, and an error the routing layer answered in plain text (a query it cannot parse, for
/// one) is rewritten as `{"error": "…"}` with the same status.
pub(super) async fn json_errors(request: Request, next: axum::middleware::Next) -> Response {
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
