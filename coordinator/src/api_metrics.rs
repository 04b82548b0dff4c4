//! A tower layer around the job API server that counts every call by method and gRPC code
//! and times it ([`nightshift_core::metrics::api_call`]), for all services at once
//! (JobService, health, reflection) and before authentication, so rejected calls count too.
//!
//! The code is read from the response headers: tonic sends a failed unary call as a
//! trailers-only response, whose `grpc-status` is a header. A response without one in its
//! headers succeeded as far as the call's start is concerned (`OK`); a streaming call that
//! fails later (its status in the trailers) is counted as `OK` too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use nightshift_core::metrics;
use tower::{Layer, Service};

/// Counts and times every call of the service it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiMetricsLayer;

impl<S> Layer<S> for ApiMetricsLayer {
    type Service = ApiMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ApiMetrics<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for ApiMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            let code = match &response {
                Ok(response) => grpc_code_name(
                    response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                ),
                Err(_) => "Unavailable",
            };
            metrics::api_call(&method, code, started.elapsed());
            response
        })
    }
}

/// The name of a gRPC status code, as in the gRPC specification.
fn grpc_code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(16), "Unauthenticated");
        assert_eq!(
            grpc_code_name(tonic::Code::PermissionDenied as i32),
            "PermissionDenied"
        );
        assert_eq!(grpc_code_name(99), "Unknown");
    }
}
