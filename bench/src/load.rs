//! Steady client load: a fixed request rate, each request a new session (no
//! cookies), every request recorded with when it was sent, how long it took
//! and which cell answered.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::task::{JoinHandle, JoinSet};

/// Hard bounds on any one load run, whatever the scenario asks for.
const MAX_RUN: Duration = Duration::from_secs(120);
const MAX_REQUESTS: u64 = 1_000_000;
const MAX_IN_FLIGHT: usize = 10_000;

#[derive(Debug, Clone)]
pub enum Outcome {
    /// 200, with the cell from `x-cellgate-cell`.
    Ok(String),
    Status(u16),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request was sent, from the run's start.
    pub start: Duration,
    pub latency: Duration,
    pub outcome: Outcome,
}

impl Sample {
    pub fn cell(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Ok(c) => Some(c),
            _ => None,
        }
    }
    /// What went wrong, for a failed request.
    pub fn failure(&self) -> Option<String> {
        match &self.outcome {
            Outcome::Ok(_) => None,
            Outcome::Status(s) => Some(format!("status {s}")),
            Outcome::Error(e) => Some(e.clone()),
        }
    }
    pub fn failed(&self) -> bool {
        !matches!(self.outcome, Outcome::Ok(_))
    }
}

/// Open-loop load: requests leave on a fixed schedule whether or not earlier
/// ones have been answered, as real clients do, so a hung cell cannot slow
/// the load down and hide its own effect.
#[derive(Debug)]
pub struct Load {
    pub t0: Instant,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Sample>>,
}

async fn one(client: reqwest::Client, url: String, host: String, t0: Instant) -> Sample {
    let sent = Instant::now();
    let outcome = match client.get(&url).header("host", &host).send().await {
        Ok(r) if r.status() == 200 => {
            let cell = r
                .headers()
                .get("x-cellgate-cell")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            match r.bytes().await {
                Ok(_) => Outcome::Ok(cell),
                Err(e) => Outcome::Error(format!("body: {e}")),
            }
        }
        Ok(r) => Outcome::Status(r.status().as_u16()),
        Err(e) => Outcome::Error(e.to_string()),
    };
    Sample {
        start: sent - t0,
        latency: sent.elapsed(),
        outcome,
    }
}

/// How the load's requests reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// A pool of kept-alive connections (reqwest's), as browsers do.
    KeepAlive,
    /// A new TCP connection for every request.
    New,
}

impl Load {
    /// Starts `rate` GETs per second against `url` with this Host; no
    /// cookies, so every request is a new session.
    pub fn start(url: &str, host: &str, rate: u32) -> anyhow::Result<Load> {
        Self::start_with(url, host, rate, Connections::KeepAlive)
    }

    /// [`Load::start`], on kept-alive connections or a new one per request.
    pub fn start_with(url: &str, host: &str, rate: u32, connections: Connections) -> anyhow::Result<Load> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if connections == Connections::New {
            builder = builder.pool_max_idle_per_host(0);
        }
        let client = builder.build()?;
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let (flag, url, host) = (stop.clone(), url.to_owned(), host.to_owned());
        let task = tokio::spawn(async move {
            let mut in_flight = JoinSet::new();
            let mut samples = Vec::new();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && t0.elapsed() < MAX_RUN && n < MAX_REQUESTS {
                tokio::time::sleep_until((t0 + interval.mul_f64(n as f64)).into()).await;
                n += 1;
                while let Some(r) = in_flight.try_join_next() {
                    samples.extend(r.ok());
                }
                if in_flight.len() >= MAX_IN_FLIGHT {
                    samples.push(Sample {
                        start: t0.elapsed(),
                        latency: Duration::ZERO,
                        outcome: Outcome::Error(format!("not sent: {MAX_IN_FLIGHT} requests already in flight")),
                    });
                    continue;
                }
                in_flight.spawn(one(client.clone(), url.clone(), host.clone(), t0));
            }
            while let Some(r) = in_flight.join_next().await {
                samples.extend(r.ok());
            }
            samples
        });
        Ok(Load { t0, stop, task })
    }

    /// Time since the load started.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = self.task.await.unwrap_or_default();
        all.sort_by_key(|s| s.start);
        all
    }
}

/// The `q`-quantile (0..=1) of these latencies, in milliseconds.
pub fn quantile_ms(samples: &[&Sample], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    v.sort();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i].as_secs_f64() * 1000.0
}
