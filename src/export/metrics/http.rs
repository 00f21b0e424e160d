//! The HTTP side of the endpoint: hyper's HTTP/1 server on each accepted
//! connection, one request per connection, answering `GET /metrics` (and
//! `HEAD`, its body left out) with the exposition.
//!
//! hyper parses the request and bounds it: the head must arrive within
//! [`REQUEST_TIMEOUT`] and fit in [`MAX_REQUEST_HEAD`] bytes with at most
//! [`MAX_REQUEST_HEADERS`] headers, otherwise it answers 400 or 431, or
//! closes the connection. At most [`MAX_CONNECTIONS`] connections are
//! served at once, each for at most [`CONNECTION_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE as CONTENT_TYPE_HEADER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{
    MetricsSource, CONTENT_TYPE, MAX_CONNECTIONS, MAX_REQUEST_HEAD, MAX_REQUEST_HEADERS,
    METRICS_PATH, REQUEST_TIMEOUT, RESPONSE_TIMEOUT,
};

/// Longest a connection is served: reading the request, then writing the
/// response.
pub const CONNECTION_TIMEOUT: Duration = REQUEST_TIMEOUT.saturating_add(RESPONSE_TIMEOUT);
/// Time open connections get to finish once the endpoint stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Content type of the short plain-text error bodies.
const PLAIN: &str = "text/plain; charset=utf-8";

/// The HTTP/1 settings of every connection.
fn connection_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_header_size(MAX_REQUEST_HEAD)
        .max_headers(MAX_REQUEST_HEADERS)
        .keep_alive(false)
        .title_case_headers(true);
    b
}

/// A response with a fixed content type and `Connection: close`.
fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Answers one request.
async fn respond(
    req: Request<Incoming>,
    source: MetricsSource,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != METRICS_PATH {
        return Ok(reply(StatusCode::NOT_FOUND, PLAIN, "see /metrics\n"));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    Ok(match source.render().await {
        Some(body) => reply(StatusCode::OK, CONTENT_TYPE, body),
        None => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            "flow fan-out is not running\n",
        ),
    })
}

/// Serves `/metrics` on `listener` until `shutdown` completes, then gives
/// open connections [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    source: MetricsSource,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let builder = connection_builder();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            c = listener.accept() => c,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let source = source.clone();
        let service = service_fn(move |req| respond(req, source.clone()));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics: connection: {e}"),
                Err(_) => tracing::debug!("metrics: connection exceeded {CONNECTION_TIMEOUT:?}"),
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("metrics: connections still open after {SHUTDOWN_GRACE:?}");
    }
}
