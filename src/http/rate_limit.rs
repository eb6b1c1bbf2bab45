//! Requests per credential (or per client IP when the credential is missing or wrong):
//! `limits.rate_per_second` with bursts of `limits.burst`. Over the limit: 429 with
//! `Retry-After`. Health, readiness, metrics and docs are not limited (they are not behind the
//! authentication middleware that calls this).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use crate::metrics::Metrics;

/// The configured limit. Cheap to clone.
#[derive(Clone)]
pub struct RateLimit {
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    metrics: Arc<Metrics>,
}

impl RateLimit {
    /// A limiter for `rate_per_second` with bursts of `burst` (default: one second's worth, at
    /// least 1); `None` when no rate is configured. Forgets idle keys until `shutdown`.
    pub fn start(
        rate_per_second: Option<f64>,
        burst: Option<u32>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Option<RateLimit> {
        let rate = rate_per_second?;
        let burst = burst.unwrap_or(rate.ceil() as u32).max(1);
        let quota = Quota::with_period(Duration::from_secs_f64(1.0 / rate))?
            .allow_burst(NonZeroU32::new(burst)?);
        let limiter = Arc::new(DefaultKeyedRateLimiter::keyed(quota));
        let housekeeping = Arc::downgrade(&limiter);
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = timer.tick() => {}
                }
                // The keys' memory stays bounded by the clients active in the last while.
                let Some(limiter) = housekeeping.upgrade() else {
                    return;
                };
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        });
        Some(RateLimit { limiter, metrics })
    }

    /// Counts one request for `key`; 429 when it is over the limit.
    pub fn check(&self, key: String) -> Result<(), ApiError> {
        match self.limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.metrics.rate_limited.inc();
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ApiError::TooManyRequests {
                    detail: "too many requests; slow down".into(),
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                })
            }
        }
    }
}
