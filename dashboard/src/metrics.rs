//! `/metrics` in the Prometheus text exposition format.

use crate::App;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write;

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

pub(crate) async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let (t, clients, active) = app.hub.totals();
    let mut o = String::new();
    let counters = app.hub.store_counters();
    if !counters.is_empty() {
        let (bytes, requests): (Vec<_>, Vec<_>) = counters.iter().partition(|(k, _)| k.starts_with("bytes_"));
        let requests: Vec<(String, f64)> =
            requests.iter().map(|(k, v)| (format!("{{op=\"{k}\"}}"), *v as f64)).collect();
        family(
            &mut o,
            "deltasync_store_requests_total",
            "counter",
            "Requests to the object store.",
            &requests,
        );
        let bytes: Vec<(String, f64)> = bytes
            .iter()
            .map(|(k, v)| (format!("{{direction=\"{}\"}}", k.trim_start_matches("bytes_")), *v as f64))
            .collect();
        family(
            &mut o,
            "deltasync_store_bytes_total",
            "counter",
            "Bytes to and from the object store.",
            &bytes,
        );
    }
    let one = |v: u64| vec![(String::new(), v as f64)];
    family(
        &mut o,
        "deltasync_wire_bytes_total",
        "counter",
        "Bytes on the wire, framing included.",
        &[("{direction=\"in\"}".into(), t.wire_in as f64), ("{direction=\"out\"}".into(), t.wire_out as f64)],
    );
    family(
        &mut o,
        "deltasync_file_bytes_total",
        "counter",
        "File bytes of finished transfers (what full transfers would have sent).",
        &one(t.full_bytes),
    );
    family(
        &mut o,
        "deltasync_reused_bytes_total",
        "counter",
        "File bytes reused from earlier versions instead of sent.",
        &one(t.reused_bytes),
    );
    family(
        &mut o,
        "deltasync_literal_bytes_total",
        "counter",
        "File bytes sent as data.",
        &one(t.literal_bytes),
    );
    family(
        &mut o,
        "deltasync_transfer_wire_bytes_total",
        "counter",
        "Bytes on the wire of finished transfers.",
        &one(t.transfer_wire),
    );
    let by_result: Vec<(String, f64)> = t
        .transfers
        .iter()
        .map(|(k, v)| {
            let (dir, res) = k.split_once('/').unwrap_or((k, ""));
            (format!("{{direction=\"{dir}\",result=\"{res}\"}}"), *v as f64)
        })
        .collect();
    family(
        &mut o,
        "deltasync_transfers_total",
        "counter",
        "Finished transfers by direction and result.",
        &by_result,
    );
    family(
        &mut o,
        "deltasync_auth_failures_total",
        "counter",
        "Failed authentications.",
        &one(t.auth_failures),
    );
    family(
        &mut o,
        "deltasync_refused_requests_total",
        "counter",
        "Requests refused or failed.",
        &one(t.refused),
    );
    family(
        &mut o,
        "deltasync_connection_errors_total",
        "counter",
        "Connections that ended with an error other than authentication.",
        &one(t.connection_errors),
    );
    family(
        &mut o,
        "deltasync_connections_total",
        "counter",
        "Connections that proved a key.",
        &one(t.connections),
    );
    let refused: Vec<(String, f64)> =
        ["full", "per_address", "banned", "evicted", "handshake_timeout", "bad_handshake"]
            .iter()
            .map(|r| {
                (format!("{{reason=\"{r}\"}}"), t.refused_connections.get(*r).copied().unwrap_or(0) as f64)
            })
            .collect();
    family(
        &mut o,
        "deltasync_connections_refused_total",
        "counter",
        "Connections refused, or dropped before they proved a key, by reason.",
        &refused,
    );
    family(&mut o, "deltasync_open_connections", "gauge", "Connections open now.", &one(t.open_connections));
    family(
        &mut o,
        "deltasync_unauthenticated_connections",
        "gauge",
        "Open connections that have not proved a key yet.",
        &one(t.unauthenticated_connections),
    );
    family(&mut o, "deltasync_connected_clients", "gauge", "Clients connected now.", &one(clients as u64));
    family(&mut o, "deltasync_active_transfers", "gauge", "Transfers in progress.", &one(active as u64));
    family(
        &mut o,
        "deltasync_transfer_duration_seconds_total",
        "counter",
        "Time spent in finished transfers.",
        &[(String::new(), t.duration_seconds)],
    );
    let per_key = |f: fn(&crate::KeyTotals) -> u64| -> Vec<(String, f64)> {
        t.by_key.iter().map(|(k, v)| (format!("{{key=\"{}\"}}", escape(k)), f(v) as f64)).collect()
    };
    family(
        &mut o,
        "deltasync_key_sessions_total",
        "counter",
        "Sessions that proved a key, by key name.",
        &per_key(|k| k.sessions),
    );
    family(
        &mut o,
        "deltasync_key_transfers_total",
        "counter",
        "Finished transfers, by key name.",
        &per_key(|k| k.transfers),
    );
    family(
        &mut o,
        "deltasync_key_wire_bytes_total",
        "counter",
        "Bytes on the wire of finished transfers, by key name.",
        &per_key(|k| k.wire_bytes),
    );
    family(
        &mut o,
        "deltasync_key_file_bytes_total",
        "counter",
        "File bytes of finished transfers, by key name.",
        &per_key(|k| k.file_bytes),
    );
    family(
        &mut o,
        "deltasync_key_refused_requests_total",
        "counter",
        "Requests refused (permission denied included), by key name.",
        &per_key(|k| k.refused),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], o)
}

/// A label value as the exposition format wants it (key names are chosen
/// by the server's admin, but may hold any character).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
