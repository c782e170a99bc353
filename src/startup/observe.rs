//! The tower layer around both gRPC servers (`Server::builder().layer(RpcLayer::new(..))`).
//! For every call it
//! - opens the `rpc` span: `method`, `peer` (the connection's address), `request_id` and
//!   `user_id` (empty; the flows record it once they know who is calling, see
//!   [`crate::telemetry::record_user_id`]);
//! - takes the caller's `x-request-id` (1–128 visible ASCII characters) or makes one (a
//!   UUIDv4), and echoes it as the response's `x-request-id` header;
//! - enforces `server.request_timeout`: a call without an answer by then is dropped and
//!   answered `CANCELLED` "Timeout expired", as tonic's own `Server::timeout` would. It is
//!   done here rather than by tonic because tonic's timeout wraps the layers from outside:
//!   its answer would carry no `x-request-id` and bypass the metrics. (A client's own
//!   `grpc-timeout` is still applied by tonic, outside: that answer has no request id, but
//!   it is sent when the client itself has stopped waiting.)
//! - records `portcullis_grpc_requests_total` and `portcullis_grpc_request_duration_seconds`
//!   by method and status code once the status is known: from the `grpc-status` header of a
//!   trailers-only answer (how tonic answers errors), else from the trailers at the end of the
//!   body (successful answers, streams). A call dropped before its status (the client went
//!   away or its deadline passed) counts as `CANCELLED`, as a timed-out one does;
//! - with the `otlp` feature, continues the caller's W3C `traceparent` only when the peer is
//!   one of `server.trusted_proxies`.
//!
//! Methods are named `package.Service/Method`, from the descriptor sets of the services we
//! serve; a path outside them (tonic answers UNIMPLEMENTED) is `unknown`, so no request can
//! add a series. Per call: a map lookup, two clock reads, a timer, a counter and a histogram
//! (atomics, no lock); the series of a (method, code) pair are resolved once per process,
//! and those of the hot methods' `OK` when the layer is built.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        LazyLock, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header::HeaderName};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prost::Message;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;
use tracing::{Span, field};

use crate::metrics::RpcSeries;

/// The request id header, read from the call and written on the answer.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longer request ids are replaced by one of ours.
const MAX_REQUEST_ID_LEN: usize = 128;

/// gRPC status codes by number, as they are named in `grpc-status` documentation and the
/// `code` label.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const OK: usize = 0;
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;
const PERMISSION_DENIED: usize = 7;
const UNIMPLEMENTED: usize = 12;
const INTERNAL: usize = 13;
const UNAVAILABLE: usize = 14;
const UNAUTHENTICATED: usize = 16;

/// One gRPC method and its series, one per status code, created on first use.
struct Method {
    name: &'static str,
    series: [OnceLock<RpcSeries>; CODES.len()],
}

impl Method {
    fn new(name: &'static str) -> Method {
        Method { name, series: std::array::from_fn(|_| OnceLock::new()) }
    }

    fn series(&self, code: usize) -> &RpcSeries {
        self.series[code].get_or_init(|| RpcSeries::new(self.name, CODES[code]))
    }
}

struct Methods {
    /// By path (`/package.Service/Method`).
    by_path: HashMap<&'static str, Method>,
    unknown: Method,
}

impl Methods {
    fn get(&self, path: &str) -> &Method {
        self.by_path.get(path).unwrap_or(&self.unknown)
    }
}

/// Every method either server can answer: the descriptor sets also used for reflection,
/// and ext_authz `Check` (envoy-types ships no descriptor set).
static METHODS: LazyLock<Methods> = LazyLock::new(|| {
    let mut paths = Vec::new();
    for set in [
        crate::api::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
    }
    paths.push(format!("/{}/Check", crate::api::ext_authz::SERVICE_NAME));
    let by_path: HashMap<&'static str, Method> = paths
        .into_iter()
        .map(|path| {
            // Once per process, a few dozen short strings: they live as long as the series.
            let path: &'static str = Box::leak(path.into_boxed_str());
            (path, Method::new(&path[1..]))
        })
        .collect();
    // The calls every replica answers most: their `OK` series exist (at 0) from the start,
    // and their first calls take no write lock on the metric families.
    for path in HOT_PATHS {
        if let Some(method) = by_path.get(path) {
            method.series(OK);
        }
    }
    Methods { by_path, unknown: Method::new("unknown") }
});

/// ValidateToken, ext_authz Check and health checks: resolved when the layer is built.
const HOT_PATHS: [&str; 3] = [
    "/portcullis.v1.AuthService/ValidateToken",
    "/envoy.service.auth.v3.Authorization/Check",
    "/grpc.health.v1.Health/Check",
];

/// Adds the span, the request id, the request timeout and the metrics to every call; see
/// the module docs.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    timeout: Duration,
    /// Peers whose `traceparent` is followed (`server.trusted_proxies`).
    #[cfg(feature = "otlp")]
    trusted_proxies: std::sync::Arc<[ipnet::IpNet]>,
}

impl RpcLayer {
    /// `timeout` is `server.request_timeout`; `trusted_proxies` (`server.trusted_proxies`)
    /// matter only with the `otlp` feature.
    pub fn new(timeout: Duration, trusted_proxies: &[ipnet::IpNet]) -> RpcLayer {
        LazyLock::force(&METHODS);
        #[cfg(not(feature = "otlp"))]
        let _ = trusted_proxies;
        RpcLayer {
            timeout,
            #[cfg(feature = "otlp")]
            trusted_proxies: trusted_proxies.into(),
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService { inner, layer: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    layer: RpcLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> RpcFuture<S::Future> {
        let started = Instant::now();
        let method = METHODS.get(request.uri().path());
        let request_id = request_id(request.headers());
        let peer = peer_addr(request.extensions_mut());
        let span = tracing::info_span!(
            "rpc",
            method = method.name,
            peer = peer.map(field::display),
            request_id = request_id.to_str().unwrap_or_default(),
            user_id = field::Empty,
        );
        #[cfg(feature = "otlp")]
        if is_trusted(peer, &self.layer.trusted_proxies) {
            crate::telemetry::follow_remote_trace(&span, request.headers());
        }
        let inner = span.in_scope(|| self.inner.call(request));
        RpcFuture {
            inner,
            deadline: tokio::time::sleep(self.layer.timeout),
            call: Some(Call { method, started, span, finished: false }),
            request_id: Some(request_id),
        }
    }
}

/// Whether the peer is one of `trusted` (`server.trusted_proxies`): only those may continue
/// their trace into ours. Anyone else's `traceparent` would choose our trace ids and, under
/// a parent-based sampler, whether we record and export at all.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
fn is_trusted(peer: Option<SocketAddr>, trusted: &[ipnet::IpNet]) -> bool {
    peer.is_some_and(|peer| trusted.iter().any(|net| net.contains(&peer.ip())))
}

/// A call whose status is not known yet. Dropped unfinished, it counts as `CANCELLED`.
struct Call {
    method: &'static Method,
    started: Instant,
    span: Span,
    finished: bool,
}

impl Call {
    fn finish(&mut self, code: usize) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        self.method.series(code).record(elapsed);
        tracing::debug!(
            parent: &self.span,
            code = CODES[code],
            elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "rpc finished"
        );
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

pin_project! {
    /// The answer of [`RpcService`]: the inner call polled inside its span, until
    /// `server.request_timeout`.
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        deadline: Sleep,
        call: Option<Call>,
        request_id: Option<HeaderValue>,
    }
}

impl<F, B, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<RpcBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            this.inner.poll(cx)
        };
        let result = match polled {
            Poll::Ready(result) => result,
            Poll::Pending => {
                ready!(this.deadline.poll(cx));
                // The inner call is dropped with this future; the answer is ours.
                let mut call = this.call.take();
                if let Some(call) = call.as_mut() {
                    tracing::warn!(parent: &call.span, "call timed out (server.request_timeout)");
                    call.finish(CANCELLED);
                }
                let (mut parts, ()) =
                    tonic::Status::cancelled("Timeout expired").into_http::<()>().into_parts();
                if let Some(request_id) = this.request_id.take() {
                    parts.headers.insert(REQUEST_ID, request_id);
                }
                return Poll::Ready(Ok(Response::from_parts(parts, RpcBody { inner: None, call: None })));
            }
        };
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                if let Some(request_id) = this.request_id.take() {
                    parts.headers.insert(REQUEST_ID, request_id);
                }
                if let Some(call) = call.as_mut() {
                    if let Some(status) = parts.headers.get("grpc-status") {
                        // Trailers-only: the status is already here.
                        call.finish(grpc_code(status));
                    } else if parts.status != StatusCode::OK {
                        call.finish(http_code(parts.status));
                    } else if body.is_end_stream() {
                        // No trailers will come.
                        call.finish(UNKNOWN);
                    }
                }
                let call = call.filter(|call| !call.finished);
                Ok(Response::from_parts(parts, RpcBody { inner: Some(body), call }))
            }
            Err(error) => {
                if let Some(mut call) = call {
                    call.finish(UNKNOWN);
                }
                Err(error)
            }
        })
    }
}

pin_project! {
    /// The answer's body: watches for the trailers that carry the status. `None` for our own
    /// timeout answer (trailers-only: no body).
    pub struct RpcBody<B> {
        #[pin]
        inner: Option<B>,
        call: Option<Call>,
    }
}

impl<B: Body> Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else { return Poll::Ready(None) };
        let frame = ready!(inner.poll_frame(cx));
        if let Some(call) = this.call.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        call.finish(trailers.get("grpc-status").map_or(UNKNOWN, grpc_code));
                    }
                }
                // The stream is reset: the caller sees no status of ours.
                Some(Err(_)) => call.finish(UNKNOWN),
                // Ended without trailers.
                None => call.finish(UNKNOWN),
            }
            if call.finished {
                // Closes the span now rather than when the connection drops the body.
                *this.call = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The number in a `grpc-status` value; anything else is `UNKNOWN`.
fn grpc_code(value: &HeaderValue) -> usize {
    std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&code| code < CODES.len())
        .unwrap_or(UNKNOWN)
}

/// The gRPC code of an HTTP answer without `grpc-status` (gRPC's
/// `http-grpc-status-mapping.md`).
fn http_code(status: StatusCode) -> usize {
    match status.as_u16() {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502..=504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// The caller's request id when it is one we can log and echo safely, else a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(sent) = headers.get(&REQUEST_ID) {
        let bytes = sent.as_bytes();
        if !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID_LEN && bytes.iter().all(u8::is_ascii_graphic) {
            return sent.clone();
        }
    }
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = new_request_id().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// A UUIDv4 without a system call per request: a random 128-bit key drawn once per process,
/// mixed with a counter through a bijection (SplitMix64's finalizer), so ids never repeat
/// within a process and collide across processes only as random UUIDs do. Request ids
/// correlate logs; they are not secrets.
fn new_request_id() -> uuid::Uuid {
    static KEY: LazyLock<(u64, u64)> = LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let (a, b) = *KEY;
    let (high, low) = (mix(n ^ a), mix(n.rotate_left(32) ^ b));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&low.to_le_bytes());
    bytes[8..].copy_from_slice(&high.to_le_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The connection's peer address, from what tonic put in the request (plain TCP or TLS),
/// asked through tonic so both kinds are found; nothing is copied.
fn peer_addr(extensions: &mut http::Extensions) -> Option<SocketAddr> {
    let probe =
        tonic::Request::from_parts(tonic::metadata::MetadataMap::new(), std::mem::take(extensions), ());
    let addr = probe.remote_addr();
    *extensions = probe.into_parts().1;
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_is_known() {
        for path in [
            "/portcullis.v1.AuthService/ValidateToken",
            "/portcullis.v1.AuthService/Login",
            "/portcullis.v1.SessionService/ListSessions",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "/envoy.service.auth.v3.Authorization/Check",
        ] {
            assert_eq!(METHODS.get(path).name, &path[1..]);
        }
        assert_eq!(METHODS.get("/nope.Service/Call").name, "unknown");
        assert_eq!(METHODS.get("").name, "unknown");
    }

    #[test]
    fn status_codes_are_read_from_the_header_or_mapped_from_http() {
        assert_eq!(CODES[grpc_code(&HeaderValue::from_static("0"))], "OK");
        assert_eq!(CODES[grpc_code(&HeaderValue::from_static("14"))], "UNAVAILABLE");
        assert_eq!(CODES[grpc_code(&HeaderValue::from_static("17"))], "UNKNOWN");
        assert_eq!(CODES[grpc_code(&HeaderValue::from_static("x"))], "UNKNOWN");
        assert_eq!(CODES[http_code(StatusCode::SERVICE_UNAVAILABLE)], "UNAVAILABLE");
        assert_eq!(CODES[http_code(StatusCode::NOT_FOUND)], "UNIMPLEMENTED");
    }

    #[test]
    fn traces_are_continued_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let peer = |addr: &str| Some(addr.parse::<SocketAddr>().unwrap());
        assert!(is_trusted(peer("10.1.2.3:5000"), &trusted));
        assert!(is_trusted(peer("[::1]:5000"), &trusted));
        assert!(!is_trusted(peer("192.0.2.1:5000"), &trusted));
        assert!(!is_trusted(None, &trusted), "no known peer: not trusted");
        assert!(!is_trusted(peer("10.1.2.3:5000"), &[]), "nobody by default");
    }

    #[test]
    fn hot_methods_are_resolved_up_front() {
        for path in HOT_PATHS {
            let method = METHODS.get(path);
            assert_eq!(method.name, &path[1..], "{path} is a served method");
            assert!(method.series[OK].get().is_some(), "{path}: OK resolved");
        }
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        for bad in [String::new(), "a b".into(), "x".repeat(MAX_REQUEST_ID_LEN + 1)] {
            headers.insert(REQUEST_ID, HeaderValue::from_str(&bad).unwrap());
            let made = request_id(&headers);
            let parsed = uuid::Uuid::parse_str(made.to_str().unwrap()).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 4);
        }
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
