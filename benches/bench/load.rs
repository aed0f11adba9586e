//! The manifest GET load: N keep-alive connections, each sending one request
//! after another for a fixed time; requests are counted by completion time
//! inside the measured window (after a warm-up), with their latencies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use crate::client::{self, Conn, SMALL_TIMEOUT};

/// Most requests one connection sends in one window: a bound on the loop
/// even if the clock misbehaves.
const MAX_PER_CONN: u64 = 5_000_000;

/// What a load window saw.
#[derive(Default)]
pub struct LoadStats {
    /// Requests answered 200 inside the window.
    pub ok: u64,
    /// Requests answered otherwise, or failed.
    pub errors: u64,
    /// The measured window, seconds (summed over windows when merged).
    pub secs: f64,
    /// Latency of each counted request, microseconds.
    pub lat_us: Vec<u32>,
}

impl LoadStats {
    /// Adds another window of the same target.
    pub fn merge(&mut self, other: LoadStats) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.secs += other.secs;
        self.lat_us.extend(other.lat_us);
    }

    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }

    /// A latency percentile, milliseconds.
    pub fn pct_ms(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us[i] as f64 / 1000.0
    }
}

/// `conns` connections GET `path` for `warm` + `measure`.
pub async fn get_load(
    addr: SocketAddr,
    path: &str,
    accept: &'static str,
    conns: usize,
    warm: Duration,
    measure: Duration,
) -> anyhow::Result<LoadStats> {
    let barrier = Arc::new(tokio::sync::Barrier::new(conns));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let barrier = barrier.clone();
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            barrier.wait().await;
            let begin = Instant::now();
            let (warm_end, end) = (begin + warm, begin + warm + measure);
            let mut stats = LoadStats::default();
            let conn = match &mut conn {
                Ok(c) => c,
                Err(_) => {
                    stats.errors += 1;
                    return stats;
                }
            };
            for _ in 0..MAX_PER_CONN {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let result = tokio::time::timeout(SMALL_TIMEOUT, async {
                    let resp = conn
                        .send(Method::GET, &path, &[("accept", accept)], client::empty())
                        .await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    Ok::<_, anyhow::Error>(status)
                })
                .await;
                let done = Instant::now();
                let counted = done >= warm_end && done <= end;
                match result {
                    Ok(Ok(StatusCode::OK)) if counted => {
                        stats.ok += 1;
                        stats
                            .lat_us
                            .push((done - t).as_micros().min(u32::MAX as u128) as u32);
                    }
                    Ok(Ok(StatusCode::OK)) => {}
                    Ok(Ok(_)) => stats.errors += 1,
                    // A broken connection ends this connection's share.
                    _ => {
                        stats.errors += 1;
                        break;
                    }
                }
            }
            stats
        }));
    }
    let mut total = LoadStats {
        secs: measure.as_secs_f64(),
        ..LoadStats::default()
    };
    for t in tasks {
        let s = t.await.map_err(|e| anyhow!("load task: {e}"))?;
        total.ok += s.ok;
        total.errors += s.errors;
        total.lat_us.extend(s.lat_us);
    }
    Ok(total)
}
