//! One size limit for the job API. The handler refuses a submission over
//! [`MAX_SUBMISSION_BYTES`](crate::api::MAX_SUBMISSION_BYTES) with `RESOURCE_EXHAUSTED`; a request too large to even decode is
//! refused earlier by tonic, as `OUT_OF_RANGE` ("decoded message length too large"). This
//! layer gives that refusal the same code and words, so a client sees one limit whichever
//! side noticed.
//!
//! tonic answers a request it cannot decode with a trailers-only response, whose status is
//! in the headers: that is where this layer looks.

use tonic::{Code, Status};

use crate::api::too_large;

/// The layer that keeps one size limit (a `tower::util::MapResponseLayer`).
pub fn one_size_limit_layer<B>()
-> tower::util::MapResponseLayer<fn(http::Response<B>) -> http::Response<B>> {
    tower::util::MapResponseLayer::new(one_size_limit::<B>)
}

/// `response`, with tonic's "message length too large" replaced by the API's size refusal.
fn one_size_limit<B>(mut response: http::Response<B>) -> http::Response<B> {
    if let Some(status) = size_refusal(response.headers()) {
        // Only fails for a message that cannot be a header; ours always can.
        let _ = status.add_header(response.headers_mut());
    }
    response
}

/// The API's size refusal, if `headers` carry tonic's decode-size refusal.
fn size_refusal(headers: &http::HeaderMap) -> Option<Status> {
    let status = Status::from_header_map(headers)?;
    let decoded_too_large = status.code() == Code::OutOfRange
        && status
            .message()
            .contains("decoded message length too large");
    decoded_too_large.then(|| {
        let found = status
            .message()
            .split("found ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or("more than that many");
        Status::resource_exhausted(too_large(found))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: Status) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        headers
    }

    #[test]
    fn the_transport_refusal_becomes_the_api_refusal() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 8388613 bytes, the limit is: 1114112 bytes",
        );
        let status = size_refusal(&headers(tonic_says)).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the request is 8388613 bytes; at most 1048576 bytes (the spec and its files) are accepted"
        );
        for other in [
            Status::out_of_range("page 3 does not exist"),
            Status::permission_denied("decoded message length too large"),
        ] {
            assert!(size_refusal(&headers(other)).is_none());
        }
        assert!(size_refusal(&http::HeaderMap::new()).is_none());
    }
}
