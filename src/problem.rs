//! Responses the gateway writes itself: RFC 9457 problem details (SPEC §4).

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::{Map, Value};
use std::time::Duration;

/// The error codes of SPEC §4, each with its status and title; the last three are the
/// admin API's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    NoRoute,
    Unauthorized,
    RateLimited,
    PayloadTooLarge,
    BadRequest,
    RequestTimeout,
    UpstreamUnavailable,
    UpstreamTimeout,
    CircuitOpen,
    BulkheadFull,
    Overloaded,
    Internal,
    NotFound,
    MethodNotAllowed,
    InvalidPolicy,
}

impl Code {
    pub(crate) fn status(self) -> u16 {
        match self {
            Code::NoRoute => 404,
            Code::Unauthorized => 401,
            Code::RateLimited => 429,
            Code::PayloadTooLarge => 413,
            Code::BadRequest => 400,
            Code::RequestTimeout => 408,
            Code::UpstreamUnavailable => 502,
            Code::UpstreamTimeout => 504,
            Code::CircuitOpen => 503,
            Code::BulkheadFull => 503,
            Code::Overloaded => 503,
            Code::Internal => 500,
            Code::NotFound => 404,
            Code::MethodNotAllowed => 405,
            Code::InvalidPolicy => 400,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Code::NoRoute => "no_route",
            Code::Unauthorized => "unauthorized",
            Code::RateLimited => "rate_limited",
            Code::PayloadTooLarge => "payload_too_large",
            Code::BadRequest => "bad_request",
            Code::RequestTimeout => "request_timeout",
            Code::UpstreamUnavailable => "upstream_unavailable",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::CircuitOpen => "circuit_open",
            Code::BulkheadFull => "bulkhead_full",
            Code::Overloaded => "overloaded",
            Code::Internal => "internal_error",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::InvalidPolicy => "invalid_policy",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Code::NoRoute => "No route matches this request",
            Code::Unauthorized => "Credentials not valid",
            Code::RateLimited => "Too many requests",
            Code::PayloadTooLarge => "Request body too large",
            Code::BadRequest => "Malformed request",
            Code::RequestTimeout => "Request not received in time",
            Code::UpstreamUnavailable => "Upstream unavailable",
            Code::UpstreamTimeout => "Upstream timed out",
            Code::CircuitOpen => "Upstream circuit open",
            Code::BulkheadFull => "Upstream at its concurrency limit",
            Code::Overloaded => "Gateway overloaded",
            Code::Internal => "Internal gateway error",
            Code::NotFound => "No such admin endpoint",
            Code::MethodNotAllowed => "Method not allowed here",
            Code::InvalidPolicy => "Policy rejected",
        }
    }

    /// Whether the client connection may carry another request afterwards. Not after a
    /// refused body (it is still on the wire, and may be huge) or a malformed request
    /// (its framing cannot be trusted), nor after a client too slow to send its request.
    pub(crate) fn keeps_connection(self) -> bool {
        !matches!(
            self,
            Code::PayloadTooLarge | Code::BadRequest | Code::RequestTimeout
        )
    }
}

pub(crate) struct Problem {
    pub(crate) code: Code,
    pub(crate) detail: String,
    pub(crate) extra: Map<String, Value>,
    /// Response headers the answer needs besides the standard ones.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    pub(crate) fn new(code: Code, detail: impl Into<String>) -> Self {
        Problem {
            code,
            detail: detail.into(),
            extra: Map::new(),
            headers: Vec::new(),
        }
    }

    /// Tells the client when to come back: the `retry_after` member and the
    /// `Retry-After` header, in whole seconds rounded up, at least 1.
    pub(crate) fn retry_after(mut self, wait: Duration) -> Self {
        let secs = retry_after_secs(wait);
        self.extra.insert("retry_after".into(), secs.into());
        self.headers
            .push((header::RETRY_AFTER, HeaderValue::from(secs)));
        self
    }

    pub(crate) fn body(&self) -> Bytes {
        let mut doc = Map::new();
        doc.insert(
            "type".into(),
            Value::String(format!("urn:tollgate:error:{}", self.code.as_str())),
        );
        doc.insert("title".into(), Value::String(self.code.title().into()));
        doc.insert("status".into(), Value::from(self.code.status()));
        doc.insert("detail".into(), Value::String(self.detail.clone()));
        doc.insert("error".into(), Value::String(self.code.as_str().into()));
        doc.extend(self.extra.clone());
        Bytes::from(serde_json::to_vec(&Value::Object(doc)).expect("JSON of plain values"))
    }

    /// Writes the problem as the whole response. `decorate` adds the headers every
    /// response carries (request id, configured security headers).
    pub(crate) async fn send(
        &self,
        session: &mut Session,
        decorate: impl FnOnce(&mut ResponseHeader),
    ) -> pingora::Result<()> {
        let body = self.body();
        let mut header = ResponseHeader::build(self.code.status(), Some(6))?;
        header.insert_header("content-type", "application/problem+json")?;
        header.insert_header("content-length", body.len())?;
        header.insert_header("cache-control", "no-store")?;
        for (name, value) in &self.headers {
            header.insert_header_alike(name, value.clone())?;
        }
        decorate(&mut header);
        if !self.code.keeps_connection() {
            session.set_keepalive(None);
            header.insert_header("connection", "close")?;
        }
        let head_only = session.req_header().method == http::Method::HEAD;
        session
            .write_response_header(Box::new(header), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }
}

/// Whole seconds, rounded up: a wait of 1.2 s is 2.
pub(crate) fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` says.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    whole_seconds(wait).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_rfc9457_with_extras() {
        let mut p = Problem::new(Code::NoRoute, "no route for GET /x");
        p.extra.insert("route".into(), Value::Null);
        let doc: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!(doc["status"], 404);
        assert_eq!(doc["error"], "no_route");
        assert_eq!(doc["detail"], "no route for GET /x");
        assert!(doc["type"].as_str().unwrap().ends_with(":no_route"));
        assert!(doc.get("route").is_some());
    }
}
