//! The server's own latency: `multus_eni_webhook_admission_duration_seconds` from `/metrics`.
//!
//! A Prometheus histogram only has bucket counts, so quantiles are reported as the upper bound
//! of the bucket that holds them ("p99 ≤ 0.8 ms"), never as interpolated values.

/// Name of the webhook's admission latency histogram.
pub const ADMISSION_HISTOGRAM: &str = "multus_eni_webhook_admission_duration_seconds";

/// Cumulative bucket counts of one histogram, by upper bound in seconds (`+Inf` last).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    pub bounds: Vec<(f64, u64)>,
    /// `_sum` in seconds.
    pub sum: f64,
}

impl Buckets {
    /// Reads the histogram `name` from a Prometheus/OpenMetrics text exposition.
    pub fn parse(text: &str, name: &str) -> Buckets {
        let bucket = format!("{name}_bucket{{");
        let sum = format!("{name}_sum");
        let mut out = Buckets::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let Some((labels, value)) = rest.split_once('}') else {
                    continue;
                };
                let le = labels
                    .split(',')
                    .find_map(|l| l.trim().strip_prefix("le="))
                    .map(|v| v.trim_matches('"'));
                let bound = match le {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => match v.parse::<f64>() {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                let count = value
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0) as u64;
                out.bounds.push((bound, count));
            } else if let Some(rest) = line.strip_prefix(&sum) {
                out.sum = rest
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
            }
        }
        out.bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }

    /// The observations made between `earlier` and `self`.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        let bounds = self
            .bounds
            .iter()
            .map(|(bound, count)| {
                let before = earlier
                    .bounds
                    .iter()
                    .find(|(b, _)| b == bound)
                    .map_or(0, |(_, c)| *c);
                (*bound, count.saturating_sub(before))
            })
            .collect();
        Buckets {
            bounds,
            sum: self.sum - earlier.sum,
        }
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.bounds.last().map_or(0, |(_, c)| *c)
    }

    /// Mean in seconds.
    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum / n as f64)
    }

    /// Upper bound (seconds) of the bucket holding quantile `q`.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        self.bounds
            .iter()
            .find(|(_, c)| *c >= rank)
            .map(|(bound, _)| *bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE multus_eni_webhook_admission_duration_seconds histogram
multus_eni_webhook_admission_duration_seconds_sum 0.5
multus_eni_webhook_admission_duration_seconds_count 100
multus_eni_webhook_admission_duration_seconds_bucket{le="5e-5"} 10
multus_eni_webhook_admission_duration_seconds_bucket{le="0.0001"} 90
multus_eni_webhook_admission_duration_seconds_bucket{le="0.0002"} 99
multus_eni_webhook_admission_duration_seconds_bucket{le="+Inf"} 100
"#;

    #[test]
    fn quantiles_are_bucket_bounds() {
        let b = Buckets::parse(TEXT, ADMISSION_HISTOGRAM);
        assert_eq!(b.count(), 100);
        assert_eq!(b.quantile_bound(0.5), Some(0.0001));
        assert_eq!(b.quantile_bound(0.99), Some(0.0002));
        assert_eq!(b.quantile_bound(1.0), Some(f64::INFINITY));
        assert_eq!(b.mean(), Some(0.005));
    }

    #[test]
    fn differences_between_scrapes() {
        let later = Buckets::parse(TEXT, ADMISSION_HISTOGRAM);
        let earlier = Buckets::parse(
            &TEXT
                .replace("} 90", "} 50")
                .replace("} 99", "} 59")
                .replace("} 100", "} 60"),
            ADMISSION_HISTOGRAM,
        );
        let d = later.since(&earlier);
        assert_eq!(d.count(), 40);
        assert_eq!(d.quantile_bound(0.5), Some(0.0001));
        assert_eq!(Buckets::default().quantile_bound(0.5), None);
    }
}
