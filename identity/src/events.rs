//! Lifecycle events: the envelope and one payload type per event.
//!
//! Each event has a JSON Schema in `specs/events/<type>.v1.schema.json` and a
//! message in `specs/asyncapi.yaml`; the contract tests validate what these
//! types serialise to against those schemas. No payload has a field that could
//! carry a token secret or an admin key: secrets are not `Serialize`.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ids::{AgentId, SerialNumber, TenantId, TokenId};
use crate::uri::AgentUri;

/// The schema version every payload here is written in.
pub const VERSION: u32 = 1;

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "snake_case")]
pub enum Actor {
    /// A tenant-admin API key, by its public id.
    AdminKey(Uuid),
    /// An agent acting with its own certificate.
    Agent(AgentId),
    /// An agent enrolling with an enrollment token, by the token's public id.
    EnrollmentToken(TokenId),
    /// The service itself (expiry, rebuilds).
    System,
}

/// Why a certificate was superseded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SupersedeReason {
    /// The agent authenticated with its successor: the rotation completed.
    SuccessorSeen,
    /// The successor was never seen and the rotation grace period ended.
    GraceExpired,
    /// A successor that was never used was replaced by a newer rotation.
    ReplacedUnused,
}

/// An agent-authenticated operation: one of the enroll-api's, or any
/// request a gateway refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentOperation {
    /// `POST /api/v1/agents/{agent_id}/certificate/rotate`.
    Rotate,
    /// `POST /api/v1/agents/{agent_id}/certificate/confirm`.
    Confirm,
    /// A request through a gateway, on any route (the gateway refused it
    /// and reported the use; the route is in the event).
    Request,
}

impl AgentOperation {
    /// The wire name (also the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotate => "rotate",
            Self::Confirm => "confirm",
            Self::Request => "request",
        }
    }
}

/// Why an enrollment attempt failed, as recorded for the tenant's audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentFailure {
    /// The token has expired.
    TokenExpired,
    /// The token has no uses left.
    TokenUsedUp,
    /// The token was revoked.
    TokenRevoked,
    /// The CSR is not a valid PKCS#10 request.
    CsrInvalid,
    /// The CSR's signature does not verify.
    CsrSignatureInvalid,
    /// The key algorithm is not accepted or the key is too weak.
    KeyRejected,
}

/// The payload of each event type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum Payload {
    /// An enrollment token was created.
    #[serde(rename = "agent.enrollment_token.issued")]
    TokenIssued {
        /// The token's public id.
        token_id: TokenId,
        /// When it stops being accepted.
        #[serde(with = "time::serde::rfc3339")]
        expires_at: OffsetDateTime,
        /// How many enrollments it allows.
        max_uses: u32,
        /// Free text from the admin.
        description: Option<String>,
        /// Labels from the admin.
        labels: std::collections::BTreeMap<String, String>,
    },
    /// An enrollment token was revoked before it was used up.
    #[serde(rename = "agent.enrollment_token.revoked")]
    TokenRevoked {
        /// The token's public id.
        token_id: TokenId,
        /// How many times it had been used.
        uses: u32,
    },
    /// An exchange with a known token was refused.
    #[serde(rename = "agent.enrollment.failed")]
    EnrollmentFailed {
        /// The token's public id.
        token_id: TokenId,
        /// Why.
        reason_code: EnrollmentFailure,
    },
    /// An agent enrolled and received its first certificate.
    #[serde(rename = "agent.enrolled")]
    Enrolled {
        /// The new agent.
        agent_id: AgentId,
        /// The token used.
        token_id: TokenId,
        /// The identity URI in the certificate.
        spiffe_id: AgentUri,
        /// The certificate's serial.
        serial: SerialNumber,
        /// The certificate's NotAfter.
        #[serde(with = "time::serde::rfc3339")]
        not_after: OffsetDateTime,
        /// Hostname the agent reported (not verified).
        hostname: String,
        /// Operating system the agent reported (not verified).
        os: String,
        /// Agent software version the agent reported.
        agent_version: String,
    },
    /// An agent rotated its certificate.
    #[serde(rename = "agent.certificate.rotated")]
    CertificateRotated {
        /// The agent.
        agent_id: AgentId,
        /// The certificate used to authenticate the rotation.
        previous_serial: SerialNumber,
        /// The new certificate.
        serial: SerialNumber,
        /// The new certificate's NotAfter.
        #[serde(with = "time::serde::rfc3339")]
        not_after: OffsetDateTime,
    },
    /// A certificate stopped being accepted because a newer one of the same
    /// agent took its place (the second phase of a rotation).
    #[serde(rename = "agent.certificate.superseded")]
    CertificateSuperseded {
        /// The agent.
        agent_id: AgentId,
        /// The certificate that is no longer accepted.
        serial: SerialNumber,
        /// The certificate that took its place.
        superseded_by: SerialNumber,
        /// Why now.
        reason: SupersedeReason,
    },
    /// A superseded certificate was presented to authenticate a request:
    /// its key may be in someone else's hands.
    #[serde(rename = "agent.certificate.reuse_detected")]
    CertificateReuseDetected {
        /// The agent the certificate belongs to.
        agent_id: AgentId,
        /// The superseded certificate that was presented.
        serial: SerialNumber,
        /// The agent's current certificate.
        current_serial: SerialNumber,
        /// What the presenter tried to do.
        operation: AgentOperation,
        /// The gateway route prefix the request was for (operation
        /// `request` only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<String>,
        /// The address the request came from, as the gateway saw it (the
        /// TCP peer, or a trusted balancer's PROXY header), when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_ip: Option<std::net::IpAddr>,
    },
    /// An agent was revoked with all its certificates.
    #[serde(rename = "agent.revoked")]
    Revoked {
        /// The agent.
        agent_id: AgentId,
        /// The admin's reason.
        reason: String,
        /// Every certificate serial that was revoked.
        revoked_serials: Vec<SerialNumber>,
    },
}

impl Payload {
    /// The event type name, e.g. `agent.enrolled`.
    pub fn event_type(&self) -> &'static str {
        match self {
            Payload::TokenIssued { .. } => "agent.enrollment_token.issued",
            Payload::TokenRevoked { .. } => "agent.enrollment_token.revoked",
            Payload::EnrollmentFailed { .. } => "agent.enrollment.failed",
            Payload::Enrolled { .. } => "agent.enrolled",
            Payload::CertificateRotated { .. } => "agent.certificate.rotated",
            Payload::CertificateSuperseded { .. } => "agent.certificate.superseded",
            Payload::CertificateReuseDetected { .. } => "agent.certificate.reuse_detected",
            Payload::Revoked { .. } => "agent.revoked",
        }
    }
}

/// Every event type name, in lifecycle order. Each has the schema file
/// `specs/events/<name>.v1.schema.json`.
pub const EVENT_TYPES: [&str; 8] = [
    "agent.enrollment_token.issued",
    "agent.enrollment_token.revoked",
    "agent.enrollment.failed",
    "agent.enrolled",
    "agent.certificate.rotated",
    "agent.certificate.superseded",
    "agent.certificate.reuse_detected",
    "agent.revoked",
];

/// One lifecycle event: the common envelope with its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id; consumers de-duplicate on it (delivery is at least once).
    pub event_id: Uuid,
    /// The payload schema version ([`VERSION`]).
    pub version: u32,
    /// When the state change was committed.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// The tenant the event belongs to.
    pub tenant_id: TenantId,
    /// Who caused it.
    pub actor: Actor,
    /// `type` and `payload`.
    #[serde(flatten)]
    pub payload: Payload,
}

impl Event {
    /// A new event with a random id, occurring at `occurred_at` (converted
    /// to UTC: the schemas require `Z` timestamps).
    pub fn new(
        tenant_id: TenantId,
        actor: Actor,
        occurred_at: OffsetDateTime,
        payload: Payload,
    ) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            version: VERSION,
            occurred_at: occurred_at.to_offset(time::UtcOffset::UTC),
            tenant_id,
            actor,
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let e = Event::new(
            "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10".parse().unwrap(),
            Actor::System,
            OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            Payload::TokenRevoked {
                token_id: TokenId::random(),
                uses: 0,
            },
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "agent.enrollment_token.revoked");
        assert_eq!(v["version"], 1);
        assert_eq!(v["occurred_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["actor"], serde_json::json!({"type": "system"}));
        assert_eq!(v["payload"]["uses"], 0);
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
        assert_eq!(e.payload.event_type(), EVENT_TYPES[1]);
    }

    #[test]
    fn occurred_at_is_stored_in_utc() {
        let local = OffsetDateTime::from_unix_timestamp(1_700_000_000)
            .unwrap()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        let e = Event::new(
            TenantId::random(),
            Actor::System,
            local,
            Payload::TokenRevoked {
                token_id: TokenId::random(),
                uses: 1,
            },
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["occurred_at"], "2023-11-14T22:13:20Z");
    }
}
