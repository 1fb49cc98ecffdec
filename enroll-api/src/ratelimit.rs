//! A small in-process token-bucket rate limiter, keyed by text.
//!
//! Used on the exchange per source address and per token id. It protects the
//! service and slows guessing; it is never an identity decision. State is per
//! replica (documented in the config), and the key table is bounded: when it
//! is full, full (idle) buckets are dropped first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A rate limiter: `per_minute` sustained, `burst` at once, per key.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` requests per minute per key, with
    /// bursts of `burst`, tracking at most `max_keys` keys.
    pub fn new(per_minute: u32, burst: u32, max_keys: usize) -> Self {
        Self {
            per_sec: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request for `key` at `now`; on refusal, how long until one
    /// is available.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(key) && map.len() >= self.max_keys {
            let (per_sec, burst) = (self.per_sec, self.burst);
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * per_sec < burst
            });
            if map.len() >= self.max_keys {
                // Still full of active keys: refuse new keys rather than grow.
                return Err(Duration::from_secs(1));
            }
        }
        let b = map.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else if self.per_sec > 0.0 {
            Err(Duration::from_secs_f64(
                ((1.0 - b.tokens) / self.per_sec).ceil().max(1.0),
            ))
        } else {
            Err(Duration::from_secs(60))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(60, 2, 100);
        let t0 = Instant::now();
        assert!(l.check("a", t0).is_ok());
        assert!(l.check("a", t0).is_ok());
        let wait = l.check("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(l.check("b", t0).is_ok(), "keys are independent");
        assert!(l.check("a", t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn key_table_is_bounded() {
        let l = RateLimiter::new(60, 1, 2);
        let t0 = Instant::now();
        assert!(l.check("a", t0).is_ok());
        assert!(l.check("b", t0).is_ok());
        assert!(l.check("c", t0).is_err());
        // Once a and b have refilled they are evicted to make room.
        assert!(l.check("c", t0 + Duration::from_secs(5)).is_ok());
    }
}
