//! Bounded work (SPEC §9): every fan-out of registry calls goes through
//! [`all`] or [`try_all`], with one concurrency limit, and every
//! wait-and-try-again through [`Backoff`].
//!
//! Why one limit everywhere: a request's cost to the registry (connections,
//! file descriptors, its own goroutines) must not grow with the size of a
//! repository. Sixteen calls in flight keep a rebuild's latency at a few
//! round trips for the repositories people have, while a 2,000-tag
//! repository costs sixteen sockets, not two thousand.

use std::future::Future;
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};

/// Registry calls one fan-out keeps in flight.
pub const FAN_OUT: usize = 16;

/// Runs every future, at most [`FAN_OUT`] at once; results in input order.
pub async fn all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    // Collected first: the caller's iterator adapters (closures over
    // borrowed data) then never become part of this future's type, which
    // keeps it `Send` for the compiler's higher-ranked checks.
    let futures: Vec<F> = futures.into_iter().collect();
    stream::iter(futures).buffered(FAN_OUT).collect().await
}

/// Like [`all`], stopping at the first error (the futures not started yet
/// are never started).
pub async fn try_all<T, E, F>(futures: impl IntoIterator<Item = F>) -> Result<Vec<T>, E>
where
    F: Future<Output = Result<T, E>>,
{
    let futures: Vec<F> = futures.into_iter().collect();
    stream::iter(futures).buffered(FAN_OUT).try_collect().await
}

/// Delays that grow by a factor up to a cap: `first`, `first·factor`, …
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    factor: u32,
    cap: Duration,
}

impl Backoff {
    /// Delays from `first`, multiplied by `factor` each time, at most `cap`.
    pub fn new(first: Duration, factor: u32, cap: Duration) -> Backoff {
        Backoff {
            next: first.min(cap),
            factor,
            cap,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * self.factor).min(self.cap);
        d
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// The registry's quick hiccups (a 5xx while it is still writing what
    /// another request asked about): `attempt` (given its try's number, from
    /// 0), tried again after each delay while `transient` says so of its
    /// error, at most `retries` more times.
    pub async fn retry<T, E, F>(
        mut self,
        retries: usize,
        transient: impl Fn(&E) -> bool,
        mut attempt: impl FnMut(usize) -> F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let mut tried = 0;
        loop {
            match attempt(tried).await {
                Err(e) if tried < retries && transient(&e) => {
                    tried += 1;
                    self.wait().await;
                }
                done => return done,
            }
        }
    }

    /// What the merge waits out inline: three more tries, 20, 100 and
    /// 400 ms apart.
    pub fn hiccup() -> (Backoff, usize) {
        (
            Backoff::new(Duration::from_millis(20), 5, Duration::from_millis(400)),
            3,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn never_more_than_the_limit_in_flight_and_order_kept() {
        let (now, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let jobs = (0..100).map(|i| {
            let (now, peak) = (&now, &peak);
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                i
            }
        });
        let out = all(jobs).await;
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), FAN_OUT);
    }

    #[tokio::test]
    async fn the_first_error_stops_the_rest() {
        let started = AtomicUsize::new(0);
        let jobs = (0..1000).map(|i| {
            let started = &started;
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if i == 3 {
                    Err(i)
                } else {
                    Ok(i)
                }
            }
        });
        assert_eq!(try_all(jobs).await, Err(3));
        assert!(started.load(Ordering::SeqCst) <= 3 + FAN_OUT);
    }

    #[tokio::test]
    async fn retry_tries_again_only_what_is_transient_and_only_so_often() {
        let tries = AtomicUsize::new(0);
        let quick = || Backoff::new(Duration::ZERO, 1, Duration::ZERO);
        let r: Result<(), &str> = quick()
            .retry(
                3,
                |e| *e == "hiccup",
                |_| async {
                    tries.fetch_add(1, Ordering::SeqCst);
                    Err("hiccup")
                },
            )
            .await;
        assert_eq!((r, tries.load(Ordering::SeqCst)), (Err("hiccup"), 4));
        let r: Result<usize, &str> = quick()
            .retry(
                3,
                |e| *e == "hiccup",
                |n| async move {
                    if n == 0 {
                        Err("hiccup")
                    } else {
                        Ok(n)
                    }
                },
            )
            .await;
        assert_eq!(r, Ok(1));
        tries.store(0, Ordering::SeqCst);
        let r: Result<(), &str> = quick()
            .retry(
                3,
                |e| *e == "hiccup",
                |_| async {
                    tries.fetch_add(1, Ordering::SeqCst);
                    Err("refused")
                },
            )
            .await;
        assert_eq!((r, tries.load(Ordering::SeqCst)), (Err("refused"), 1));
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(20), 5, Duration::from_millis(400));
        let got: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [20, 100, 400, 400]);
    }
}
