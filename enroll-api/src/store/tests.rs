use super::conformance;
use super::*;

fn pg_url() -> String {
    std::env::var("ONEPROTECT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn schema_name(label: &str) -> String {
    format!("enroll_{label}_{}", uuid::Uuid::new_v4().simple())
}

/// One test per conformance check and backend — `sqlite::<check>` and
/// `postgres::<check>`, each PostgreSQL one in a fresh schema — so that a
/// failing check hides none of the others.
macro_rules! conformance_tests {
    ($($check:ident $(($($arg:expr),*))?,)*) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let s = AnyStore::open_sqlite(&dir.path().join("enroll.db"), 8)
                        .await
                        .unwrap();
                    conformance::$check(&s $($(, $arg)*)?).await;
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let s = conformance::pg_store_in_new_schema(&pg_url(), &schema_name("conf"))
                        .await;
                    conformance::$check(&s $($(, $arg)*)?).await;
                }
            )*
        }
    };
}

conformance_tests! {
    tenants_and_admin_keys,
    tokens_round_trip_and_isolate_tenants,
    token_listing_filters_and_pages,
    revoke_token_is_idempotent,
    enroll_writes_everything_or_nothing,
    enroll_refusals,
    single_use_token_under_concurrency(100),
    token_under_concurrency(60, 25),
    agents_list_and_revoke,
    relay_reads_pending_events_and_certificates,
    outbox_backlog_is_marked_in_big_batches,
    rotation_lineage,
    rotation_under_concurrency(20),
    control_characters_are_refused_alike,
    superseded_use_is_recorded_once_per_window,
}

/// A stored id that is not in canonical form does not decode: `Corrupt`, on
/// the cross-tenant read as on any other.
#[tokio::test]
async fn sqlite_non_canonical_id_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enroll.db");
    let s = AnyStore::open_sqlite(&path, 2).await.unwrap();
    let raw =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO tenants (id, name, leaf_lifetime_secs, created_at) \
         VALUES ('6F1E0C9A-3A51-4C1B-9A57-0C7F2F6D8E10', 'x', 60, 0)",
    )
    .execute(&raw)
    .await
    .unwrap();
    let r = s.list_tenant_ids().await;
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
}

/// The one-statement enrollment and the one-round-trip begin set the tenant
/// for their own transaction only: the pooled connection (here the only
/// one) comes back with no tenant set, on success and on refusal alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tenant_setting_does_not_outlive_its_transaction() {
    let s = conformance::pg_store_in_new_schema_with(&pg_url(), &schema_name("leak"), 1).await;
    let t = conformance::tenant(&s).await;
    let (id, h) = conformance::token(&s, t, 1, 3600).await;
    let now = conformance::now();
    assert_eq!(
        s.enroll(&conformance::enrollment(t, id, &h, now))
            .await
            .unwrap(),
        EnrollOutcome::Enrolled
    );
    assert_eq!(
        s.enroll(&conformance::enrollment(t, id, &h, now))
            .await
            .unwrap(),
        EnrollOutcome::Refused(TokenRefusal::UsedUp)
    );
    let pool = s.postgres_pool().expect("a PostgreSQL store");
    let mut only = pool.acquire().await.unwrap();
    let tenant: Option<String> = sqlx::query_scalar("SELECT oneprotect_current_tenant()::text")
        .fetch_one(&mut *only)
        .await
        .unwrap();
    assert_eq!(tenant, None, "the tenant setting leaked to the next use");
    let agents: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&mut *only)
        .await
        .unwrap();
    assert_eq!(agents, 0, "rows visible without a tenant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rls_hides_rows_without_the_tenant_setting() {
    let s = conformance::pg_store_in_new_schema(&pg_url(), &schema_name("rls")).await;
    let t = conformance::tenant(&s).await;
    let (id, h) = conformance::token(&s, t, 1, 3600).await;
    assert_eq!(
        s.enroll(&conformance::enrollment(t, id, &h, conformance::now()))
            .await
            .unwrap(),
        EnrollOutcome::Enrolled
    );
    let pool = s.postgres_pool().expect("a PostgreSQL store");
    let mut conn = pool.acquire().await.unwrap();
    let who: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(who, super::postgres::DEFAULT_APP_ROLE);
    for table in [
        "tenants",
        "admin_keys",
        "enrollment_tokens",
        "agents",
        "certificates",
        "events_outbox",
        "reuse_windows",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} leaks rows without a tenant");
    }
    // With another tenant set: still nothing; with the right one: the rows.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('oneprotect.tenant_id', $1, true)")
        .bind(TenantId::random().to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // Writing a row for another tenant is refused by WITH CHECK.
    let err = sqlx::query(
        "INSERT INTO tenants (id, name, leaf_lifetime_secs, created_at) VALUES ($1, 'x', 60, 0)",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
    tx.rollback().await.unwrap();
    let mut tx = begin_as(pool, t).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 1);
    tx.rollback().await.unwrap();
    // The setting is transaction-local: gone after the transaction.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// Whether the relay was woken since the last look (a `Notify` keeps one
/// permit when nobody waits).
async fn relay_was_woken(s: &AnyStore) -> bool {
    tokio::time::timeout(
        std::time::Duration::from_millis(50),
        s.relay_waker().woken(),
    )
    .await
    .is_ok()
}

/// ADR-0019: a commit that wrote an outbox row wakes the relay; reads,
/// writes without an event and rolled-back refusals do not.
async fn commits_with_outbox_rows_wake_the_relay(s: &AnyStore) {
    let t = conformance::tenant(s).await;
    assert!(!relay_was_woken(s).await, "a tenant has no event");
    let (id, h) = conformance::token(s, t, 1, 3600).await;
    assert!(relay_was_woken(s).await, "token.issued");
    s.fetch_token(t, id).await.unwrap();
    assert!(!relay_was_woken(s).await, "a read");
    let wrong = conformance::enrollment(t, id, &conformance::hash("wrong"), conformance::now());
    assert_eq!(
        s.enroll(&wrong).await.unwrap(),
        EnrollOutcome::Refused(TokenRefusal::Unknown)
    );
    assert!(!relay_was_woken(s).await, "a refused enrollment");
    assert_eq!(
        s.enroll(&conformance::enrollment(t, id, &h, conformance::now()))
            .await
            .unwrap(),
        EnrollOutcome::Enrolled
    );
    assert!(relay_was_woken(s).await, "agent.enrolled");
}

#[tokio::test]
async fn sqlite_commits_with_outbox_rows_wake_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let s = AnyStore::open_sqlite(&dir.path().join("enroll.db"), 2)
        .await
        .unwrap();
    commits_with_outbox_rows_wake_the_relay(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commits_with_outbox_rows_wake_the_relay() {
    let s = conformance::pg_store_in_new_schema(&pg_url(), &schema_name("wake")).await;
    commits_with_outbox_rows_wake_the_relay(&s).await;
}

/// A transaction on `pool` with `tenant` set, as the service's own.
async fn begin_as(
    pool: &sqlx::PgPool,
    tenant: TenantId,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('oneprotect.tenant_id', $1, true)")
        .bind(tenant.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// A PostgreSQL store in a fresh schema, a tenant and a token of `max_uses`
/// (its id and keyed hash).
async fn pg_store_with_token(label: &str, max_uses: u32) -> (AnyStore, TenantId, TokenId, Vec<u8>) {
    let s = conformance::pg_store_in_new_schema(&pg_url(), &schema_name(label)).await;
    let t = conformance::tenant(&s).await;
    let (id, h) = conformance::token(&s, t, max_uses, 3600).await;
    (s, t, id, h)
}

/// Exchanges of one token queued while none is written form one group
/// (ADR-0027): on this single-threaded runtime all five are queued before
/// the writer task runs. The group takes the three uses left, in queue
/// order, in one transaction (every agent row has the same `xmin`); the
/// other two are refused as used up and write nothing.
#[tokio::test]
async fn postgres_a_group_of_exchanges_takes_the_uses_left_in_one_transaction() {
    let (s, t, id, h) = pg_store_with_token("group", 3).await;
    let now = conformance::now();
    let group: Vec<Enrollment> = (0..5)
        .map(|_| conformance::enrollment(t, id, &h, now))
        .collect();
    let (a, b, c, d, e) = tokio::join!(
        s.enroll(&group[0]),
        s.enroll(&group[1]),
        s.enroll(&group[2]),
        s.enroll(&group[3]),
        s.enroll(&group[4]),
    );
    let outcomes: Vec<EnrollOutcome> = [a, b, c, d, e].into_iter().map(Result::unwrap).collect();
    let used_up = EnrollOutcome::Refused(TokenRefusal::UsedUp);
    let enrolled = EnrollOutcome::Enrolled;
    assert_eq!(
        outcomes,
        [enrolled, enrolled, enrolled, used_up, used_up],
        "the first three in queue order"
    );
    assert_eq!(s.fetch_token(t, id).await.unwrap().unwrap().uses, 3);
    for (i, e) in group.iter().enumerate() {
        let found = s.fetch_agent(t, e.agent.id).await.unwrap();
        assert_eq!(found.is_some(), i < 3, "agent {i}");
    }
    let pool = s.postgres_pool().expect("a PostgreSQL store");
    let mut tx = begin_as(pool, t).await;
    let (agents, transactions): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT xmin::text) FROM agents")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        (agents, transactions),
        (3, 1),
        "one transaction wrote the group"
    );
    let enrolled_events = s
        .list_events(t, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event.payload.event_type() == "agent.enrolled")
        .count();
    assert_eq!(enrolled_events, 3);
}

/// A group whose write fails is written again one exchange at a time, so
/// one bad row answers for itself alone: here an agent whose SPIFFE ID is
/// already taken gets a conflict, and the exchange queued with it enrolls.
#[tokio::test]
async fn postgres_a_failed_group_is_written_again_one_by_one() {
    let (s, t, id, h) = pg_store_with_token("groupfail", 5).await;
    let now = conformance::now();
    let first = conformance::enrollment(t, id, &h, now);
    assert_eq!(s.enroll(&first).await.unwrap(), EnrollOutcome::Enrolled);
    let mut clash = conformance::enrollment(t, id, &h, now);
    clash.agent.spiffe_id.clone_from(&first.agent.spiffe_id);
    let good = conformance::enrollment(t, id, &h, now);
    let (clashed, enrolled) = tokio::join!(s.enroll(&clash), s.enroll(&good));
    assert!(
        matches!(clashed, Err(StoreError::Conflict(_))),
        "{clashed:?}"
    );
    assert_eq!(enrolled.unwrap(), EnrollOutcome::Enrolled);
    assert_eq!(s.fetch_token(t, id).await.unwrap().unwrap().uses, 2);
    assert!(s.fetch_agent(t, clash.agent.id).await.unwrap().is_none());
    assert!(s.fetch_agent(t, good.agent.id).await.unwrap().is_some());
}

/// An agent's token and a certificate's agent must be of the row's own
/// tenant: the database refuses a cross-tenant reference (migration 0008),
/// even from a write made under that tenant's setting.
#[tokio::test]
async fn postgres_references_cannot_cross_tenants() {
    let s = conformance::pg_store_in_new_schema(&pg_url(), &schema_name("fk")).await;
    let (a, b) = (conformance::tenant(&s).await, conformance::tenant(&s).await);
    let (token_b, hash_b) = conformance::token(&s, b, 1, 3600).await;
    let theirs = conformance::enrollment(b, token_b, &hash_b, conformance::now());
    assert_eq!(s.enroll(&theirs).await.unwrap(), EnrollOutcome::Enrolled);
    let pool = s.postgres_pool().expect("a PostgreSQL store");
    let refused = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let mut tx = begin_as(&pool, a).await;
            let r = sqlx::query(sql)
                .bind(*a.as_uuid())
                .bind(*theirs.agent.id.as_uuid())
                .bind(*token_b.as_uuid())
                .execute(&mut *tx)
                .await;
            let code = r.err().and_then(|e| {
                e.as_database_error()
                    .and_then(|d| d.code().map(|c| c.into_owned()))
            });
            assert_eq!(
                code.as_deref(),
                Some("23503"),
                "{sql}: a foreign-key violation"
            );
        }
    };
    // Tenant a's certificate for tenant b's agent.
    refused(
        "INSERT INTO certificates (serial, tenant_id, agent_id, status, fingerprint, \
         not_before, not_after, cert_pem, issued_at) \
         SELECT 'x' || $3::text, $1, $2, 'active', 'fp-' || $3::text, 0, 1, 'pem', 0",
    )
    .await;
    // Tenant a's agent enrolled with tenant b's token.
    refused(
        "INSERT INTO agents (id, tenant_id, spiffe_id, status, hostname, os, agent_version, \
         token_id, enrolled_at, current_serial, certificate_not_after) \
         SELECT gen_random_uuid(), $1, 'spiffe://x/' || $2::text, 'active', 'h', 'linux', '1', \
         $3, 0, 's', 1",
    )
    .await;
}
