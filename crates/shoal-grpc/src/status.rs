//! gRPC status codes for Shoal's failures, from the HTTP status its REST
//! handlers choose for the same failure (the mapping gRPC's own HTTP
//! guidance and Triton use).

use tonic::Code;

/// The gRPC code for an HTTP status.
pub fn code_for_http(status: u16) -> Code {
    match status {
        200..=299 => Code::Ok,
        400 | 413 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 | 410 => Code::NotFound,
        409 => Code::FailedPrecondition,
        429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// The HTTP status a gRPC code stands for (the inverse of
/// [`code_for_http`] on the codes it produces), for metrics and retry
/// decisions shared with REST.
pub fn http_for_code(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 429,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_the_codes_clients_expect() {
        assert_eq!(code_for_http(400), Code::InvalidArgument);
        assert_eq!(code_for_http(404), Code::NotFound);
        assert_eq!(code_for_http(503), Code::Unavailable);
        assert_eq!(code_for_http(504), Code::DeadlineExceeded);
        assert_eq!(code_for_http(429), Code::ResourceExhausted);
        assert_eq!(code_for_http(500), Code::Internal);
        for status in [400, 401, 403, 404, 409, 429, 499, 501, 503, 504, 500] {
            assert_eq!(http_for_code(code_for_http(status)), status, "{status}");
        }
    }
}
