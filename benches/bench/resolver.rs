//! P6, resolver share: what resolving the stored credential and building
//! the child's environment cost, as a share of pickup latency.
//!
//! Measured in this process with the daemon's own functions, as `launch()`
//! calls them: the claim statement hands `resolver::resolve` the
//! connection's active credential row (ciphertext), the resolver decrypts
//! it, and `ChildEnv::build` assembles the environment. Fetching that row
//! on its own, the round trip the claim saves by returning it, is reported
//! next to it for comparison.

use std::ffi::OsString;
use std::time::Instant;

use anyhow::{bail, Context as _};
use connectord::config::Config;
use connectord::run::child_env::{ChildEnv, RunMeta};

use super::setup::Env;
use super::stats::{Figure, Report, Unit};

fn host(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

/// Samples thrown away first (caches, the statement cache).
const WARM_UP: usize = 20;

pub async fn run(
    env: &mut Env,
    report: &mut Report,
    pickup: Option<&Figure>,
) -> anyhow::Result<()> {
    report.say("");
    report.say("== P6 resolver share: resolve the stored credential + build the child env ==");
    let config = Config::load(&env.config_path).context("loading the bench config")?;
    let connector = config
        .connectors
        .get("probe")
        .context("the bench config has no probe connector")?;
    let n = env.mode.resolver_samples;
    let mut whole = Vec::with_capacity(n);
    let mut resolve_only = Vec::with_capacity(n);
    let mut build_only = Vec::with_capacity(n);
    let mut fetch_only = Vec::with_capacity(n);
    for i in 0..n + WARM_UP {
        let connection = &env.connections[i % env.connections.len()];

        // The row, as the claim returns it (ciphertext only).
        let fetch_started = Instant::now();
        let stored = connectord::queue::latest_credential(&env.pool, connection)
            .await?
            .with_context(|| format!("{connection} has no stored credential"))?;
        let fetched_at = Instant::now();

        let started = Instant::now();
        let resolved = match connectord::credentials::resolver::resolve(
            Some(&stored),
            Some(&env.keyring),
            "probe",
            connector,
            connection,
            host,
        ) {
            Ok(resolved) => resolved,
            Err(refusal) => bail!("the resolver refused {connection}: {}", refusal.detail),
        };
        let resolved_at = Instant::now();
        let child_env = ChildEnv::build(
            &config,
            connector,
            &RunMeta {
                run_id: i as i64,
                connection_id: connection,
                trigger: connectord::vocabulary::Trigger::Manual,
                attempt: 1,
                private: None,
                state_file: None,
            },
            resolved.vars,
            host,
        );
        let built_at = Instant::now();
        drop(child_env);
        if i >= WARM_UP {
            let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1e3;
            whole.push(ms(started, built_at));
            resolve_only.push(ms(started, resolved_at));
            build_only.push(ms(resolved_at, built_at));
            fetch_only.push(ms(fetch_started, fetched_at));
        }
    }
    let whole = report.add(Figure::new("resolve + env build", Unit::Millis, &whole));
    report.add(Figure::new(
        "  of which: resolve (decrypt, map)",
        Unit::Millis,
        &resolve_only,
    ));
    report.add(Figure::new(
        "  of which: ChildEnv::build",
        Unit::Millis,
        &build_only,
    ));
    report.add(
        Figure::new(
            "  for comparison: fetching the row alone",
            Unit::Millis,
            &fetch_only,
        )
        .note("one round trip; the claim returns the row"),
    );
    match (whole.summary, pickup.and_then(|p| p.summary)) {
        (Some(w), Some(p)) => {
            let share = 100.0 * w.p50 / p.p50;
            report.say(&format!(
                "resolver share of pickup (p50 / p50)          {share:.2}% of {:.3}ms",
                p.p50
            ));
            report.check(
                "P6 resolution + env build <= 2% of pickup",
                format!("{share:.2}%"),
                Some(share <= 2.0),
            );
        }
        _ => report.say("resolver share of pickup: pickup was not measured in this run"),
    }
    Ok(())
}
