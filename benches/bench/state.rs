//! P8, connector state: pickup of connections with no stored state and
//! with a 100 KiB one, in the same daemon, rounds alternating so the
//! machine's noise lands on both. The probe does not write its state
//! file, so what is measured is what every launch pays: the claim's look
//! for a state, and for the connections that have one its fetch,
//! decryption and the file written before the spawn. The state's bytes
//! are random, so PostgreSQL's compression cannot shrink them.

use std::time::Duration;

use anyhow::Context as _;
use connectord::credentials::keys::StateBinding;
use ring::rand::{SecureRandom, SystemRandom};

use super::daemon::Daemon;
use super::pickup::{sample, Pace};
use super::setup::Env;
use super::stats::{Figure, Report, Unit};

const STATE_BYTES: usize = 100 * 1024;

pub async fn run(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    report.say("");
    report.say("== P8 connector state: pickup with no state and with a 100 KiB state ==");
    let rounds = env.mode.pickup_rounds;
    let per_round = env.mode.pickup_samples_per_round;
    // The connections a round's samples use (pickup warms up on a few more).
    let used = (per_round + 32).min(env.connections.len());
    let mut without = Vec::with_capacity(rounds * per_round);
    let mut with = Vec::with_capacity(rounds * per_round);
    env.wait_quiet(Duration::from_secs(30)).await?;
    let mut daemon = Daemon::start(env, None, "info", "state")?;
    daemon.wait_ready(Duration::from_secs(30)).await?;
    for _ in 0..rounds {
        clear(env).await?;
        sample(env, per_round, true, Pace::Paused, &mut without).await?;
        store(env, used).await?;
        sample(env, per_round, true, Pace::Paused, &mut with).await?;
    }
    daemon.stop().await?;
    clear(env).await?;
    let baseline = report.add(Figure::new(
        "pickup, no stored state (baseline)",
        Unit::Millis,
        &without,
    ));
    let stated = report.add(
        Figure::new("pickup, 100 KiB stored state", Unit::Millis, &with)
            .against(&baseline)
            .note("fetched, decrypted and written to the run's state file"),
    );
    if let (Some(base), Some(ours)) = (baseline.summary, stated.summary) {
        let added = ours.p50 - base.p50;
        report.check(
            "P8 a 100 KiB state adds <= 1 ms to pickup p50",
            format!("{added:+.3} ms"),
            Some(added <= 1.0),
        );
    }
    Ok(())
}

/// Stores a random 100 KiB state, sealed as the daemon seals one, for the
/// first `count` connections, under their active credential.
async fn store(env: &Env, count: usize) -> anyhow::Result<()> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "select c.id, c.connector, cr.id from connections c
         join credentials cr on cr.connection_id = c.id and cr.status = 'active'
         where c.id = any($1)",
    )
    .bind(&env.connections[..count])
    .fetch_all(&env.pool)
    .await?;
    let rng = SystemRandom::new();
    let mut state = vec![0u8; STATE_BYTES];
    for (connection_id, connector, credential_id) in rows {
        rng.fill(&mut state)
            .map_err(|_| anyhow::anyhow!("the random generator failed"))?;
        let sealed = env
            .keyring
            .seal_state(
                &StateBinding {
                    connection_id: &connection_id,
                    connector: &connector,
                    credential_id: Some(credential_id),
                    key_id: env.keyring.primary_id(),
                },
                &state,
            )
            .context("sealing a bench state")?;
        sqlx::query(
            "insert into connection_states (connection_id, run_id, credential_id, key_id, nonce,
                                            ciphertext, size_bytes)
             values ($1, null, $2, $3, $4, $5, $6)
             on conflict (connection_id) do update
             set credential_id = excluded.credential_id, key_id = excluded.key_id,
                 nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                 size_bytes = excluded.size_bytes",
        )
        .bind(&connection_id)
        .bind(credential_id)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(STATE_BYTES as i64)
        .execute(&env.pool)
        .await?;
    }
    Ok(())
}

async fn clear(env: &Env) -> anyhow::Result<()> {
    sqlx::query("delete from connection_states")
        .execute(&env.pool)
        .await?;
    Ok(())
}
