//! Whether a request goes on, and if not, what answers it (SPEC §4). One ordering,
//! written once: request target and framing (400) → route (404) → identity (401) →
//! shedding (the route's fallback, else 503) → rate limits, narrowest rule first (429) →
//! declared body size (413). The proxy renders the verdict; `POST /explain` reports it,
//! with what was learned on the way, without consuming quota (`consume: false`).

use crate::config::OnInvalid;
use crate::gateway::Gateway;
use crate::identity::{Principal, Resolution};
use crate::policy::Policy;
use crate::problem::{Code, Problem};
use crate::ratelimit;
use crate::shed;
use pingora::http::RequestHeader;
use std::net::IpAddr;
use std::sync::Arc;

/// The request as admission sees it.
pub(crate) struct RequestView<'a> {
    pub(crate) req: &'a RequestHeader,
    /// `forwarding::normalise`'s verdict on the request target and framing.
    pub(crate) framing: Result<(), &'static str>,
    /// The client's address (after trusted proxies), `None` when unknown.
    pub(crate) client_ip: Option<IpAddr>,
    /// The TCP peer is a trusted proxy (its identity headers count).
    pub(crate) peer_trusted: bool,
    /// When the request arrived (its rate-limit buckets are spent as of then).
    pub(crate) arrived: std::time::Instant,
}

pub(crate) enum Verdict {
    /// On to the pool (or the cache).
    Forward,
    /// The gateway answers with this problem.
    Refuse(Problem),
    /// The route's fallback answers in place of the 503 with this code.
    Fallback(Code),
}

/// What the credentials turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// No identity section: every request is anonymous.
    NotChecked,
    None,
    Valid,
    Invalid(&'static str),
}

/// The verdict, and what admission learned on its way there: the proxy keeps it in the
/// request's context, `/explain` reports it. A step not reached leaves its part empty.
pub(crate) struct Admission {
    pub(crate) verdict: Verdict,
    pub(crate) route: Option<usize>,
    pub(crate) credentials: Option<Credentials>,
    /// The resolved user; `None` is anonymous.
    pub(crate) principal: Option<Arc<Principal>>,
    /// Whether shedding was asked, and whether it shed the request.
    pub(crate) shed: Option<bool>,
    /// Every rule that applied, with its verdict, when the rate-limit step ran.
    pub(crate) limits: Option<ratelimit::Outcome>,
}

/// Decides `view` against `policy`. With `consume`, the rate-limit buckets are spent
/// and the shedding counters count: a real request. Without, nothing changes.
pub(crate) async fn admit(
    policy: &Policy,
    gateway: &Gateway,
    view: &RequestView<'_>,
    consume: bool,
) -> Admission {
    let mut admission = Admission {
        verdict: Verdict::Forward,
        route: None,
        credentials: None,
        principal: None,
        shed: None,
        limits: None,
    };
    let req = view.req;
    if let Err(reason) = view.framing {
        return admission.refuse(Problem::new(Code::BadRequest, reason));
    }

    let Some(route_index) = policy.route_for(req) else {
        let detail = format!("no route matches {} {}", req.method, req.uri.path());
        return admission.refuse(Problem::new(Code::NoRoute, detail));
    };
    admission.route = Some(route_index);
    let route = &policy.routes[route_index];

    admission.credentials = Some(Credentials::NotChecked);
    if let Some(identity) = &policy.identity {
        let credentials = match identity.resolve(&req.headers, view.peer_trusted) {
            Resolution::User(principal) => {
                admission.principal = Some(principal);
                Credentials::Valid
            }
            Resolution::Anonymous => Credentials::None,
            Resolution::Invalid(reason) => Credentials::Invalid(reason),
        };
        admission.credentials = Some(credentials);
        if let Credentials::Invalid(reason) = credentials {
            if identity.on_invalid != OnInvalid::Anonymous {
                let mut problem = Problem::new(Code::Unauthorized, reason);
                if identity.uses_bearer_tokens() {
                    problem.headers.push((
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    ));
                }
                return admission.refuse(problem);
            }
        }
    }

    // Shedding before the limits: a shed request spends no quota.
    if let Some(shedding) = &policy.shedding {
        let shed = shed::shed_level(&gateway.load, shedding, route.priority).is_some();
        admission.shed = Some(shed);
        if shed {
            if consume {
                route.shed.inc();
                gateway.load.count_shed();
            }
            if route.fallback.is_some() {
                admission.verdict = Verdict::Fallback(Code::Overloaded);
                return admission;
            }
            return admission.refuse(shed::overloaded(shedding, route.priority));
        }
    }

    let limits = &policy.rate_limits;
    if !limits.rules.is_empty() {
        let subject = policy.subject(
            route_index,
            view.client_ip,
            admission.principal.as_deref(),
            &req.headers,
            view.arrived,
        );
        let outcome = limits
            .decide(&subject, gateway.limit_scale(), consume)
            .await;
        let denied = outcome.denied.map(|rule| limits.refusal(rule, &outcome));
        admission.limits = Some(outcome);
        if let Some(problem) = denied {
            return admission.refuse(problem);
        }
    }

    let max = policy.server.max_request_body;
    if declared_length(req).is_some_and(|length| length > max) {
        let detail = format!("the request body exceeds the limit of {max} bytes");
        return admission.refuse(Problem::new(Code::PayloadTooLarge, detail));
    }
    admission
}

impl Admission {
    fn refuse(mut self, problem: Problem) -> Admission {
        self.verdict = Verdict::Refuse(problem);
        self
    }
}

/// The body length the request declares. A list of equal values was collapsed to one
/// by `forwarding::normalise`; the first is taken all the same.
fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use crate::metrics::Metrics;
    use std::time::Duration;

    fn gateway(yaml: &str) -> Arc<Gateway> {
        let metrics = Metrics::new();
        let events = Arc::new(EventLog::default());
        let text = format!("version: 1\n{yaml}");
        let policy = crate::policy::compile_text(
            std::path::Path::new("gateway.yaml"),
            &text,
            None,
            &metrics,
            &events,
        )
        .expect("test policy compiles");
        Gateway::new(policy, metrics, events)
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(
            http::Method::from_bytes(method.as_bytes()).unwrap(),
            path.as_bytes(),
            None,
        )
        .unwrap();
        req.insert_header("host", "api.example").unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    async fn decide(gateway: &Gateway, req: &RequestHeader, consume: bool) -> Admission {
        let policy = gateway.policy.load_full();
        let view = RequestView {
            req,
            framing: Ok(()),
            client_ip: Some("192.0.2.7".parse().unwrap()),
            peer_trusted: false,
            arrived: std::time::Instant::now(),
        };
        admit(&policy, gateway, &view, consume).await
    }

    fn refused_with(admission: &Admission) -> Option<Code> {
        match &admission.verdict {
            Verdict::Refuse(problem) => Some(problem.code),
            _ => None,
        }
    }

    const BASE: &str = "upstreams:\n  app:\n    servers: [\"127.0.0.1:9\"]\nroutes:\n  - name: api\n    match: { path_prefix: /api }\n    upstream: app\n";

    #[tokio::test]
    async fn a_framing_error_is_a_400_before_any_route() {
        let gw = gateway(BASE);
        let policy = gw.policy.load_full();
        let req = request("GET", "/nowhere", &[]);
        let view = RequestView {
            req: &req,
            framing: Err("two Content-Length values differ"),
            client_ip: None,
            peer_trusted: false,
            arrived: std::time::Instant::now(),
        };
        let admission = admit(&policy, &gw, &view, true).await;
        assert_eq!(refused_with(&admission), Some(Code::BadRequest));
        assert_eq!(admission.route, None);
    }

    #[tokio::test]
    async fn no_route_is_a_404() {
        let gw = gateway(BASE);
        let admission = decide(&gw, &request("GET", "/elsewhere", &[]), true).await;
        assert_eq!(refused_with(&admission), Some(Code::NoRoute));
    }

    #[tokio::test]
    async fn invalid_credentials_are_a_401() {
        let gw = gateway(&format!(
            "{BASE}identity:\n  api_keys:\n    keys:\n      - {{ sha256: \"{}\", user: alice }}\n",
            "0".repeat(64)
        ));
        let admission = decide(
            &gw,
            &request("GET", "/api/x", &[("x-api-key", "guess")]),
            true,
        )
        .await;
        assert_eq!(refused_with(&admission), Some(Code::Unauthorized));
        assert_eq!(
            admission.credentials,
            Some(Credentials::Invalid("unknown API key"))
        );
        let anonymous = decide(&gw, &request("GET", "/api/x", &[]), true).await;
        assert!(matches!(anonymous.verdict, Verdict::Forward));
        assert_eq!(anonymous.credentials, Some(Credentials::None));
    }

    #[tokio::test]
    async fn narrowest_rule_first_and_its_429_names_it() {
        let gw = gateway(&format!(
            "{BASE}rate_limits:\n  - name: global\n    key: global\n    rate: 100/min\n  - name: per-ip\n    key: ip\n    rate: 1/min\n"
        ));
        let req = request("GET", "/api/x", &[]);
        let first = decide(&gw, &req, true).await;
        assert!(matches!(first.verdict, Verdict::Forward));
        let policy = gw.policy.load_full();
        let order: Vec<&str> = first
            .limits
            .unwrap()
            .applied
            .iter()
            .map(|(i, _, _)| &*policy.rate_limits.rules[*i].name)
            .collect();
        assert_eq!(
            order,
            ["per-ip", "global"],
            "written global first, evaluated per-ip first"
        );

        let second = decide(&gw, &req, true).await;
        let Verdict::Refuse(problem) = &second.verdict else {
            panic!("the second request in the minute was admitted");
        };
        assert_eq!(problem.code, Code::RateLimited);
        assert_eq!(problem.extra["rule"], "per-ip");
        assert_eq!(problem.extra["retry_after"], 60);
    }

    #[tokio::test]
    async fn without_consume_nothing_is_spent() {
        let gw = gateway(&format!(
            "{BASE}rate_limits:\n  - name: per-ip\n    key: ip\n    rate: 1/min\n"
        ));
        let req = request("GET", "/api/x", &[]);
        for _ in 0..3 {
            assert!(matches!(
                decide(&gw, &req, false).await.verdict,
                Verdict::Forward
            ));
        }
        assert!(matches!(
            decide(&gw, &req, true).await.verdict,
            Verdict::Forward
        ));
    }

    #[tokio::test]
    async fn shedding_comes_before_the_limits_and_spends_no_quota() {
        let gw = gateway(&format!(
            "{BASE}rate_limits:\n  - name: per-ip\n    key: ip\n    rate: 1/min\nshedding:\n  max_inflight: 10\n  levels:\n    - {{ above: 50%, shed: [normal] }}\n"
        ));
        crate::gateway::load_monitor::force(&gw, Some((1, Duration::from_secs(60))));
        let req = request("GET", "/api/x", &[]);
        for _ in 0..2 {
            let shed = decide(&gw, &req, true).await;
            assert_eq!(refused_with(&shed), Some(Code::Overloaded));
            assert_eq!(shed.shed, Some(true));
            assert!(shed.limits.is_none(), "a shed request reached the limits");
        }
        crate::gateway::load_monitor::force(&gw, Some((0, Duration::from_secs(60))));
        assert!(matches!(
            decide(&gw, &req, true).await.verdict,
            Verdict::Forward
        ));
    }

    #[tokio::test]
    async fn a_route_with_a_fallback_answers_with_it_when_shed() {
        let gw = gateway(
            "upstreams:\n  app:\n    servers: [\"127.0.0.1:9\"]\nroutes:\n  - name: api\n    match: { path_prefix: /api }\n    upstream: app\n    priority: low\n    fallback: { status: 200, body: \"{}\" }\nshedding:\n  max_inflight: 10\n  levels:\n    - { above: 50%, shed: [low] }\n",
        );
        crate::gateway::load_monitor::force(&gw, Some((1, Duration::from_secs(60))));
        let admission = decide(&gw, &request("GET", "/api/x", &[]), true).await;
        assert!(matches!(
            admission.verdict,
            Verdict::Fallback(Code::Overloaded)
        ));
    }

    #[tokio::test]
    async fn a_declared_body_over_the_limit_is_a_413_after_the_limits() {
        let gw = gateway(&format!(
            "{BASE}server:\n  max_request_body: 1KiB\nrate_limits:\n  - name: per-ip\n    key: ip\n    rate: 5/min\n"
        ));
        let big = request("POST", "/api/x", &[("content-length", "1025")]);
        let admission = decide(&gw, &big, true).await;
        assert_eq!(refused_with(&admission), Some(Code::PayloadTooLarge));
        assert!(
            admission.limits.is_some(),
            "the body size is judged after the limits"
        );
        let fits = request("POST", "/api/x", &[("content-length", "1024")]);
        assert!(matches!(
            decide(&gw, &fits, true).await.verdict,
            Verdict::Forward
        ));
    }

    /// Two users' keys and the identity stage that knows them: alice `gold`, bob
    /// `free` (the default tier).
    fn with_two_users(rules: &str) -> String {
        let hash = |key: &str| crate::digest::sha256_hex(key);
        format!(
            "{BASE}identity:\n  api_keys:\n    keys:\n      - {{ sha256: \"{}\", user: alice, tier: gold }}\n      - {{ sha256: \"{}\", user: bob }}\n  default_tier: free\nrate_limits:\n{rules}",
            hash("alice-key"),
            hash("bob-key")
        )
    }

    #[tokio::test]
    async fn a_client_key_shared_by_two_rules_is_the_same_bucket_key_only_when_it_is() {
        // `user_or_ip` and `ip` name the same key for an anonymous client and different
        // ones for a user: the per-IP rule must still count alice and bob together.
        let gw = gateway(&with_two_users(
            "  - { name: per-client, key: user_or_ip, rate: 10/min }\n  - { name: per-ip, key: ip, rate: 2/min }\n",
        ));
        let from = |key: &'static str| request("GET", "/api/x", &[("x-api-key", key)]);
        assert!(matches!(
            decide(&gw, &from("alice-key"), true).await.verdict,
            Verdict::Forward
        ));
        assert!(matches!(
            decide(&gw, &from("bob-key"), true).await.verdict,
            Verdict::Forward
        ));
        let third = decide(&gw, &from("bob-key"), true).await;
        let Verdict::Refuse(problem) = &third.verdict else {
            panic!("a third request from one address within the minute was admitted");
        };
        assert_eq!(problem.extra["rule"], "per-ip");

        let anonymous = gateway(&with_two_users(
            "  - { name: per-client, key: user_or_ip, rate: 2/min }\n  - { name: per-ip, key: ip, rate: 10/min }\n",
        ));
        let nobody = request("GET", "/api/x", &[]);
        for _ in 0..2 {
            assert!(matches!(
                decide(&anonymous, &nobody, true).await.verdict,
                Verdict::Forward
            ));
        }
        let third = decide(&anonymous, &nobody, true).await;
        let Verdict::Refuse(problem) = &third.verdict else {
            panic!("an anonymous client over its own limit was admitted");
        };
        assert_eq!(problem.extra["rule"], "per-client");
    }

    #[tokio::test]
    async fn the_policy_header_follows_each_requests_tier_and_rules() {
        let gw = gateway(&with_two_users(
            "  - { name: global, key: global, rate: 1000/min }\n  - { name: per-user, key: user_or_ip, rate: { free: 10/min, gold: 50/min } }\n  - { name: anonymous, key: ip, when: anonymous, rate: 5/s }\n",
        ));
        let policy_header = |admission: Admission| {
            let policy = gw.policy.load_full();
            let outcome = admission.limits.expect("rate limits applied");
            let advert = crate::ratelimit::Advert::of(&policy.rate_limits, &outcome)
                .expect("enforced rules applied");
            let mut policy_field = None;
            advert.fields(&policy.rate_limits, |name, value| {
                if name == "ratelimit-policy" {
                    policy_field = Some(value.to_str().unwrap().to_string());
                }
            });
            policy_field.expect("a RateLimit-Policy field")
        };
        let anonymous = "\"per-user\";q=10;w=60, \"anonymous\";q=5;w=1, \"global\";q=1000;w=60";
        let gold = "\"per-user\";q=50;w=60, \"global\";q=1000;w=60";
        let free = "\"per-user\";q=10;w=60, \"global\";q=1000;w=60";
        for _ in 0..2 {
            let nobody = decide(&gw, &request("GET", "/api/x", &[]), true).await;
            assert_eq!(policy_header(nobody), anonymous);
            let alice = request("GET", "/api/x", &[("x-api-key", "alice-key")]);
            assert_eq!(policy_header(decide(&gw, &alice, true).await), gold);
            let bob = request("GET", "/api/x", &[("x-api-key", "bob-key")]);
            assert_eq!(policy_header(decide(&gw, &bob, true).await), free);
        }
    }
}
