//! Two-phase certificate rotation (ADR-0010): the decisions, as pure
//! functions over the agent's state, which the store (`sql.rs`) applies on
//! either backend.
//!
//! An agent has a newest certificate (`current`) and, during a rotation's
//! second phase, the one it rotated away from (`previous`), still accepted
//! until the newest is first seen or the grace period ends. Every other
//! certificate of the agent is superseded or revoked. So at most two of an
//! agent's certificates are active at any time.

use time::OffsetDateTime;

use oneprotect_identity::events::{Actor, Event, Payload, SupersedeReason};
use oneprotect_identity::{AgentId, AgentStatus, CertStatus, SerialNumber, TenantId};

use super::NewCertificate;

/// What the store reads, under the agent's row lock (PostgreSQL
/// `FOR UPDATE`; on SQLite the write lock of `BEGIN IMMEDIATE`), to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationState {
    /// The agent's status.
    pub status: AgentStatus,
    /// Its newest certificate.
    pub current: SerialNumber,
    /// The certificate being rotated away from, if a rotation is pending.
    pub previous: Option<SerialNumber>,
    /// When `previous` stops being accepted at the latest.
    pub previous_valid_until: Option<OffsetDateTime>,
    /// The presented certificate's status, if it is one of this agent's.
    pub presented: Option<CertStatus>,
}

/// Why an agent-authenticated rotation or confirmation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationRefusal {
    /// No such agent in the tenant.
    UnknownAgent,
    /// The agent is revoked.
    AgentRevoked,
    /// The presented certificate is not one of this agent's.
    NotThisAgents,
    /// The presented certificate is revoked.
    CertificateRevoked,
    /// The presented certificate is superseded (possible key theft); the
    /// agent's newest certificate is `current`.
    CertificateSuperseded {
        /// The agent's newest certificate.
        current: SerialNumber,
    },
    /// A confirmation made with the previous certificate instead of the new.
    PreviousPresented,
}

/// One certificate to mark superseded, with its `agent.certificate.superseded` facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supersede {
    /// The certificate that stops being accepted.
    pub serial: SerialNumber,
    /// The one that took its place.
    pub by: SerialNumber,
    /// Why now.
    pub reason: SupersedeReason,
}

/// What a rotation does to the agent's certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPlan {
    /// Certificates to supersede first.
    pub supersede: Vec<Supersede>,
    /// The agent's `previous` afterwards (the new certificate is `current`).
    pub previous: SerialNumber,
}

/// The refusals that depend only on the agent's and the presented
/// certificate's status: revoked agent, foreign, revoked or superseded
/// certificate. Also the handler's pre-check before any signing.
pub fn check_presented(st: &RotationState) -> Result<(), RotationRefusal> {
    if st.status == AgentStatus::Revoked {
        return Err(RotationRefusal::AgentRevoked);
    }
    match st.presented {
        None => Err(RotationRefusal::NotThisAgents),
        Some(CertStatus::Revoked) => Err(RotationRefusal::CertificateRevoked),
        Some(CertStatus::Superseded) => Err(RotationRefusal::CertificateSuperseded {
            current: st.current,
        }),
        Some(CertStatus::Active) => Ok(()),
    }
}

/// Decides a rotation authenticated with `presented` that issues `new`.
///
/// - With the newest certificate: a pending rotation completes first (its
///   previous is superseded, successor seen); the newest becomes previous.
/// - With the previous certificate (the agent never got or stored the
///   newest): the unused newest is replaced; previous stays.
pub fn plan_rotation(
    st: &RotationState,
    presented: SerialNumber,
    new: SerialNumber,
) -> Result<RotationPlan, RotationRefusal> {
    check_presented(st)?;
    if presented == st.current {
        let supersede = st
            .previous
            .map(|p| Supersede {
                serial: p,
                by: st.current,
                reason: SupersedeReason::SuccessorSeen,
            })
            .into_iter()
            .collect();
        Ok(RotationPlan {
            supersede,
            previous: presented,
        })
    } else if Some(presented) == st.previous {
        Ok(RotationPlan {
            supersede: vec![Supersede {
                serial: st.current,
                by: new,
                reason: SupersedeReason::ReplacedUnused,
            }],
            previous: presented,
        })
    } else {
        // An active certificate that is neither current nor previous breaks
        // the invariant; refuse as superseded (fail closed).
        Err(RotationRefusal::CertificateSuperseded {
            current: st.current,
        })
    }
}

/// Decides a confirmation authenticated with `presented`: `Some` when it
/// completes a pending rotation, `None` when nothing is pending.
pub fn plan_confirmation(
    st: &RotationState,
    presented: SerialNumber,
) -> Result<Option<Supersede>, RotationRefusal> {
    check_presented(st)?;
    if presented == st.current {
        Ok(st.previous.map(|p| Supersede {
            serial: p,
            by: st.current,
            reason: SupersedeReason::SuccessorSeen,
        }))
    } else if Some(presented) == st.previous {
        Err(RotationRefusal::PreviousPresented)
    } else {
        Err(RotationRefusal::CertificateSuperseded {
            current: st.current,
        })
    }
}

/// Decides the grace-period sweep for one agent at `now`: `Some` when its
/// previous certificate's grace has ended.
pub fn plan_expiry(st: &RotationState, now: OffsetDateTime) -> Option<Supersede> {
    if st.status != AgentStatus::Active {
        return None;
    }
    match (st.previous, st.previous_valid_until) {
        (Some(p), Some(until)) if until <= now => Some(Supersede {
            serial: p,
            by: st.current,
            reason: SupersedeReason::GraceExpired,
        }),
        _ => None,
    }
}

/// A rotation to apply: the new leaf is signed before the transaction, which
/// re-reads the state under the agent's row lock and decides again.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The tenant (from the verified assertion).
    pub tenant: TenantId,
    /// The agent (from the verified assertion, equal to the path's).
    pub agent: AgentId,
    /// The certificate that authenticated the call.
    pub presented: SerialNumber,
    /// The new certificate.
    pub certificate: NewCertificate,
    /// When the certificate rotated away from stops being accepted at the
    /// latest (now + grace, capped at its NotAfter by the caller).
    pub previous_valid_until: OffsetDateTime,
    /// The time of the call.
    pub now: OffsetDateTime,
}

/// The result of [`super::Store::rotate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// Written: the plan that was applied.
    Rotated(RotationPlan),
    /// Nothing was written.
    Refused(RotationRefusal),
}

/// The result of [`super::Store::confirm_certificate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmOutcome {
    /// Confirmed; `Some` when a pending rotation completed.
    Confirmed(Option<Supersede>),
    /// Nothing was written.
    Refused(RotationRefusal),
}

/// The `agent.certificate.superseded` event for `s`.
pub fn superseded_event(
    tenant: TenantId,
    agent: AgentId,
    s: &Supersede,
    actor: Actor,
    now: OffsetDateTime,
) -> Event {
    Event::new(
        tenant,
        actor,
        now,
        Payload::CertificateSuperseded {
            agent_id: agent,
            serial: s.serial,
            superseded_by: s.by,
            reason: s.reason,
        },
    )
}

/// The `agent.certificate.rotated` event for `r`.
pub fn rotated_event(r: &Rotation) -> Event {
    Event::new(
        r.tenant,
        Actor::Agent(r.agent),
        r.now,
        Payload::CertificateRotated {
            agent_id: r.agent,
            previous_serial: r.presented,
            serial: r.certificate.serial,
            not_after: r.certificate.not_after,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(n: u8) -> SerialNumber {
        format!("{n:032x}").parse().unwrap()
    }

    fn state(previous: Option<u8>, presented: Option<CertStatus>) -> RotationState {
        RotationState {
            status: AgentStatus::Active,
            current: serial(2),
            previous: previous.map(serial),
            previous_valid_until: previous.map(|_| OffsetDateTime::UNIX_EPOCH),
            presented,
        }
    }

    #[test]
    fn rotating_with_the_newest_makes_it_previous() {
        let st = state(None, Some(CertStatus::Active));
        let plan = plan_rotation(&st, serial(2), serial(3)).unwrap();
        assert_eq!(plan.previous, serial(2));
        assert!(plan.supersede.is_empty());
    }

    #[test]
    fn rotating_with_the_newest_completes_a_pending_rotation_first() {
        let st = state(Some(1), Some(CertStatus::Active));
        let plan = plan_rotation(&st, serial(2), serial(3)).unwrap();
        assert_eq!(plan.previous, serial(2));
        assert_eq!(
            plan.supersede,
            vec![Supersede {
                serial: serial(1),
                by: serial(2),
                reason: SupersedeReason::SuccessorSeen
            }]
        );
    }

    #[test]
    fn retrying_with_the_previous_replaces_the_unused_newest() {
        let st = state(Some(1), Some(CertStatus::Active));
        let plan = plan_rotation(&st, serial(1), serial(3)).unwrap();
        assert_eq!(plan.previous, serial(1));
        assert_eq!(
            plan.supersede,
            vec![Supersede {
                serial: serial(2),
                by: serial(3),
                reason: SupersedeReason::ReplacedUnused
            }]
        );
    }

    #[test]
    fn refusals_come_in_order_revoked_agent_foreign_revoked_superseded() {
        let mut st = state(Some(1), Some(CertStatus::Superseded));
        assert_eq!(
            plan_rotation(&st, serial(9), serial(3)),
            Err(RotationRefusal::CertificateSuperseded { current: serial(2) })
        );
        assert_eq!(
            plan_confirmation(&st, serial(9)),
            Err(RotationRefusal::CertificateSuperseded { current: serial(2) })
        );
        st.presented = Some(CertStatus::Revoked);
        assert_eq!(
            plan_rotation(&st, serial(9), serial(3)),
            Err(RotationRefusal::CertificateRevoked)
        );
        st.presented = None;
        assert_eq!(
            plan_rotation(&st, serial(9), serial(3)),
            Err(RotationRefusal::NotThisAgents)
        );
        st.status = AgentStatus::Revoked;
        assert_eq!(
            plan_rotation(&st, serial(2), serial(3)),
            Err(RotationRefusal::AgentRevoked)
        );
        assert_eq!(
            plan_confirmation(&st, serial(2)),
            Err(RotationRefusal::AgentRevoked)
        );
    }

    #[test]
    fn an_active_certificate_outside_the_lineage_is_refused() {
        let st = state(Some(1), Some(CertStatus::Active));
        assert!(matches!(
            plan_rotation(&st, serial(7), serial(3)),
            Err(RotationRefusal::CertificateSuperseded { .. })
        ));
    }

    #[test]
    fn confirming_with_the_newest_supersedes_the_previous_once() {
        let st = state(Some(1), Some(CertStatus::Active));
        assert_eq!(
            plan_confirmation(&st, serial(2)),
            Ok(Some(Supersede {
                serial: serial(1),
                by: serial(2),
                reason: SupersedeReason::SuccessorSeen
            }))
        );
        let done = state(None, Some(CertStatus::Active));
        assert_eq!(plan_confirmation(&done, serial(2)), Ok(None));
        assert_eq!(
            plan_confirmation(&st, serial(1)),
            Err(RotationRefusal::PreviousPresented)
        );
    }

    #[test]
    fn the_sweep_supersedes_only_after_the_grace_of_an_active_agent() {
        let mut st = state(Some(1), None);
        let until = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(100);
        st.previous_valid_until = Some(until);
        assert_eq!(plan_expiry(&st, until - time::Duration::seconds(1)), None);
        assert_eq!(
            plan_expiry(&st, until),
            Some(Supersede {
                serial: serial(1),
                by: serial(2),
                reason: SupersedeReason::GraceExpired
            })
        );
        st.status = AgentStatus::Revoked;
        assert_eq!(plan_expiry(&st, until), None);
        assert_eq!(plan_expiry(&state(None, None), until), None);
    }
}
