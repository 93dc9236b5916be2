//! Compact tables for the terminal and docs/benchmarks.md.

use crate::bodies::Class;
use crate::load::Report;
use std::fmt::Write;

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn bound_ms(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s.is_infinite() => "inf".into(),
        Some(s) => format!("≤{:.3}", s * 1000.0),
        None => "-".into(),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The latency table: one row per run.
pub fn latency_table(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| run | conns | sent | adm/s | client p50 ms | p90 | p99 | max | server p50 ms (bucket) | p90 | p99 | server mean ms | 4xx/5xx/no answer/wrong | RSS end MiB | RSS peak MiB |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in reports {
        let t = &r.tally;
        let h = &t.latency;
        let four = t
            .by_class
            .values()
            .flat_map(|c| c.by_status.iter())
            .filter(|(s, _)| (400..500).contains(*s))
            .map(|(_, n)| n)
            .sum::<u64>();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{}/{}/{} | {} | {} |",
            r.plan.label,
            r.plan.connections,
            t.sent,
            r.rate(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            bound_ms(r.server.quantile_bound(0.5)),
            bound_ms(r.server.quantile_bound(0.9)),
            bound_ms(r.server.quantile_bound(0.99)),
            r.server
                .mean()
                .map_or("-".into(), |m| format!("{:.3}", m * 1000.0)),
            four,
            t.server_errors,
            t.transport_errors,
            t.unexpected,
            mib(r.memory.last().map_or(0, |(_, m)| m.rss_kib)),
            mib(r.peak_kib()),
        );
    }
    out
}

/// The sustained-load summary: answers by class of body, then the verdict lines.
pub fn sustained_table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| body class | sent | answers by status | unexpected | no answer |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (class, c) in &r.tally.by_class {
        let statuses = c
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            class.label(),
            c.sent,
            statuses,
            c.unexpected,
            c.no_answer
        );
    }
    let _ = writeln!(out);
    let t = &r.tally;
    let _ = writeln!(
        out,
        "duration {:.0} s, {} requests ({:.0}/s), 5xx: {}, unexpected answers: {}, keep-alive transport errors: {}, over-limit bodies refused by closing: {}",
        r.elapsed.as_secs_f64(),
        t.sent,
        r.rate(),
        t.server_errors,
        t.unexpected,
        t.transport_errors,
        t.huge_closed
    );
    let _ = writeln!(
        out,
        "process alive at end: {}, /healthz: {}",
        yes(r.alive),
        yes(r.healthy)
    );
    let _ = writeln!(
        out,
        "RSS at 25%: {} MiB, at 100%: {} MiB, peak (VmHWM): {} MiB",
        r.rss_at(0.25).map_or("-".into(), mib),
        r.rss_at(1.0).map_or("-".into(), mib),
        mib(r.peak_kib())
    );
    let h = &t.latency;
    let _ = writeln!(
        out,
        "client latency (answered; 1.5 MiB and over-limit bodies left out) p50 {} ms, p99 {} ms, max {} ms; server histogram p99 {} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        bound_ms(r.server.quantile_bound(0.99))
    );
    if let Some(e) = &t.first_error {
        let _ = writeln!(out, "first transport error: {e}");
    }
    out
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

/// All classes, for callers that check coverage.
pub fn classes_seen(r: &Report) -> Vec<Class> {
    r.tally.by_class.keys().copied().collect()
}
