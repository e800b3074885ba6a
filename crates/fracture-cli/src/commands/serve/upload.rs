//! Reading an upload: the body within its size and time limits, then the image from a multipart
//! form's `file` field or from the raw body.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{StatusCode, header};

use super::ApiError;

pub(super) fn too_large(limit: usize) -> ApiError {
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
pub(super) async fn read_upload(
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use axum::http::HeaderName;
    use fracture_infer::data::DecodeLimits;

    use super::*;

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
        let img = fracture_infer::data::image::GrayImage::from_fn(12, 9, |x, y| {
            fracture_infer::data::image::Luma([(x * 20 + y) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, fracture_infer::data::image::ImageFormat::Png)
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
        let preprocess = fracture_infer::data::PreprocessConfig::with_size(32);
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
