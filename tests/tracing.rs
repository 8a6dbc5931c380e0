//! Span export over OTLP/HTTP (SPEC `tracing`): an OTLP receiver inside the test decodes
//! what the real binary exports and checks span names, parent/child ids, attributes,
//! that the upstream saw the attempt's span as its parent, head sampling (a sampled
//! parent followed, an unsampled started trace not exported) and `sample_errors`.

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;
use std::time::Duration;

const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Every span the receiver got, with the service name of its resource.
fn exported(receiver: &Origin) -> Vec<(String, Span)> {
    let mut spans = Vec::new();
    for request in receiver.seen() {
        assert_eq!(request.request_line(), "POST /v1/traces HTTP/1.1");
        assert_eq!(
            request.field("content-type").as_deref(),
            Some("application/x-protobuf")
        );
        let export = ExportTraceServiceRequest::decode(&request.body[..]).unwrap();
        for resource in export.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    }
    spans
}

#[test]
fn spans_are_exported_with_their_parents_and_sampling() {
    let receiver = Origin::start(|_, _| {
        http_response("200 OK", &[("content-type", "application/x-protobuf")], "")
    });
    let origin = Origin::recording();
    let gw = Tollgate::start(&api_policy(
        origin.addr,
        &format!(
            "rate_limits:
  - name: per-ip
    key: ip
    rate: 2/h
tracing:
  otlp: {{ endpoint: \"http://{}\" }}
  sample: 0%
  service_name: edge
",
            receiver.addr
        ),
    ));

    // A sampled parent from the client is followed; a trace started here at 0 % is not.
    let traced = gw
        .client
        .get(gw.url("/api/traced"))
        .header("traceparent", CLIENT)
        .send()
        .unwrap();
    assert_eq!(traced.status(), 200);
    assert_eq!(gw.get("/api/untraced").status(), 200);
    // The rule's third request is the gateway's own 429: exported by `sample_errors`.
    assert_eq!(gw.get("/api/limited").status(), 429);

    // Spans leave in the order requests ended: once the 429's is in, so is the rest.
    assert!(
        wait_for(Duration::from_secs(10), || exported(&receiver).iter().any(
            |(_, s)| attribute(s, "url.path").as_deref() == Some("/api/limited")
        )),
        "spans exported: {:?}",
        exported(&receiver)
    );
    let spans = exported(&receiver);
    assert!(spans.iter().all(|(service, _)| service == "edge"));
    let of_path = |path: &str| {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| attribute(s, "url.path").as_deref() == Some(path))
            .collect::<Vec<_>>()
    };
    assert!(
        of_path("/api/untraced").is_empty(),
        "an unsampled trace was exported"
    );

    // The followed trace: the server span under the client's, the attempt under it.
    let server = of_path("/api/traced");
    assert_eq!(server.len(), 1, "{spans:?}");
    let server = server[0];
    assert_eq!(server.name, "GET api");
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex(&server.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&server.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(attribute(server, "http.route").as_deref(), Some("api"));
    assert_eq!(
        attribute(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attribute(server, "tollgate.tier"),
        None,
        "anonymous: no tier"
    );
    let client: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.parent_span_id == server.span_id)
        .collect();
    assert_eq!(client.len(), 1, "one attempt: {spans:?}");
    let client = client[0];
    assert_eq!(client.kind, SpanKind::Client as i32);
    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(
        attribute(client, "tollgate.upstream").as_deref(),
        Some("app")
    );
    assert_eq!(
        attribute(client, "server.address"),
        Some(origin.addr.to_string())
    );
    assert_eq!(attribute(client, "tollgate.retry").as_deref(), Some("0"));
    assert_eq!(
        attribute(client, "tollgate.outcome").as_deref(),
        Some("200")
    );
    assert!(client.start_time_unix_nano >= server.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= server.end_time_unix_nano);
    // The upstream's parent is the attempt's span.
    let sent = origin
        .seen()
        .into_iter()
        .find(|r| r.target() == "/api/traced")
        .unwrap()
        .field("traceparent")
        .unwrap();
    assert_eq!(
        sent,
        format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
            hex(&client.span_id)
        )
    );

    // The gateway's own 429, unsampled but exported, says why; no attempt under it.
    let limited = of_path("/api/limited");
    assert_eq!(limited.len(), 1, "{spans:?}");
    assert_eq!(
        attribute(limited[0], "http.response.status_code").as_deref(),
        Some("429")
    );
    assert_eq!(
        attribute(limited[0], "tollgate.reason").as_deref(),
        Some("rate_limited:per-ip")
    );
    assert!(!spans
        .iter()
        .any(|(_, s)| s.parent_span_id == limited[0].span_id));
    assert_eq!(gw.metric("tollgate_trace_spans_dropped_total"), Some(0.0));
}

#[test]
fn spans_the_collector_cannot_take_are_counted_as_dropped() {
    let origin = Origin::recording();
    let gw = Tollgate::start(&api_policy(
        origin.addr,
        &format!(
            "tracing:\n  otlp: {{ endpoint: \"http://{}\", timeout: 500ms }}\n  sample: 100%\n",
            closed_addr()
        ),
    ));
    assert_eq!(gw.get("/api/x").status(), 200);
    assert!(
        wait_for(Duration::from_secs(10), || gw
            .metric("tollgate_trace_spans_dropped_total")
            .is_some_and(|n| n >= 2.0)),
        "dropped: {:?}",
        gw.metric("tollgate_trace_spans_dropped_total")
    );
}

#[test]
fn check_refuses_an_endpoint_it_cannot_send_to() {
    let text = format!(
        "version: 1\n{}",
        api_policy(
            "127.0.0.1:3000",
            "tracing:\n  otlp:\n    endpoint: https://collector.example:4318\n"
        )
    );
    let (code, stderr) = check_policy(&text, &[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("gateway.yaml:11:") && stderr.contains("must be an http:// URL"),
        "{stderr}"
    );
}
