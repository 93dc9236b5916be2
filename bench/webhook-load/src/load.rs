//! Driving the webhook: a fixed admission rate (open loop, from a schedule) or saturation
//! (closed loop on N connections), for a bounded time, counting every answer.

use crate::bodies::{Body, Class, Mix};
use crate::client::{Answer, Connection, Connector};
use crate::prom::{ADMISSION_HISTOGRAM, Buckets};
use crate::server::{Memory, Webhook, memory_of};
use crate::{Error, Result};
use hdrhistogram::Histogram;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Admissions per second, from a fixed schedule shared by all connections.
    Rate(f64),
    /// Every connection sends its next request as soon as the previous answer is read.
    Saturate,
}

/// One bounded run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub label: String,
    pub pace: Pace,
    pub connections: usize,
    pub duration: Duration,
    /// Seed of the body choice, so runs are repeatable.
    pub seed: u64,
}

/// Answers of one class of body.
#[derive(Debug, Clone, Default)]
pub struct ClassTally {
    pub sent: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// Status other than the expected one, or a wrong uid/patch in a 200.
    pub unexpected: u64,
    /// Connection failed or closed without an answer.
    pub no_answer: u64,
}

/// Everything counted in one run.
#[derive(Debug, Clone)]
pub struct Tally {
    pub sent: u64,
    pub by_class: BTreeMap<Class, ClassTally>,
    /// Answers with status ≥ 500.
    pub server_errors: u64,
    /// Answers whose status, uid or patch differ from the library's answer.
    pub unexpected: u64,
    /// Requests on keep-alive connections that got no answer (connection failed).
    pub transport_errors: u64,
    /// Over-limit bodies the server refused by closing the connection instead of a 413.
    pub huge_closed: u64,
    /// The first transport error, to show what went wrong.
    pub first_error: Option<String>,
    /// Client-observed latency in µs, request written to answer read, for answered requests
    /// (the 1.5 MiB and over-limit bodies left out).
    pub latency: Histogram<u64>,
    /// Largest delay between a request's scheduled time and its send (fixed rate only), µs.
    pub max_lag_us: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            sent: 0,
            by_class: BTreeMap::new(),
            server_errors: 0,
            unexpected: 0,
            transport_errors: 0,
            huge_closed: 0,
            first_error: None,
            latency: new_histogram(),
            max_lag_us: 0,
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits; the bounds are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
    })
}

impl Tally {
    fn record(&mut self, body: &Body, result: Result<Answer>, took: Duration) {
        self.sent += 1;
        let class = self.by_class.entry(body.class).or_default();
        class.sent += 1;
        match result {
            Ok(answer) => {
                *class.by_status.entry(answer.status).or_default() += 1;
                if answer.status >= 500 {
                    self.server_errors += 1;
                }
                if !answer_matches(body, &answer) {
                    class.unexpected += 1;
                    self.unexpected += 1;
                }
                if !matches!(body.class, Class::Large | Class::Huge) {
                    self.latency
                        .saturating_record(took.as_micros().max(1) as u64);
                }
            }
            Err(err) => {
                class.no_answer += 1;
                if body.class == Class::Huge {
                    self.huge_closed += 1;
                } else {
                    self.transport_errors += 1;
                    self.first_error.get_or_insert_with(|| err.to_string());
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        for (class, t) in other.by_class {
            let mine = self.by_class.entry(class).or_default();
            mine.sent += t.sent;
            mine.unexpected += t.unexpected;
            mine.no_answer += t.no_answer;
            for (status, n) in t.by_status {
                *mine.by_status.entry(status).or_default() += n;
            }
        }
        self.server_errors += other.server_errors;
        self.unexpected += other.unexpected;
        self.transport_errors += other.transport_errors;
        self.huge_closed += other.huge_closed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        let _ = self.latency.add(&other.latency);
        self.max_lag_us = self.max_lag_us.max(other.max_lag_us);
    }
}

/// The server's answer is the one the library computes: status, echoed uid, patch or not.
fn answer_matches(body: &Body, answer: &Answer) -> bool {
    if answer.status != body.expected.status {
        return false;
    }
    if answer.status != 200 {
        return true;
    }
    let Ok(review) = serde_json::from_slice::<Value>(&answer.body) else {
        return false;
    };
    let response = &review["response"];
    review["kind"] == "AdmissionReview"
        && response["allowed"] == true
        && response["uid"].as_str() == body.expected.uid.as_deref()
        && response.get("patch").is_some_and(Value::is_string) == body.expected.patched
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub plan: Plan,
    pub elapsed: Duration,
    pub tally: Tally,
    /// The server's own latency histogram over the run (difference of two scrapes).
    pub server: Buckets,
    /// `(time since start, memory)` every sampling interval, last one after the run.
    pub memory: Vec<(Duration, Memory)>,
    /// The process had not exited at the end.
    pub alive: bool,
    /// `/healthz` answered 200 at the end.
    pub healthy: bool,
}

impl Report {
    /// Answered admissions per second.
    pub fn rate(&self) -> f64 {
        self.tally.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Resident memory at a fraction of the run (the sample nearest to it).
    pub fn rss_at(&self, fraction: f64) -> Option<u64> {
        let at = self.elapsed.mul_f64(fraction);
        self.memory
            .iter()
            .min_by_key(|(t, _)| t.abs_diff(at))
            .map(|(_, m)| m.rss_kib)
    }

    /// Peak resident memory of the process so far (`VmHWM`).
    pub fn peak_kib(&self) -> u64 {
        self.memory
            .iter()
            .map(|(_, m)| m.hwm_kib)
            .max()
            .unwrap_or(0)
    }
}

/// Runs `plan` against the webhook with bodies from `mix`.
pub async fn run(
    webhook: &mut Webhook,
    connector: &Connector,
    mix: Arc<Mix>,
    plan: &Plan,
    memory_every: Duration,
) -> Result<Report> {
    let before = Buckets::parse(&webhook.scrape().await?, ADMISSION_HISTOGRAM);
    // Open every connection first: handshakes are not part of the measured run.
    let mut connections = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections.max(1) {
        connections.push(connector.connect().await?);
    }

    let start = Instant::now();
    let end = start + plan.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pid = webhook.pid;
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = memory_of(pid) {
                    samples.push((start.elapsed(), m));
                }
                tokio::time::sleep(memory_every).await;
            }
            samples
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (i, connection) in connections.into_iter().enumerate() {
        let worker = Worker {
            connector: connector.clone(),
            mix: mix.clone(),
            pace: plan.pace,
            start,
            end,
            next: next.clone(),
            rng: fastrand::Rng::with_seed(plan.seed.wrapping_add(i as u64 * 7919)),
        };
        workers.push(tokio::spawn(worker.run(connection)));
    }
    let mut tally = Tally::default();
    for w in workers {
        let t = w
            .await
            .map_err(|e| Error::Server(format!("load worker failed: {e}")))?;
        tally.merge(t);
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut memory = sampler.await.unwrap_or_default();
    let alive = webhook.is_alive();
    if let Ok(m) = webhook.memory() {
        memory.push((elapsed, m));
    }
    let healthy = alive && webhook.healthy().await;
    let server = match webhook.scrape().await {
        Ok(text) => Buckets::parse(&text, ADMISSION_HISTOGRAM).since(&before),
        Err(_) => Buckets::default(),
    };
    Ok(Report {
        plan: plan.clone(),
        elapsed,
        tally,
        server,
        memory,
        alive,
        healthy,
    })
}

struct Worker {
    connector: Connector,
    mix: Arc<Mix>,
    pace: Pace,
    start: Instant,
    end: Instant,
    next: Arc<AtomicU64>,
    rng: fastrand::Rng,
}

impl Worker {
    async fn run(mut self, first: Connection) -> Tally {
        let mut tally = Tally::default();
        let mut connection = Some(first);
        loop {
            match self.pace {
                Pace::Rate(rate) => {
                    let slot = self.next.fetch_add(1, Ordering::Relaxed);
                    let at = self.start + Duration::from_secs_f64(slot as f64 / rate);
                    if at >= self.end {
                        break;
                    }
                    tokio::time::sleep_until(at).await;
                    let lag = Instant::now().saturating_duration_since(at);
                    tally.max_lag_us = tally.max_lag_us.max(lag.as_micros() as u64);
                }
                Pace::Saturate => {
                    if Instant::now() >= self.end {
                        break;
                    }
                }
            }
            let body = self.mix.pick(&mut self.rng).clone();
            let sent = Instant::now();
            let result = if body.class == Class::Huge {
                // The server may refuse an over-limit body by closing the connection; keep
                // that off the keep-alive connections.
                match self.connector.connect().await {
                    Ok(mut c) => c.post(body.bytes.clone()).await,
                    Err(e) => Err(e),
                }
            } else {
                let conn = match connection.take() {
                    Some(c) if !c.is_closed() => Ok(c),
                    _ => self.connector.connect().await,
                };
                match conn {
                    Ok(mut c) => {
                        let r = c.post(body.bytes.clone()).await;
                        if r.is_ok() {
                            connection = Some(c);
                        }
                        r
                    }
                    Err(e) => Err(e),
                }
            };
            tally.record(&body, result, sent.elapsed());
        }
        tally
    }
}
