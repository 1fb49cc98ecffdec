//! The `run` loop: keep the identity fresh, stop cleanly when refused.
//!
//! - Rotates at ⅔ of the certificate's lifetime plus a random jitter of up to
//!   [`RunPolicy::jitter`] of the remaining third, so a fleet enrolled at once
//!   does not rotate at once.
//! - Keeps using the current certificate until the new one is stored.
//! - On a transient failure, retries with exponential backoff
//!   ([`Backoff`], capped) — never in a hot loop.
//! - On a terminal refusal (revoked, superseded, identity mismatch) it returns
//!   [`RunExit::Refused`] so the binary can exit non-zero with a clear message.
//! - Optionally calls a heartbeat path through the gateway at an interval, so
//!   a revocation is noticed long before the next rotation.

use std::future::Future;
use std::time::Duration;

use http::Method;
use time::OffsetDateTime;

use crate::client::Endpoint;
use crate::enroll::IssuedCertificate;
use crate::state::StateDir;
use crate::{AgentError, ApiProblem};

/// How the run loop behaves.
#[derive(Debug, Clone)]
pub struct RunPolicy {
    /// Fraction (0..=1) of the last third of the lifetime over which the
    /// rotation moment is spread. Default 0.1.
    pub jitter: f64,
    /// First retry delay after a failed rotation. Default 1 s.
    pub backoff_initial: Duration,
    /// Longest retry delay. Default 5 minutes.
    pub backoff_max: Duration,
    /// Stop after this many successful rotations (tests, demos). Default none.
    pub max_rotations: Option<u32>,
    /// A path to call through the gateway every `heartbeat_interval`.
    pub heartbeat_path: Option<String>,
    /// Interval between heartbeats. Default 60 s.
    pub heartbeat_interval: Duration,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            jitter: 0.1,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            max_rotations: None,
            heartbeat_path: None,
            heartbeat_interval: Duration::from_secs(60),
        }
    }
}

/// Why the run loop ended without an error.
#[derive(Debug)]
pub enum RunExit {
    /// The shutdown future completed.
    Stopped,
    /// `max_rotations` rotations were done.
    RotationsDone(u32),
    /// The servers refused the identity for good (revoked, superseded).
    Refused(ApiProblem),
}

/// Exponential backoff: initial, doubling, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles per failure, never exceeds `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// When to rotate `issued`: `rotate_after` plus `sample` (in `[0, 1)`) times
/// `jitter` times the time left from `rotate_after` to `not_after`.
pub fn rotation_time(issued: &IssuedCertificate, jitter: f64, sample: f64) -> OffsetDateTime {
    let window = (issued.not_after - issued.rotate_after).max(time::Duration::ZERO);
    let spread = jitter.clamp(0.0, 1.0) * sample.clamp(0.0, 1.0);
    issued.rotate_after + window * spread
}

fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    // SystemRandom failing means the OS has no entropy source; no jitter then.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0.0;
    }
    f64::from(u32::from_be_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

fn until(at: OffsetDateTime) -> Duration {
    let d = at - OffsetDateTime::now_utc();
    d.try_into().unwrap_or(Duration::ZERO)
}

/// Runs until `shutdown` completes, the identity is refused for good, or
/// `policy.max_rotations` is reached.
pub async fn run(
    state: &StateDir,
    policy: &RunPolicy,
    shutdown: impl Future<Output = ()>,
) -> Result<RunExit, AgentError> {
    tokio::pin!(shutdown);
    let config = state.config()?;
    let roots = state.server_roots()?;
    let mut backoff = Backoff::new(policy.backoff_initial, policy.backoff_max);
    let mut rotations = 0u32;

    loop {
        let id = state.load()?;
        let gateway = Endpoint::new(&config.gateway_url, id.mtls_config(roots.clone())?)?;
        let at = rotation_time(&id.issued, policy.jitter, random_unit());
        tracing::info!(
            agent_id = %id.issued.agent_id,
            serial = %id.issued.serial,
            not_after = %id.issued.not_after,
            rotate_at = %at,
            "identity loaded; waiting to rotate"
        );

        // Wait for the rotation moment, heartbeating meanwhile.
        loop {
            let wait = until(at);
            if wait.is_zero() {
                break;
            }
            let nap = match &policy.heartbeat_path {
                Some(_) => wait.min(policy.heartbeat_interval),
                None => wait,
            };
            tokio::select! {
                () = &mut shutdown => return Ok(RunExit::Stopped),
                () = tokio::time::sleep(nap) => {}
            }
            if let Some(path) = &policy.heartbeat_path {
                match gateway.request(Method::GET, path, &[], None).await {
                    Ok(resp) => match resp.problem() {
                        Some(p) if p.is_terminal() => {
                            tracing::error!(code = %p.code, "heartbeat refused: identity is no longer accepted");
                            return Ok(RunExit::Refused(p));
                        }
                        Some(p) => {
                            tracing::warn!(status = p.status, code = %p.code, "heartbeat failed")
                        }
                        None => tracing::debug!(status = %resp.status, "heartbeat"),
                    },
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        }

        // Rotate, retrying transient failures with backoff.
        loop {
            match crate::rotate::rotate(&gateway, id.issued.agent_id).await {
                Ok(new) => {
                    state.store(&new)?;
                    backoff.reset();
                    rotations += 1;
                    tracing::info!(
                        previous_serial = %id.issued.serial,
                        serial = %new.issued.serial,
                        not_after = %new.issued.not_after,
                        "certificate rotated"
                    );
                    let stored = state.load()?;
                    let with_new = gateway.with_tls(stored.mtls_config(roots.clone())?);
                    if let Some(p) =
                        confirm_with_retries(&with_new, &stored.issued, policy, &mut shutdown).await
                    {
                        return Ok(RunExit::Refused(p));
                    }
                    break;
                }
                Err(AgentError::Api(p)) if p.is_terminal() => {
                    tracing::error!(code = %p.code, "rotation refused: identity is no longer accepted");
                    return Ok(RunExit::Refused(p));
                }
                Err(e) => {
                    if OffsetDateTime::now_utc() >= id.issued.not_after {
                        tracing::error!(
                            "certificate expired before it could be rotated; re-enroll"
                        );
                        return Err(e);
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "rotation failed; will retry");
                    tokio::select! {
                        () = &mut shutdown => return Ok(RunExit::Stopped),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if policy.max_rotations.is_some_and(|max| rotations >= max) {
            return Ok(RunExit::RotationsDone(rotations));
        }
    }
}

/// How many times a confirmation is tried before the agent leaves the rest
/// to the server's grace period.
const CONFIRM_ATTEMPTS: u32 = 8;

/// Confirms the newly stored certificate, retrying transient failures (the
/// gateway answers 503 until the new certificate reaches its revocation
/// state, typically milliseconds). Returns a terminal refusal, if any; a
/// confirmation that keeps failing is logged and left to the grace period.
async fn confirm_with_retries(
    gateway: &Endpoint,
    issued: &IssuedCertificate,
    policy: &RunPolicy,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<crate::ApiProblem> {
    let mut backoff = Backoff::new(
        policy.backoff_initial.min(Duration::from_millis(200)),
        policy.backoff_max,
    );
    for attempt in 1..=CONFIRM_ATTEMPTS {
        match crate::rotate::confirm(gateway, issued.agent_id).await {
            Ok(c) => {
                tracing::info!(
                    serial = %c.serial,
                    superseded = ?c.superseded_serial.map(|s| s.to_string()),
                    "new certificate confirmed"
                );
                return None;
            }
            Err(AgentError::Api(p)) if p.is_terminal() => {
                tracing::error!(code = %p.code, "confirmation refused: identity is no longer accepted");
                return Some(p);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, attempt, retry_in = ?delay, "confirmation failed");
                tokio::select! {
                    () = shutdown.as_mut() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    tracing::warn!(
        "could not confirm the new certificate; the previous one stays accepted until the \
         server's rotation grace period ends"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(nb: i64, na: i64) -> IssuedCertificate {
        let t = |s| OffsetDateTime::from_unix_timestamp(s).unwrap();
        IssuedCertificate {
            agent_id: "0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b".parse().unwrap(),
            tenant_id: "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10".parse().unwrap(),
            spiffe_id: String::new(),
            serial: "01".parse().unwrap(),
            certificate_pem: String::new(),
            chain_pem: String::new(),
            trust_bundle_pem: String::new(),
            not_before: t(nb),
            not_after: t(na),
            rotate_after: t(oneprotect_identity::profile::rotate_after(nb, na)),
        }
    }

    #[test]
    fn rotation_time_is_two_thirds_plus_bounded_jitter() {
        let i = issued(0, 3000);
        assert_eq!(rotation_time(&i, 0.1, 0.0).unix_timestamp(), 2000);
        assert_eq!(rotation_time(&i, 0.1, 0.5).unix_timestamp(), 2050);
        assert_eq!(rotation_time(&i, 1.0, 1.0).unix_timestamp(), 3000);
        // Out-of-range inputs are clamped, never past NotAfter.
        assert_eq!(rotation_time(&i, 5.0, 7.0).unix_timestamp(), 3000);
    }

    #[test]
    fn backoff_doubles_and_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let got: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
