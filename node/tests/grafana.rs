//! The Grafana dashboard (docker/grafana/diloco-dashboard.json) queries only metrics a node
//! serves: every `diloco_*` name in its expressions appears in the `/metrics` text.

use diloco_node::driver::status::{Shared, Status};
use diloco_node::net::NetStats;
use std::collections::BTreeSet;
use std::sync::Arc;

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

/// The `diloco_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("diloco_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if before_ok {
            names.push(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_exists() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docker/grafana/diloco-dashboard.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(
        all.len() >= 10,
        "only {} expressions in the dashboard",
        all.len()
    );
    let shared = Shared::new(Status::default(), Arc::new(NetStats::default()));
    let text = shared.render_metrics().unwrap();
    let served: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split([' ', '{']).next())
        .collect();
    let mut missing = Vec::new();
    for e in &all {
        let names = metric_names(e);
        assert!(
            !names.is_empty(),
            "an expression queries no diloco metric: {e}"
        );
        missing.extend(names.into_iter().filter(|n| !served.contains(n.as_str())));
    }
    assert!(
        missing.is_empty(),
        "not in /metrics: {missing:?}\nserved: {served:?}"
    );
}

#[test]
fn names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum(rate(diloco_bytes_sent_total[1m])) / count(diloco_round)"),
        vec!["diloco_bytes_sent_total", "diloco_round"]
    );
    assert!(metric_names("rate(xdiloco_round[1m])").is_empty());
}
