//! The route table: which route a request belongs to (first match wins).
//!
//! Matchers are compiled once per policy; matching borrows from the request and
//! allocates nothing.

use crate::config;
use crate::policy::compile::Compile;
use http::{HeaderName, HeaderValue, Method};
use pingora::http::RequestHeader;
use regex::Regex;
use serde_saphyr::Location;

#[derive(Debug)]
pub(crate) enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HostMatch {
    /// Lower-cased host name.
    Exact(String),
    /// `*.example.com` kept as `.example.com`: any non-empty label(s) before it.
    Wildcard(String),
}

#[derive(Debug)]
pub(crate) struct RouteMatcher {
    pub(crate) path: PathMatch,
    /// Empty: every method.
    pub(crate) methods: Vec<Method>,
    pub(crate) host: Option<HostMatch>,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

impl RouteMatcher {
    pub(crate) fn matches(&self, req: &RequestHeader, host: Option<&str>) -> bool {
        let path = req.uri.path();
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(&req.method))
            && self
                .host
                .as_ref()
                .is_none_or(|h| host.is_some_and(|host| h.matches(host)))
            && self
                .headers
                .iter()
                .all(|(name, value)| req.headers.get_all(name).iter().any(|v| v == value))
    }
}

impl HostMatch {
    pub(crate) fn parse(pattern: &str) -> HostMatch {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix('*') {
            Some(suffix) => HostMatch::Wildcard(suffix.to_string()),
            None => HostMatch::Exact(pattern),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// The request's host without port: the `Host` header, else the URI authority (HTTP/2).
pub(crate) fn request_host(req: &RequestHeader) -> Option<&str> {
    let raw = match req.headers.get(http::header::HOST) {
        Some(value) => value.to_str().ok()?,
        None => req.uri.authority()?.as_str(),
    };
    Some(&raw[..host_len(raw.as_bytes())])
}

/// [`request_host`] in the bytes the client sent, not checked: for the access log, which
/// escapes them, and which would rather show a malformed host than none.
pub(crate) fn request_host_bytes(req: &RequestHeader) -> Option<&[u8]> {
    let raw = match req.headers.get(http::header::HOST) {
        Some(value) => value.as_bytes(),
        None => req.uri.authority()?.as_str().as_bytes(),
    };
    Some(&raw[..host_len(raw)])
}

/// How much of `host` is left without its port.
fn host_len(host: &[u8]) -> usize {
    if host.starts_with(b"[") {
        // IPv6 literal: keep the brackets, drop what follows them.
        return host
            .iter()
            .position(|&b| b == b']')
            .map_or(host.len(), |end| end + 1);
    }
    // Bytes, not `rsplit_once(':')`: its char searcher costs more than the whole name.
    match host.iter().rposition(|&b| b == b':') {
        Some(colon) if host[colon + 1..].iter().all(u8::is_ascii_digit) => colon,
        _ => host.len(),
    }
}

pub(crate) fn compile(cx: &mut Compile<'_>, m: &config::MatchConfig) -> Option<RouteMatcher> {
    let errors_before = cx.errors.len();
    let given = [&m.path, &m.path_prefix, &m.path_regex];
    let mut paths = given.iter().filter_map(|p| p.as_ref());
    let path = match (
        m.path.as_ref(),
        m.path_prefix.as_ref(),
        m.path_regex.as_ref(),
    ) {
        (None, None, None) => PathMatch::Any,
        (Some(p), None, None) => PathMatch::Exact(p.value.clone()),
        (None, Some(p), None) => PathMatch::Prefix(p.value.clone()),
        (None, None, Some(p)) => match regex::Regex::new(&p.value) {
            Ok(re) => PathMatch::Regex(re),
            Err(e) => {
                cx.error(&p.referenced, format!("invalid path_regex: {e}"));
                PathMatch::Any
            }
        },
        _ => {
            let second = paths.nth(1).expect("two or more are set");
            cx.error(
                &second.referenced,
                "use only one of path, path_prefix and path_regex",
            );
            PathMatch::Any
        }
    };
    for p in [&m.path, &m.path_prefix].into_iter().flatten() {
        if !p.value.starts_with('/') {
            cx.error(
                &p.referenced,
                format!("path `{}` must start with '/'", p.value),
            );
        }
    }
    let mut methods = Vec::new();
    for method in &m.methods {
        match Method::from_bytes(method.value.to_ascii_uppercase().as_bytes()) {
            Ok(parsed) => methods.push(parsed),
            Err(_) => cx.error(
                &method.referenced,
                format!("`{}` is not an HTTP method", method.value),
            ),
        }
    }
    let host = m.host.as_ref().map(|h| {
        if h.value.contains('*') && !h.value.starts_with("*.") || h.value.matches('*').count() > 1 {
            cx.error(
                &h.referenced,
                format!(
                    "host `{}`: a wildcard is only allowed as a leading `*.`",
                    h.value
                ),
            );
        }
        HostMatch::parse(&h.value)
    });
    let mut headers = Vec::new();
    for (name, value) in &m.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => cx.error(
                &Location::UNKNOWN,
                format!("match.headers: `{name}: {value}` is not a valid header"),
            ),
        }
    }
    (cx.errors.len() == errors_before).then_some(RouteMatcher {
        path,
        methods,
        host,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, host: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        if let Some(host) = host {
            req.insert_header("host", host).unwrap();
        }
        req
    }

    fn matcher(path: PathMatch) -> RouteMatcher {
        RouteMatcher {
            path,
            methods: Vec::new(),
            host: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn paths() {
        let req = request("GET", "/api/predict/7?x=1", None);
        assert!(matcher(PathMatch::Prefix("/api/predict".into())).matches(&req, None));
        assert!(!matcher(PathMatch::Exact("/api/predict".into())).matches(&req, None));
        assert!(matcher(PathMatch::Exact("/api/predict/7".into())).matches(&req, None));
        assert!(matcher(PathMatch::Regex(
            Regex::new("^/api/predict/[0-9]+$").unwrap()
        ))
        .matches(&req, None));
    }

    #[test]
    fn methods_hosts_headers() {
        let mut m = matcher(PathMatch::Any);
        m.methods = vec![Method::POST];
        assert!(!m.matches(&request("GET", "/", None), None));
        assert!(m.matches(&request("POST", "/", None), None));

        let mut m = matcher(PathMatch::Any);
        m.host = Some(HostMatch::parse("*.Example.com"));
        let req = request("GET", "/", Some("API.example.com:8080"));
        assert_eq!(request_host(&req), Some("API.example.com"));
        assert!(m.matches(&req, request_host(&req)));
        assert!(!m.matches(&req, Some("example.com")));
        assert!(!m.matches(&req, None));

        let mut m = matcher(PathMatch::Any);
        m.headers = vec![(
            HeaderName::from_static("x-beta"),
            HeaderValue::from_static("1"),
        )];
        let mut req = request("GET", "/", None);
        assert!(!m.matches(&req, None));
        req.insert_header("x-beta", "1").unwrap();
        assert!(m.matches(&req, None));
    }

    #[test]
    fn host_ports() {
        fn strip_port(host: &str) -> &str {
            &host[..host_len(host.as_bytes())]
        }
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("example.com:"), "example.com");
        assert_eq!(strip_port("a:b:8080"), "a:b");
        assert_eq!(strip_port("example.com:http"), "example.com:http");
    }

    #[test]
    fn the_access_log_sees_the_host_the_route_match_sees_or_a_malformed_one() {
        let mut req = request("GET", "/", Some("API.example.com:8443"));
        assert_eq!(request_host_bytes(&req), Some(&b"API.example.com"[..]));
        req.insert_header("host", &b"caf\xe9.example.com:80"[..])
            .unwrap();
        assert_eq!(request_host(&req), None);
        assert_eq!(request_host_bytes(&req), Some(&b"caf\xe9.example.com"[..]));
    }
}
