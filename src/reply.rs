//! The answers of the gateway's own HTTP apps (the admin API, the admission webhook):
//! JSON, text, or the RFC 9457 document the proxy writes, and their bounded request bodies.

use crate::problem::{Code, Problem};
use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;
use serde_json::Value;

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(status: StatusCode, value: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec_pretty(value).expect("JSON of plain values"),
        }
    }

    /// The same RFC 9457 document the proxy writes (`problem::Problem`).
    pub(crate) fn problem(code: Code, detail: impl Into<String>, extra: Value) -> Reply {
        let mut problem = Problem::new(code, detail);
        if let Value::Object(extra) = extra {
            problem.extra = extra;
        }
        Reply {
            status: StatusCode::from_u16(code.status()).expect("the codes' statuses are valid"),
            content_type: "application/problem+json",
            body: problem.body().to_vec(),
        }
    }

    pub(crate) fn text(status: StatusCode, text: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: text.as_bytes().to_vec(),
        }
    }

    /// The response, never cached by anything between.
    pub(crate) fn into_response(self) -> Response<Vec<u8>> {
        Response::builder()
            .status(self.status)
            .header("content-type", self.content_type)
            .header("content-length", self.body.len())
            .header("cache-control", "no-store")
            .body(self.body)
            .expect("valid response parts")
    }
}

/// Reads a request body of at most `max` bytes; a larger one is a 413.
pub(crate) async fn read_body(session: &mut ServerSession, max: usize) -> Result<Vec<u8>, Reply> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= max => body.extend_from_slice(&chunk),
            Ok(Some(_)) => {
                return Err(Reply::problem(
                    Code::PayloadTooLarge,
                    format!("a request body here is at most {} KiB", max / 1024),
                    Value::Null,
                ))
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Reply::problem(
                    Code::BadRequest,
                    format!("reading the body: {e}"),
                    Value::Null,
                ))
            }
        }
    }
}
