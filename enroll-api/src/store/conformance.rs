//! The store conformance suite (SPIRE's `sqltest`): one set of checks that
//! every backend must pass, each a `pub async fn` over any [`Store`]. This
//! crate's `store/tests.rs` runs each as its own test on SQLite and on
//! PostgreSQL (a fresh schema per test); other crates get the suite with the
//! `test-util` feature.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use oneprotect_identity::events::{Actor, Event, Payload};
use oneprotect_identity::{AgentId, AgentStatus, CertStatus, SerialNumber, TenantId, TokenId};

use super::*;

pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

pub async fn tenant<S: Store>(s: &S) -> TenantId {
    let t = Tenant {
        id: TenantId::random(),
        name: "acme".into(),
        leaf_lifetime_secs: 3600,
        created_at: now(),
    };
    s.create_tenant(&t).await.unwrap();
    t.id
}

pub fn hash(tag: &str) -> Vec<u8> {
    ring::digest::digest(
        &ring::digest::SHA256,
        format!("{tag}{}", Uuid::new_v4()).as_bytes(),
    )
    .as_ref()
    .to_vec()
}

pub async fn token<S: Store>(
    s: &S,
    tenant: TenantId,
    max_uses: u32,
    ttl: i64,
) -> (TokenId, Vec<u8>) {
    let id = TokenId::random();
    let h = hash("token");
    let record = TokenRecord {
        id,
        tenant_id: tenant,
        max_uses,
        uses: 0,
        expires_at: now() + time::Duration::seconds(ttl),
        created_at: now(),
        revoked_at: None,
        description: Some("laptops".into()),
        labels: BTreeMap::from([("site".to_string(), "berlin".to_string())]),
    };
    let event = Event::new(
        tenant,
        Actor::System,
        now(),
        Payload::TokenIssued {
            token_id: id,
            expires_at: record.expires_at,
            max_uses,
            description: record.description.clone(),
            labels: record.labels.clone(),
        },
    );
    s.create_token(
        &NewToken {
            record,
            token_hash: h.clone(),
            created_by: Uuid::new_v4(),
        },
        &event,
    )
    .await
    .unwrap();
    (id, h)
}

pub fn enrollment(
    tenant: TenantId,
    token_id: TokenId,
    token_hash: &[u8],
    at: OffsetDateTime,
) -> Enrollment {
    let agent_id = AgentId::random();
    let mut serial = [0u8; 16];
    serial[..16].copy_from_slice(&Uuid::new_v4().into_bytes());
    serial[0] |= 1;
    let serial = SerialNumber::from_bytes(serial).unwrap();
    let spiffe_id = format!("spiffe://oneprotect.test/tenant/{tenant}/agent/{agent_id}");
    let not_after = at + Duration::from_secs(3600);
    Enrollment {
        token_id,
        token_hash: token_hash.to_vec(),
        agent: AgentRecord {
            id: agent_id,
            tenant_id: tenant,
            spiffe_id: spiffe_id.clone(),
            status: AgentStatus::Active,
            hostname: "host-1".into(),
            os: "linux".into(),
            agent_version: "1.0.0".into(),
            token_id,
            enrolled_at: at,
            current_serial: serial,
            certificate_not_after: not_after,
            revoked_at: None,
            revocation_reason: None,
            previous_serial: None,
            previous_valid_until: None,
        },
        certificate: NewCertificate {
            serial,
            fingerprint: format!("{:064x}", Uuid::new_v4().as_u128()),
            not_before: at,
            not_after,
            cert_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        },
        event: Event::new(
            tenant,
            Actor::EnrollmentToken(token_id),
            at,
            Payload::Enrolled {
                agent_id,
                token_id,
                spiffe_id: spiffe_id.parse().unwrap(),
                serial,
                not_after,
                hostname: "host-1".into(),
                os: "linux".into(),
                agent_version: "1.0.0".into(),
            },
        ),
        now: at,
    }
}

const PAGE: Page = Page {
    limit: 100,
    after: None,
};

fn random_serial() -> SerialNumber {
    let mut serial = Uuid::new_v4().into_bytes();
    serial[0] |= 1;
    SerialNumber::from_bytes(serial).unwrap()
}

pub fn rotation(
    tenant: TenantId,
    agent: AgentId,
    presented: SerialNumber,
    at: OffsetDateTime,
    grace: i64,
) -> Rotation {
    let serial = random_serial();
    Rotation {
        tenant,
        agent,
        presented,
        certificate: NewCertificate {
            serial,
            fingerprint: format!("{:064x}", Uuid::new_v4().as_u128()),
            not_before: at,
            not_after: at + Duration::from_secs(3600),
            cert_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        },
        previous_valid_until: at + time::Duration::seconds(grace),
        now: at,
    }
}

async fn statuses<S: Store>(s: &S, t: TenantId, a: AgentId) -> BTreeMap<SerialNumber, CertStatus> {
    s.list_agent_certificates(t, a)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.serial, c.status))
        .collect()
}

async fn types_of<S: Store>(s: &S, t: TenantId, a: AgentId) -> Vec<&'static str> {
    s.list_agent_events(t, a, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.payload.event_type())
        .collect()
}

/// The two-phase lineage: rotate, retry with the previous, confirm, sweep,
/// refusals, and another tenant seeing nothing.
pub async fn rotation_lineage<S: Store>(s: &S) {
    use super::rotation::RotationRefusal as R;
    let t = tenant(s).await;
    let other = tenant(s).await;
    let (id, h) = token(s, t, 1, 3600).await;
    let e = enrollment(t, id, &h, now());
    s.enroll(&e).await.unwrap();
    let a = e.agent.id;
    let s0 = e.certificate.serial;

    // Phase one: s1 issued, s0 still active as previous.
    let r1 = rotation(t, a, s0, now(), 60);
    let s1 = r1.certificate.serial;
    assert!(
        matches!(s.rotate(&r1).await.unwrap(), RotateOutcome::Rotated(p) if p.previous == s0 && p.supersede.is_empty())
    );
    let ag = s.fetch_agent(t, a).await.unwrap().unwrap();
    assert_eq!((ag.current_serial, ag.previous_serial), (s1, Some(s0)));
    assert_eq!(
        ag.previous_valid_until,
        Some(now() + time::Duration::seconds(60))
    );
    assert_eq!(ag.certificate_not_after, r1.certificate.not_after);
    let st = statuses(s, t, a).await;
    assert_eq!((st[&s0], st[&s1]), (CertStatus::Active, CertStatus::Active));

    // The answer was lost: retrying with s0 replaces the unused s1.
    let r2 = rotation(t, a, s0, now(), 60);
    let s2 = r2.certificate.serial;
    assert!(
        matches!(s.rotate(&r2).await.unwrap(), RotateOutcome::Rotated(p) if p.previous == s0 && p.supersede.len() == 1)
    );
    let st = statuses(s, t, a).await;
    assert_eq!(
        (st[&s0], st[&s1], st[&s2]),
        (
            CertStatus::Active,
            CertStatus::Superseded,
            CertStatus::Active
        )
    );

    // Confirming with the previous is a conflict; with the newest completes.
    assert_eq!(
        s.confirm_certificate(t, a, s0, now()).await.unwrap(),
        ConfirmOutcome::Refused(R::PreviousPresented)
    );
    let c = s.confirm_certificate(t, a, s2, now()).await.unwrap();
    assert!(matches!(c, ConfirmOutcome::Confirmed(Some(sup)) if sup.serial == s0 && sup.by == s2));
    assert_eq!(
        s.confirm_certificate(t, a, s2, now()).await.unwrap(),
        ConfirmOutcome::Confirmed(None),
        "a second confirmation changes nothing"
    );
    let ag = s.fetch_agent(t, a).await.unwrap().unwrap();
    assert_eq!((ag.current_serial, ag.previous_serial), (s2, None));
    assert_eq!(statuses(s, t, a).await[&s0], CertStatus::Superseded);

    // A superseded certificate can neither rotate nor confirm.
    for presented in [s0, s1] {
        assert_eq!(
            s.rotate(&rotation(t, a, presented, now(), 60))
                .await
                .unwrap(),
            RotateOutcome::Refused(R::CertificateSuperseded { current: s2 })
        );
    }
    // Another agent's or tenant's view.
    assert_eq!(
        s.rotate(&rotation(t, a, random_serial(), now(), 60))
            .await
            .unwrap(),
        RotateOutcome::Refused(R::NotThisAgents)
    );
    assert_eq!(
        s.rotate(&rotation(other, a, s2, now(), 60)).await.unwrap(),
        RotateOutcome::Refused(R::UnknownAgent)
    );

    // The sweep: only after the grace, only once.
    let r3 = rotation(t, a, s2, now(), 30);
    let s3 = r3.certificate.serial;
    s.rotate(&r3).await.unwrap();
    let early = now() + time::Duration::seconds(29);
    assert!(!s
        .list_rotations_due(early, 500)
        .await
        .unwrap()
        .contains(&(t, a)));
    assert_eq!(s.expire_rotation(t, a, early).await.unwrap(), None);
    let late = now() + time::Duration::seconds(30);
    assert!(s
        .list_rotations_due(late, 500)
        .await
        .unwrap()
        .contains(&(t, a)));
    let swept = s.expire_rotation(t, a, late).await.unwrap().unwrap();
    assert_eq!((swept.serial, swept.by), (s2, s3));
    assert_eq!(s.expire_rotation(t, a, late).await.unwrap(), None);
    assert!(!s
        .list_rotations_due(late, 500)
        .await
        .unwrap()
        .contains(&(t, a)));

    // Revoked: every certificate revoked, no rotation, nothing pending.
    s.rotate(&rotation(t, a, s3, now(), 60)).await.unwrap();
    let revoked = s
        .revoke_agent(t, a, "lost", now(), Actor::System)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.previous_serial, None);
    assert!(statuses(s, t, a)
        .await
        .values()
        .all(|c| *c == CertStatus::Revoked));
    assert_eq!(
        s.rotate(&rotation(t, a, revoked.current_serial, now(), 60))
            .await
            .unwrap(),
        RotateOutcome::Refused(R::AgentRevoked)
    );
    assert_eq!(
        types_of(s, t, a).await,
        vec![
            "agent.enrolled",
            "agent.certificate.rotated",
            "agent.certificate.superseded",
            "agent.certificate.rotated",
            "agent.certificate.superseded",
            "agent.certificate.rotated",
            "agent.certificate.superseded",
            "agent.certificate.rotated",
            "agent.revoked",
        ]
    );
}

/// Concurrent rotations of one agent with the same certificate: each
/// commits in turn (the second replaces the first's unused certificate),
/// and at most two certificates are ever active.
/// Uses of a superseded certificate give one `reuse_detected` per
/// certificate and attempt window, also when many record at once; an
/// active, unknown, other agent's or other tenant's certificate records
/// nothing.
pub async fn superseded_use_is_recorded_once_per_window<S: Store>(s: &S) {
    use super::{ReuseOutcome as O, SupersededUseRecord};
    use oneprotect_identity::events::AgentOperation;
    let t = tenant(s).await;
    let other = tenant(s).await;
    let (id, h) = token(s, t, 2, 3600).await;
    let e = enrollment(t, id, &h, now());
    s.enroll(&e).await.unwrap();
    let a = e.agent.id;
    let s0 = e.certificate.serial;
    let window = Duration::from_secs(3600);
    let at = |secs: i64| OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap();
    let use_of =
        |serial: SerialNumber, agent: AgentId, tenant: TenantId, seen_at| SupersededUseRecord {
            tenant,
            agent,
            serial,
            operation: AgentOperation::Request,
            route: Some("/api".into()),
            source_ip: Some("192.0.2.9".parse().unwrap()),
            seen_at,
        };
    // Active: nothing.
    assert_eq!(
        s.record_superseded_use(&use_of(s0, a, t, at(0)), window)
            .await
            .unwrap(),
        O::NotSuperseded
    );
    // Rotate and confirm: s0 superseded by s1.
    let r = rotation(t, a, s0, now(), 60);
    let s1 = r.certificate.serial;
    assert!(matches!(
        s.rotate(&r).await.unwrap(),
        RotateOutcome::Rotated(_)
    ));
    assert!(matches!(
        s.confirm_certificate(t, a, s1, now()).await.unwrap(),
        ConfirmOutcome::Confirmed(Some(_))
    ));
    // Eight at once in one window: one recorded.
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = s.clone();
        let u = use_of(s0, a, t, at(100 + i));
        let barrier = Arc::clone(&barrier);
        set.spawn(async move {
            barrier.wait().await;
            s.record_superseded_use(&u, window).await.unwrap()
        });
    }
    let mut outcomes = Vec::new();
    while let Some(o) = set.join_next().await {
        outcomes.push(o.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| **o == O::Recorded).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().all(|o| *o != O::NotSuperseded),
        "{outcomes:?}"
    );
    // Later in the same window: a duplicate; in the next window: recorded.
    assert_eq!(
        s.record_superseded_use(&use_of(s0, a, t, at(3599)), window)
            .await
            .unwrap(),
        O::Duplicate
    );
    assert_eq!(
        s.record_superseded_use(&use_of(s0, a, t, at(3600)), window)
            .await
            .unwrap(),
        O::Recorded
    );
    // The wrong agent, the wrong tenant, an unknown serial: nothing.
    for u in [
        use_of(s0, AgentId::random(), t, at(8000)),
        use_of(s0, a, other, at(8000)),
        use_of(random_serial(), a, t, at(8000)),
    ] {
        assert_eq!(
            s.record_superseded_use(&u, window).await.unwrap(),
            O::NotSuperseded
        );
    }
    // The events: two, with what the use said and the current certificate.
    let events: Vec<_> = s
        .list_agent_events(t, a, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event.payload.event_type() == "agent.certificate.reuse_detected")
        .collect();
    assert_eq!(events.len(), 2);
    for ev in &events {
        assert!(matches!(
            &ev.event.payload,
            oneprotect_identity::events::Payload::CertificateReuseDetected {
                agent_id, serial, current_serial, operation: AgentOperation::Request, route: Some(route), source_ip: Some(_),
            } if *agent_id == a && *serial == s0 && *current_serial == s1 && route == "/api"
        ));
    }
    assert!((at(100)..=at(107)).contains(&events[0].event.occurred_at));
    assert_eq!(events[1].event.occurred_at, at(3600));
    assert!(s.list_agent_events(other, a, 100).await.unwrap().is_empty());
}

pub async fn rotation_under_concurrency<S: Store>(s: &S, n: usize) {
    let t = tenant(s).await;
    let (id, h) = token(s, t, 1, 3600).await;
    let e = enrollment(t, id, &h, now());
    s.enroll(&e).await.unwrap();
    let a = e.agent.id;
    let s0 = e.certificate.serial;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let s = s.clone();
        set.spawn(async move { s.rotate(&rotation(t, a, s0, now(), 60)).await.unwrap() });
    }
    let mut rotated = 0;
    while let Some(r) = set.join_next().await {
        if matches!(r.unwrap(), RotateOutcome::Rotated(_)) {
            rotated += 1;
        }
    }
    assert_eq!(
        rotated, n,
        "every retry with the previous certificate rotates"
    );
    let st = statuses(s, t, a).await;
    let active: Vec<_> = st
        .iter()
        .filter(|(_, c)| **c == CertStatus::Active)
        .collect();
    assert_eq!(active.len(), 2, "{st:?}");
    let ag = s.fetch_agent(t, a).await.unwrap().unwrap();
    assert_eq!(ag.previous_serial, Some(s0));
    assert_eq!(st[&ag.current_serial], CertStatus::Active);
    assert_eq!(st.len(), n + 1);
}

pub async fn tenants_and_admin_keys<S: Store>(s: &S) {
    s.ping().await.unwrap();
    let t = tenant(s).await;
    let got = s.fetch_tenant(t).await.unwrap().unwrap();
    assert_eq!(got.name, "acme");
    assert_eq!(got.leaf_lifetime_secs, 3600);
    assert!(s.fetch_tenant(TenantId::random()).await.unwrap().is_none());
    let key = NewAdminKey {
        id: Uuid::new_v4(),
        tenant_id: t,
        name: "ci".into(),
        key_hash: hash("key"),
        created_at: now(),
    };
    s.create_admin_key(&key).await.unwrap();
    let found = s
        .fetch_admin_key_by_hash(&key.key_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        found,
        AdminKeyRef {
            id: key.id,
            tenant_id: t
        }
    );
    assert!(s
        .fetch_admin_key_by_hash(&hash("other"))
        .await
        .unwrap()
        .is_none());
    // A duplicate hash is a conflict, never a second identity.
    let dup = NewAdminKey {
        id: Uuid::new_v4(),
        ..key
    };
    assert!(matches!(
        s.create_admin_key(&dup).await,
        Err(StoreError::Conflict(_))
    ));
}

pub async fn tokens_round_trip_and_isolate_tenants<S: Store>(s: &S) {
    let a = tenant(s).await;
    let b = tenant(s).await;
    let (id, h) = token(s, a, 3, 3600).await;
    let t = s.fetch_token(a, id).await.unwrap().unwrap();
    assert_eq!((t.max_uses, t.uses, t.revoked_at), (3, 0, None));
    assert_eq!(t.description.as_deref(), Some("laptops"));
    assert_eq!(t.labels.get("site").map(String::as_str), Some("berlin"));
    assert_eq!(t.status(now()), TokenStatus::Active);
    assert!(
        s.fetch_token(b, id).await.unwrap().is_none(),
        "other tenant sees the token"
    );
    // The exchange's read by keyed hash is the token's own row and its own
    // tenant's, whatever else exists; an unknown hash finds nothing.
    let (tok, ten) = s.fetch_token_by_hash(&h).await.unwrap().unwrap();
    assert_eq!(tok, t);
    assert_eq!(ten, s.fetch_tenant(a).await.unwrap());
    assert!(ten.is_some());
    assert!(s.fetch_token_by_hash(&hash("x")).await.unwrap().is_none());
    assert!(s
        .revoke_token(b, id, now(), Actor::System)
        .await
        .unwrap()
        .is_none());
    let events = s.list_events(a, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].event.payload.event_type(),
        "agent.enrollment_token.issued"
    );
    assert!(s.list_events(b, 10).await.unwrap().is_empty());
}

pub async fn token_listing_filters_and_pages<S: Store>(s: &S) {
    let t = tenant(s).await;
    let (active, _) = token(s, t, 1, 3600).await;
    let (expired, _) = token(s, t, 1, -1).await;
    let (revoked, _) = token(s, t, 1, 3600).await;
    s.revoke_token(t, revoked, now(), Actor::System)
        .await
        .unwrap();
    let (used, uh) = token(s, t, 1, 3600).await;
    assert_eq!(
        s.enroll(&enrollment(t, used, &uh, now())).await.unwrap(),
        EnrollOutcome::Enrolled
    );
    let ids = |v: Vec<TokenRecord>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    for (status, want) in [
        (TokenStatus::Active, active),
        (TokenStatus::Expired, expired),
        (TokenStatus::Revoked, revoked),
        (TokenStatus::UsedUp, used),
    ] {
        let got = ids(s.list_tokens(t, Some(status), now(), PAGE).await.unwrap());
        assert_eq!(got, vec![want], "{status:?}");
    }
    let all = ids(s.list_tokens(t, None, now(), PAGE).await.unwrap());
    assert_eq!(all.len(), 4);
    let mut sorted = all.clone();
    sorted.sort_by_key(|i| *i.as_uuid());
    assert_eq!(all, sorted);
    let first = ids(s
        .list_tokens(
            t,
            None,
            now(),
            Page {
                limit: 3,
                after: None,
            },
        )
        .await
        .unwrap());
    let rest = ids(s
        .list_tokens(
            t,
            None,
            now(),
            Page {
                limit: 3,
                after: Some(*first[2].as_uuid()),
            },
        )
        .await
        .unwrap());
    assert_eq!(first.len(), 3);
    assert_eq!([first, rest].concat(), all);
}

pub async fn revoke_token_is_idempotent<S: Store>(s: &S) {
    let t = tenant(s).await;
    let (id, h) = token(s, t, 2, 3600).await;
    let first = s
        .revoke_token(t, id, now(), Actor::System)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.revoked_at, Some(now()));
    let later = now() + Duration::from_secs(10);
    let second = s
        .revoke_token(t, id, later, Actor::System)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        second.revoked_at,
        Some(now()),
        "second revoke changed the record"
    );
    let kinds: Vec<_> = s
        .list_events(t, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event.payload.event_type())
        .collect();
    assert_eq!(
        kinds,
        [
            "agent.enrollment_token.issued",
            "agent.enrollment_token.revoked"
        ]
    );
    assert_eq!(
        s.enroll(&enrollment(t, id, &h, now())).await.unwrap(),
        EnrollOutcome::Refused(TokenRefusal::Revoked)
    );
}

pub async fn enroll_writes_everything_or_nothing<S: Store>(s: &S) {
    let t = tenant(s).await;
    let (id, h) = token(s, t, 2, 3600).await;
    let e = enrollment(t, id, &h, now());
    assert_eq!(s.enroll(&e).await.unwrap(), EnrollOutcome::Enrolled);
    let agent = s.fetch_agent(t, e.agent.id).await.unwrap().unwrap();
    assert_eq!(agent, e.agent);
    assert_eq!(s.fetch_token(t, id).await.unwrap().unwrap().uses, 1);
    let events = s.list_events(t, 10).await.unwrap();
    assert_eq!(events.last().unwrap().event, e.event);

    // A second enrollment that fails half-way (duplicate serial) leaves no
    // trace: the use is not consumed and no agent or event appears.
    let mut dup = enrollment(t, id, &h, now());
    dup.certificate.serial = e.certificate.serial;
    assert!(s.enroll(&dup).await.is_err());
    assert!(s.fetch_agent(t, dup.agent.id).await.unwrap().is_none());
    assert_eq!(s.fetch_token(t, id).await.unwrap().unwrap().uses, 1);
    assert_eq!(s.list_events(t, 10).await.unwrap().len(), events.len());
}

pub async fn enroll_refusals<S: Store>(s: &S) {
    let t = tenant(s).await;
    let other = tenant(s).await;
    let (id, h) = token(s, t, 1, 60).await;
    // Wrong hash, wrong tenant: unknown.
    assert_eq!(
        s.enroll(&enrollment(t, id, &hash("wrong"), now()))
            .await
            .unwrap(),
        EnrollOutcome::Refused(TokenRefusal::Unknown)
    );
    assert_eq!(
        s.enroll(&enrollment(other, id, &h, now())).await.unwrap(),
        EnrollOutcome::Refused(TokenRefusal::Unknown)
    );
    // Expired at exactly expires_at.
    let at_expiry = now() + Duration::from_secs(60);
    assert_eq!(
        s.enroll(&enrollment(t, id, &h, at_expiry)).await.unwrap(),
        EnrollOutcome::Refused(TokenRefusal::Expired)
    );
    assert_eq!(
        s.enroll(&enrollment(t, id, &h, now())).await.unwrap(),
        EnrollOutcome::Enrolled
    );
    assert_eq!(
        s.enroll(&enrollment(t, id, &h, now())).await.unwrap(),
        EnrollOutcome::Refused(TokenRefusal::UsedUp)
    );
    let agents = s.list_agents(t, None, PAGE).await.unwrap();
    assert_eq!(agents.len(), 1);
}

/// `n` concurrent enrollments with one single-use token: exactly one wins.
pub async fn single_use_token_under_concurrency<S: Store>(s: &S, n: usize) {
    token_under_concurrency(s, n, 1).await;
}

/// `n` concurrent enrollments with one token of `uses` uses (a fleet's
/// shared token, every exchange updating its row): exactly `uses` win.
pub async fn token_under_concurrency<S: Store>(s: &S, n: usize, uses: u32) {
    let t = tenant(s).await;
    let (id, h) = token(s, t, uses, 3600).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let s = s.clone();
        let e = enrollment(t, id, &h, now());
        let barrier = Arc::clone(&barrier);
        set.spawn(async move {
            barrier.wait().await;
            s.enroll(&e).await
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        match r.unwrap().unwrap() {
            EnrollOutcome::Enrolled => ok += 1,
            EnrollOutcome::Refused(r) => assert_eq!(r, TokenRefusal::UsedUp),
        }
    }
    let uses_n = usize::try_from(uses).unwrap();
    assert_eq!(ok, uses_n.min(n));
    assert_eq!(
        s.list_agents(
            t,
            None,
            Page {
                limit: 1000,
                after: None
            }
        )
        .await
        .unwrap()
        .len(),
        ok
    );
    assert_eq!(
        s.fetch_token(t, id).await.unwrap().unwrap().uses,
        u32::try_from(ok).unwrap()
    );
    let enrolled = s
        .list_events(t, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event.payload.event_type() == "agent.enrolled")
        .count();
    assert_eq!(enrolled, ok);
}

pub async fn agents_list_and_revoke<S: Store>(s: &S) {
    let t = tenant(s).await;
    let other = tenant(s).await;
    let (id, h) = token(s, t, 5, 3600).await;
    let e1 = enrollment(t, id, &h, now());
    let e2 = enrollment(t, id, &h, now());
    s.enroll(&e1).await.unwrap();
    s.enroll(&e2).await.unwrap();
    assert!(s.fetch_agent(other, e1.agent.id).await.unwrap().is_none());
    assert!(s
        .revoke_agent(other, e1.agent.id, "x", now(), Actor::System)
        .await
        .unwrap()
        .is_none());
    let r = s
        .revoke_agent(t, e1.agent.id, "stolen", now(), Actor::System)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, AgentStatus::Revoked);
    assert_eq!(r.revocation_reason.as_deref(), Some("stolen"));
    let again = s
        .revoke_agent(
            t,
            e1.agent.id,
            "other",
            now() + Duration::from_secs(5),
            Actor::System,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, r);
    let active = s
        .list_agents(t, Some(AgentStatus::Active), PAGE)
        .await
        .unwrap();
    assert_eq!(
        active.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![e2.agent.id]
    );
    let revoked = s
        .list_agents(t, Some(AgentStatus::Revoked), PAGE)
        .await
        .unwrap();
    assert_eq!(
        revoked.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![e1.agent.id]
    );
    let last = s.list_events(t, 100).await.unwrap().pop().unwrap().event;
    match last.payload {
        Payload::Revoked {
            agent_id,
            revoked_serials,
            ..
        } => {
            assert_eq!(agent_id, e1.agent.id);
            assert_eq!(revoked_serials, vec![e1.certificate.serial]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Issue 15 item 10: a NUL (PostgreSQL cannot store it, SQLite can) or any
/// other control character in client free text is refused by every backend
/// with the same error, before anything is written.
pub async fn control_characters_are_refused_alike<S: Store>(s: &S) {
    let t = tenant(s).await;
    let events_before = s.list_events(t, 1000).await.unwrap().len();
    for (description, labels) in [
        (Some("a\u{0}b".to_owned()), BTreeMap::new()),
        (Some("line\nbreak".to_owned()), BTreeMap::new()),
        (
            None,
            BTreeMap::from([("k\u{0}".to_owned(), "v".to_owned())]),
        ),
        (
            None,
            BTreeMap::from([("k".to_owned(), "v\u{1b}[31m".to_owned())]),
        ),
    ] {
        let id = TokenId::random();
        let record = TokenRecord {
            id,
            tenant_id: t,
            max_uses: 1,
            uses: 0,
            expires_at: now() + time::Duration::seconds(600),
            created_at: now(),
            revoked_at: None,
            description: description.clone(),
            labels: labels.clone(),
        };
        let event = Event::new(
            t,
            Actor::System,
            now(),
            Payload::TokenIssued {
                token_id: id,
                expires_at: record.expires_at,
                max_uses: 1,
                description,
                labels,
            },
        );
        let r = s
            .create_token(
                &NewToken {
                    record,
                    token_hash: hash("nul"),
                    created_by: Uuid::new_v4(),
                },
                &event,
            )
            .await;
        assert!(matches!(r, Err(StoreError::InvalidText(_))), "{r:?}");
        assert!(s.fetch_token(t, id).await.unwrap().is_none());
    }
    let (id, h) = token(s, t, 2, 3600).await;
    let mut bad = enrollment(t, id, &h, now());
    bad.agent.hostname = "host\u{0}".into();
    let r = s.enroll(&bad).await;
    assert!(matches!(r, Err(StoreError::InvalidText(_))), "{r:?}");
    assert_eq!(s.fetch_token(t, id).await.unwrap().unwrap().uses, 0);
    let good = enrollment(t, id, &h, now());
    s.enroll(&good).await.unwrap();
    let r = s
        .revoke_agent(t, good.agent.id, "stolen\u{0}", now(), Actor::System)
        .await;
    assert!(matches!(r, Err(StoreError::InvalidText(_))), "{r:?}");
    let a = s.fetch_agent(t, good.agent.id).await.unwrap().unwrap();
    assert_eq!(a.status, AgentStatus::Active);
    // The token issued event and the enrollment, nothing from the refusals.
    assert_eq!(
        s.list_events(t, 1000).await.unwrap().len(),
        events_before + 2
    );
    // Non-ASCII text that is not a control character is kept as is.
    let r = s
        .revoke_agent(t, good.agent.id, "Gerät – 端末", now(), Actor::System)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.revocation_reason.as_deref(), Some("Gerät – 端末"));
}

pub async fn relay_reads_pending_events_and_certificates<S: Store>(s: &S) {
    let t = tenant(s).await;
    let (id, h) = token(s, t, 5, 3600).await;
    let e = enrollment(t, id, &h, now());
    s.enroll(&e).await.unwrap();
    assert!(s.list_tenant_ids().await.unwrap().contains(&t));
    let certs = s.list_agent_certificates(t, e.agent.id).await.unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].serial, e.certificate.serial);
    assert_eq!(certs[0].status, oneprotect_identity::CertStatus::Active);
    assert_eq!(certs[0].not_after, e.certificate.not_after);
    let other = tenant(s).await;
    assert!(s
        .list_agent_certificates(other, e.agent.id)
        .await
        .unwrap()
        .is_empty());
    // The projection's combined read is the two reads; another tenant's
    // agent is unknown.
    let (agent, with) = s
        .fetch_agent_projection(t, e.agent.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(agent), s.fetch_agent(t, e.agent.id).await.unwrap());
    assert_eq!(with, certs);
    assert!(s
        .fetch_agent_projection(other, e.agent.id)
        .await
        .unwrap()
        .is_none());
    // Drain: every pending row (of every tenant) is listed until marked sent.
    for _ in 0..1000 {
        let pending = s.list_pending_events(50).await.unwrap();
        if pending.is_empty() {
            break;
        }
        let seqs: Vec<i64> = pending.iter().map(|p| p.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");
        for p in &pending {
            s.mark_events_sent(&[p.seq], now()).await.unwrap();
            s.mark_events_sent(&[p.seq], now()).await.unwrap();
        }
    }
    assert!(s.list_pending_events(50).await.unwrap().is_empty());
    s.revoke_agent(t, e.agent.id, "gone", now(), Actor::System)
        .await
        .unwrap();
    let pending = s.list_pending_events(50).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].event.payload.event_type(), "agent.revoked");
    // Batch marking: exactly the listed rows, idempotent, empty is a no-op.
    // (Another tenant's row: the outbox is listed across tenants.)
    s.create_event(&oneprotect_identity::events::Event::new(
        other,
        Actor::System,
        now(),
        oneprotect_identity::events::Payload::Revoked {
            agent_id: AgentId::random(),
            reason: "second".into(),
            revoked_serials: vec![],
        },
    ))
    .await
    .unwrap();
    let two = s.list_pending_events(50).await.unwrap();
    assert_eq!(two.len(), 2);
    s.mark_events_sent(&[], now()).await.unwrap();
    s.mark_events_sent(&[two[1].seq], now()).await.unwrap();
    s.mark_events_sent(&[two[1].seq], now()).await.unwrap();
    let left = s.list_pending_events(50).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, two[0].seq);
    let certs = s.list_agent_certificates(t, e.agent.id).await.unwrap();
    assert_eq!(certs[0].status, oneprotect_identity::CertStatus::Revoked);
    s.mark_events_sent(&[pending[0].seq], now()).await.unwrap();
    assert_eq!(
        s.list_revoked_certificates(t, now()).await.unwrap(),
        vec![(e.certificate.serial, now())]
    );
    assert!(s
        .list_revoked_certificates(t, e.certificate.not_after)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .list_revoked_certificates(other, now())
        .await
        .unwrap()
        .is_empty());
    let history = s.list_agent_events(t, e.agent.id, 100).await.unwrap();
    let types: Vec<_> = history
        .iter()
        .map(|h| h.event.payload.event_type())
        .collect();
    assert_eq!(types, vec!["agent.enrolled", "agent.revoked"]);
    assert!(s
        .list_agent_events(other, e.agent.id, 100)
        .await
        .unwrap()
        .is_empty());
}

/// A backlog bigger than the relay's batch (after a Redis outage, say) is
/// listed oldest first, `limit` at a time, and a whole listing is marked
/// sent in one call: 250 rows, 120 per call (PostgreSQL refuses a function
/// call with more than 100 arguments; the seqs must not be passed as such).
pub async fn outbox_backlog_is_marked_in_big_batches<S: Store>(s: &S) {
    let t = tenant(s).await;
    for _ in 0..250 {
        s.create_event(&oneprotect_identity::events::Event::new(
            t,
            Actor::System,
            now(),
            oneprotect_identity::events::Payload::Revoked {
                agent_id: AgentId::random(),
                reason: "backlog".into(),
                revoked_serials: vec![],
            },
        ))
        .await
        .unwrap();
    }
    let mut sent = Vec::new();
    for _ in 0..10 {
        let pending = s.list_pending_events(120).await.unwrap();
        if pending.is_empty() {
            break;
        }
        assert!(pending.len() <= 120);
        let seqs: Vec<i64> = pending.iter().map(|p| p.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");
        assert!(sent.last().is_none_or(|last| *last < seqs[0]), "in order");
        s.mark_events_sent(&seqs, now()).await.unwrap();
        sent.extend(seqs);
    }
    assert_eq!(sent.len(), 250);
    assert!(s.list_pending_events(120).await.unwrap().is_empty());
}

/// Opens a PostgreSQL store in a fresh schema `schema` (created here).
pub async fn pg_store_in_new_schema(url: &str, schema: &str) -> AnyStore {
    pg_store_in_new_schema_with(url, schema, 16).await
}

/// [`pg_store_in_new_schema`] with a pool of `max_connections`.
pub async fn pg_store_in_new_schema_with(
    url: &str,
    schema: &str,
    max_connections: u32,
) -> AnyStore {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    AnyStore::open_postgres(&super::postgres::PgOptions {
        url: url.to_owned(),
        schema: Some(schema.to_owned()),
        app_role: super::postgres::DEFAULT_APP_ROLE.to_owned(),
        max_connections,
    })
    .await
    .unwrap()
}
