//! Credentials end to end (SPEC §1 R1–R3 and scenarios S1–S3, the typed
//! credential failures of §3, the child environment of §4, keys of §5):
//! every trigger resolves the stored credential through the one resolver,
//! the stored value wins over whatever the daemon's own environment holds,
//! a credential that cannot be resolved refuses the launch without a child,
//! and no secret leaks into logs, argv, `runs`, `interactions` or another
//! connection's child. Real PostgreSQL, the real binary and CLI, real
//! children (the stand-in that records its environment).

// Tuple rows read plainly in assertions.
#![allow(clippy::type_complexity)]

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use support::{
    cli, recorded_env, recorded_runs, stand_in, Config, Connector, Daemon, Scratch, TestDb,
    PATIENCE,
};

/// The credential variables each connector of [`registry`] declares.
const CREDENTIAL_VARS: &[(&str, &[&str])] = &[
    ("amazon", &["AMAZON_USERNAME", "AMAZON_PASSWORD"]),
    ("chase", &["CHASE_USERNAME", "CHASE_PASSWORD"]),
    ("reddit", &["REDDIT_USERNAME", "REDDIT_PASSWORD"]),
    ("usaa", &["USAA_USERNAME", "USAA_PASSWORD"]),
    ("github", &["GITHUB_TOKEN"]),
    ("legacy", &["LEGACY_USERNAME", "LEGACY_PASSWORD"]),
    ("fallback", &["FALLBACK_TOKEN"]),
];

fn declared_vars(connector: &str) -> &'static [&'static str] {
    CREDENTIAL_VARS
        .iter()
        .find(|(name, _)| *name == connector)
        .map_or(&[], |(_, vars)| vars)
}

fn all_credential_vars() -> impl Iterator<Item = &'static str> {
    CREDENTIAL_VARS
        .iter()
        .flat_map(|(_, vars)| vars.iter().copied())
}

/// The config every test uses: keys in `<dir>/keys`, and one stand-in
/// connector per registry entry, recording into `dir`. The child allowlist
/// deliberately names credential variables: those must still never pass
/// from the host into a child (SPEC §4 step 2).
fn registry(dir: &Path) -> Config {
    let connector =
        |name: &str| Connector::recording(name, stand_in(), dir).retry(3, "100ms", "1s");
    let inherit = vec![
        "PATH",
        "HOME",
        "LANG",
        "GITHUB_TOKEN",
        "CHASE_USERNAME",
        "CHASE_PASSWORD",
        "FALLBACK_TOKEN",
    ];
    let mut config = Config::new(dir, "creds")
        .set("keys", "primary", "k1")
        .daemon("shutdown_grace", "2s")
        .daemon("lease", "3s")
        .set("child_env", "inherit", inherit);
    for name in ["amazon", "chase", "reddit", "usaa"] {
        let upper = name.to_uppercase();
        config = config.connector(
            connector(name)
                .username_password(&format!("{upper}_USERNAME"), &format!("{upper}_PASSWORD")),
        );
    }
    config
        .connector(connector("github").static_secret("GITHUB_TOKEN"))
        .connector(
            connector("legacy")
                .username_password("LEGACY_USERNAME", "LEGACY_PASSWORD")
                .also_accepts_static_secret("LEGACY_PASSWORD"),
        )
        .connector(
            connector("fallback")
                .static_secret("FALLBACK_TOKEN")
                .set("allow_env_fallback", true),
        )
}

/// One run as a user sees it in `runs`.
#[derive(Debug, sqlx::FromRow)]
struct Run {
    id: i64,
    connection_id: String,
    trigger: String,
    attempt: i32,
    status: String,
    failure_kind: Option<String>,
    credential_id: Option<i64>,
    credential_source: Option<String>,
    pid: Option<i32>,
    started: bool,
    exit_code: Option<i32>,
}

/// A test's private world: a fresh database, a scratch directory holding
/// the config, the key made by `connectord keys generate`, and whatever the
/// stand-in records; plus every secret the test stored, for leak checks.
struct World {
    db: TestDb,
    dir: Scratch,
    config: PathBuf,
    secrets: Mutex<Vec<String>>,
}

impl World {
    async fn new() -> World {
        let db = TestDb::new().await;
        let dir = Scratch::new();
        let config = dir.path.join("connectord.toml");
        registry(&dir.path).write(&config);
        let keys = dir.path.join("keys");
        let keys = keys.to_str().expect("utf-8 path");
        let (code, out, err) = cli(
            &db,
            None,
            &["keys", "generate", "--id", "k1", "--dir", keys],
            "",
        );
        assert_eq!(code, 0, "keys generate: {out}{err}");
        World {
            db,
            dir,
            config,
            secrets: Mutex::new(Vec::new()),
        }
    }

    fn dir(&self) -> &Path {
        &self.dir.path
    }

    fn cli(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        cli(&self.db, Some(&self.config), args, stdin)
    }

    async fn start(&self, host_env: &[(&str, &str)]) -> Daemon {
        Daemon::start(&self.db, self.dir(), &registry(self.dir()), host_env).await
    }

    async fn add_connection(&self, id: &str, connector: &str) {
        self.db
            .exec(&format!(
                "insert into connections (id, connector) values ('{id}', '{connector}')"
            ))
            .await;
    }

    /// `connectord credentials set CONNECTION --kind KIND [--username U]`
    /// with the secret on stdin, as an operator types it (newline-ended).
    /// Returns the connection's active credential id afterwards.
    async fn set_credential(
        &self,
        connection: &str,
        kind: &str,
        username: Option<&str>,
        secret: &str,
    ) -> i64 {
        let mut args = vec!["credentials", "set", connection, "--kind", kind];
        if let Some(username) = username {
            args.extend(["--username", username]);
            self.secrets.lock().unwrap().push(username.to_owned());
        }
        self.secrets.lock().unwrap().push(secret.to_owned());
        let (code, out, err) = self.cli(&args, &format!("{secret}\n"));
        assert_eq!(code, 0, "credentials set {connection}: {out}{err}");
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "the CLI echoed the secret: {out}{err}"
        );
        self.active_credential(connection)
            .await
            .expect("an active credential after `credentials set`")
    }

    async fn active_credential(&self, connection: &str) -> Option<i64> {
        sqlx::query_scalar(
            "select id from credentials where connection_id = $1 and status = 'active'",
        )
        .bind(connection)
        .fetch_optional(&self.db.pool)
        .await
        .expect("credentials")
    }

    /// What the stand-in does for `connection` (see record-env.sh).
    fn behaviour(&self, connection: &str, behaviour: Option<&str>) {
        let path = self.dir().join(format!("behaviour.{connection}"));
        match behaviour {
            Some(b) => std::fs::write(path, b).expect("write behaviour"),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Queues one manual run per entry, with plain SQL as an operator would.
    async fn manual(&self, connections: &[&str]) {
        let values: Vec<String> = connections
            .iter()
            .map(|c| format!("('{c}', 'manual')"))
            .collect();
        self.db
            .exec(&format!(
                "insert into run_commands (connection_id, trigger) values {}",
                values.join(", ")
            ))
            .await;
    }

    async fn runs(&self, connection: &str) -> Vec<Run> {
        sqlx::query_as(
            "select id, connection_id, trigger, attempt, status, failure_kind, credential_id,
                    credential_source, pid, started_at is not null as started, exit_code
             from runs where connection_id = $1 order by id",
        )
        .bind(connection)
        .fetch_all(&self.db.pool)
        .await
        .expect("runs")
    }

    async fn run(&self, id: i64) -> Run {
        sqlx::query_as(
            "select id, connection_id, trigger, attempt, status, failure_kind, credential_id,
                    credential_source, pid, started_at is not null as started, exit_code
             from runs where id = $1",
        )
        .bind(id)
        .fetch_one(&self.db.pool)
        .await
        .expect("run")
    }

    fn env(&self, run_id: i64) -> BTreeMap<String, String> {
        recorded_env(self.dir(), run_id)
    }

    /// Hygiene (SPEC §4): no secret this test stored appears in the daemon's
    /// log, in any child's argv, in any column of `runs` or `interactions`,
    /// or in the stored ciphertext.
    async fn assert_no_leaks(&self, logs: &str) {
        let runs: String = self
            .db
            .scalar("select coalesce(string_agg(r::text, ' '), '') from runs r")
            .await;
        let interactions: String = self
            .db
            .scalar("select coalesce(string_agg(i::text, ' '), '') from interactions i")
            .await;
        let argvs: Vec<String> = recorded_runs(self.dir())
            .into_iter()
            .map(|id| self.env(id).remove("ARGV").unwrap_or_default())
            .collect();
        let secrets = self.secrets.lock().unwrap().clone();
        assert!(!secrets.is_empty(), "the test stored no secret to look for");
        for secret in &secrets {
            assert!(
                !logs.contains(secret.as_str()),
                "{secret:?} in the daemon log:\n{logs}"
            );
            assert!(
                !runs.contains(secret.as_str()),
                "{secret:?} in runs: {runs}"
            );
            assert!(
                !interactions.contains(secret.as_str()),
                "{secret:?} in interactions: {interactions}"
            );
            assert!(
                argvs.iter().all(|a| !a.contains(secret.as_str())),
                "{secret:?} in a child's argv: {argvs:?}"
            );
            let in_ciphertext: i64 = sqlx::query_scalar(
                "select count(*) from credentials where position(convert_to($1, 'UTF8') in ciphertext) > 0",
            )
            .bind(secret)
            .fetch_one(&self.db.pool)
            .await
            .expect("credentials");
            assert_eq!(in_ciphertext, 0, "{secret:?} stored in plaintext");
        }
    }

    /// Isolation (SPEC §4): every child that ran saw only its own
    /// connector's credential variables, none of another connection's
    /// secrets (`secrets` is connection → its stored values), and none of
    /// the `host_values` from the daemon's own environment.
    async fn assert_isolation(&self, secrets: &[(&str, &str)], host_values: &[&str]) {
        let recorded = recorded_runs(self.dir());
        assert!(!recorded.is_empty(), "no child ran");
        for run_id in recorded {
            let (connection, connector): (String, String) =
                sqlx::query_as("select connection_id, connector from runs where id = $1")
                    .bind(run_id)
                    .fetch_one(&self.db.pool)
                    .await
                    .expect("run of a recorded env");
            let env = self.env(run_id);
            for var in all_credential_vars() {
                if env.contains_key(var) {
                    assert!(
                        declared_vars(&connector).contains(&var),
                        "run {run_id} of {connection} ({connector}) received {var}: {env:?}"
                    );
                }
            }
            for (name, value) in &env {
                for (owner, secret) in secrets {
                    if *owner != connection {
                        assert!(
                            !value.contains(secret),
                            "run {run_id} of {connection} received {owner}'s secret in {name}"
                        );
                    }
                }
                for host in host_values {
                    assert!(
                        !value.contains(host),
                        "run {run_id} of {connection} received the host value {host:?} in {name}"
                    );
                }
            }
        }
    }
}

/// The variables of the daemon's own process, as the kernel holds them.
fn process_env(pid: u32) -> BTreeMap<String, String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).expect("daemon environ");
    bytes
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let text = String::from_utf8_lossy(entry);
            let (k, v) = text.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// `env` without the run metadata, which differs between runs by design.
fn without_run_meta(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(k, _)| !k.starts_with("CONNECTORD_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn sql_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
    format!("({})", quoted.join(", "))
}

/// The runs one connection made on each trigger.
#[derive(Debug)]
struct Triggered {
    scheduled: i64,
    manual: i64,
    retry: i64,
}

/// Starts a daemon with `host_env` and runs each connection on all three
/// triggers: a `* * * * * *` schedule until it has fired, then a manual run
/// whose first attempt fails (`fail-first`) so the retry policy runs it
/// again.
///
/// The schedules are written before the daemon starts: a schedule inserted
/// right after "connectord ready" can miss its NOTIFY (see the report on
/// `daemon::run`), and these tests are about credentials, not edit latency.
async fn run_on_every_trigger(
    w: &World,
    connections: &[&str],
    host_env: &[(&str, &str)],
) -> (Daemon, BTreeMap<String, Triggered>) {
    let list = sql_list(connections);
    let n = connections.len();
    for c in connections {
        w.db.exec(&format!(
            "insert into schedules (connection_id, cron) values ('{c}', '* * * * * *')"
        ))
        .await;
    }
    let daemon = w.start(host_env).await;
    w.db.wait_until(&format!(
        "select count(distinct connection_id) = {n} from runs
         where trigger = 'scheduled' and status <> 'running' and connection_id in {list}"
    ))
    .await;
    // Disabled first: a cleared next_fire_at shows the engine let go of the
    // schedule, so no tick fires after the delete.
    w.db.exec(&format!(
        "update schedules set enabled = false where connection_id in {list}"
    ))
    .await;
    w.db.wait_until(&format!(
        "select bool_and(next_fire_at is null) from schedules where connection_id in {list}"
    ))
    .await;
    w.db.exec(&format!(
        "delete from schedules where connection_id in {list}"
    ))
    .await;
    w.db.wait_until(&format!(
        "select not exists (select 1 from run_commands where status <> 'done' and connection_id in {list})
            and not exists (select 1 from runs where status = 'running' and connection_id in {list})"
    ))
    .await;

    for c in connections {
        w.behaviour(c, Some("fail-first"));
    }
    w.manual(connections).await;
    w.db.wait_until(&format!(
        "select count(*) = {n} from runs
         where trigger = 'manual' and status <> 'running' and connection_id in {list}"
    ))
    .await;
    let manual_failed: i64 =
        w.db.scalar(&format!(
            "select count(*) from runs where trigger = 'manual' and status = 'failed'
             and failure_kind = 'exit_nonzero' and exit_code = 7 and connection_id in {list}"
        ))
        .await;
    assert_eq!(
        manual_failed, n as i64,
        "every first manual attempt fails as the stand-in was told"
    );
    w.db.wait_until(&format!(
        "select count(*) = {n} from runs
         where trigger = 'retry' and status <> 'running' and connection_id in {list}"
    ))
    .await;
    for c in connections {
        w.behaviour(c, None);
    }

    let mut triggered = BTreeMap::new();
    for c in connections {
        let runs = w.runs(c).await;
        let pick = |trigger: &str, status: &str, attempt: i32| {
            runs.iter()
                .find(|r| r.trigger == trigger && r.status == status && r.attempt == attempt)
                .unwrap_or_else(|| panic!("{c}: no {status} {trigger} run: {runs:?}"))
                .id
        };
        triggered.insert(
            c.to_string(),
            Triggered {
                scheduled: pick("scheduled", "succeeded", 1),
                manual: pick("manual", "failed", 1),
                retry: pick("retry", "succeeded", 2),
            },
        );
    }
    (daemon, triggered)
}

/// The run started from the store with `credential_id`, and its child
/// received exactly `expected` among all credential variables.
async fn assert_injected(w: &World, run_id: i64, credential_id: i64, expected: &[(&str, &str)]) {
    let run = w.run(run_id).await;
    assert_eq!(run.credential_source.as_deref(), Some("store"), "{run:?}");
    assert_eq!(run.credential_id, Some(credential_id), "{run:?}");
    assert!(run.pid.is_some() && run.started, "{run:?}");
    let env = w.env(run_id);
    for (var, value) in expected {
        assert_eq!(
            env.get(*var).map(String::as_str),
            Some(*value),
            "run {run_id} ({}, {}) got the stored {var}",
            run.connection_id,
            run.trigger
        );
    }
    for var in all_credential_vars() {
        if !expected.iter().any(|(v, _)| *v == var) {
            assert!(
                !env.contains_key(var),
                "run {run_id} of {} received {var} it was not given",
                run.connection_id
            );
        }
    }
}

/// S1 with the connector's variable either absent from or empty in the
/// daemon's environment.
async fn static_secret_on_every_trigger(host_env: &[(&str, &str)], token: &str) {
    let w = World::new().await;
    w.add_connection("alice-github", "github").await;
    let credential = w
        .set_credential("alice-github", "static_secret", None, token)
        .await;
    let (daemon, runs) = run_on_every_trigger(&w, &["alice-github"], host_env).await;
    let daemon_env = process_env(daemon.pid());
    assert_eq!(
        daemon_env.get("GITHUB_TOKEN").map(String::as_str),
        host_env
            .iter()
            .find(|(k, _)| *k == "GITHUB_TOKEN")
            .map(|(_, v)| *v),
        "precondition: the daemon's own GITHUB_TOKEN is as the scenario says"
    );
    let runs = &runs["alice-github"];
    for run_id in [runs.scheduled, runs.manual, runs.retry] {
        assert_injected(&w, run_id, credential, &[("GITHUB_TOKEN", token)]).await;
    }
    let interactions: i64 = w.db.scalar("select count(*) from interactions").await;
    assert_eq!(interactions, 0, "no credentials_required was raised");
    let scheduled = without_run_meta(&w.env(runs.scheduled));
    assert_eq!(
        scheduled,
        without_run_meta(&w.env(runs.manual)),
        "a scheduled run's child sees what a manual run's child sees"
    );
    assert_eq!(scheduled, without_run_meta(&w.env(runs.retry)));
    assert_eq!(w.env(runs.scheduled)["CONNECTORD_TRIGGER"], "scheduled");
    assert_eq!(w.env(runs.retry)["CONNECTORD_ATTEMPT"], "2");
    w.assert_no_leaks(&daemon.logs()).await;
}

/// S1: a scheduled, a manual and a retry run of a static-secret connection
/// while GITHUB_TOKEN is absent from the daemon's environment all get the
/// stored token, raise no interaction, and see the same environment.
#[tokio::test(flavor = "multi_thread")]
async fn s1_static_secret_with_the_variable_absent_from_the_host() {
    static_secret_on_every_trigger(&[], "ghp-s1-absent-7Qx2").await;
}

/// S1: the same, while the daemon's own GITHUB_TOKEN is an empty string,
/// which must not shadow the stored value.
#[tokio::test(flavor = "multi_thread")]
async fn s1_static_secret_with_the_variable_empty_in_the_host() {
    static_secret_on_every_trigger(&[("GITHUB_TOKEN", "")], "ghp-s1-empty-9Kd4").await;
}

/// S2 for Amazon, Chase, Reddit and USAA in one daemon, whose environment
/// holds `host_value` for every deployment-wide credential variable: each
/// connection gets its own stored username and password on every trigger,
/// is never asked to reconnect, and no child sees another's secret.
async fn username_password_on_every_trigger(host_value: &str) {
    let w = World::new().await;
    let connectors = ["amazon", "chase", "reddit", "usaa"];
    let mut secrets = Vec::new();
    let mut credentials = BTreeMap::new();
    for connector in connectors {
        let connection = format!("alice-{connector}");
        let username = format!("alice.{connector}@example.test");
        let password = format!("pw-{connector}-S2-{}", connector.len() * 7919);
        w.add_connection(&connection, connector).await;
        let id = w
            .set_credential(&connection, "username_password", Some(&username), &password)
            .await;
        credentials.insert(connector, (id, username, password));
    }
    let mut host: Vec<(String, String)> = connectors
        .iter()
        .flat_map(|c| declared_vars(c).iter())
        .map(|var| (var.to_string(), host_value.to_owned()))
        .collect();
    host.push(("GITHUB_TOKEN".into(), "host-github-token-S2".into()));
    let host_env: Vec<(&str, &str)> = host.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let connections: Vec<String> = connectors.iter().map(|c| format!("alice-{c}")).collect();
    let names: Vec<&str> = connections.iter().map(String::as_str).collect();
    let (daemon, runs) = run_on_every_trigger(&w, &names, &host_env).await;
    assert_eq!(
        process_env(daemon.pid())
            .get("CHASE_PASSWORD")
            .map(String::as_str),
        Some(host_value),
        "precondition: the daemon holds deployment-wide values"
    );
    for connector in connectors {
        let (id, username, password) = &credentials[connector];
        let vars = declared_vars(connector);
        let triggered = &runs[&format!("alice-{connector}")];
        for run_id in [triggered.scheduled, triggered.manual, triggered.retry] {
            assert_injected(
                &w,
                run_id,
                *id,
                &[(vars[0], username.as_str()), (vars[1], password.as_str())],
            )
            .await;
        }
        secrets.push((format!("alice-{connector}"), password.clone()));
        secrets.push((format!("alice-{connector}"), username.clone()));
    }
    let interactions: i64 = w.db.scalar("select count(*) from interactions").await;
    assert_eq!(interactions, 0, "nobody was asked to reconnect");
    let secrets: Vec<(&str, &str)> = secrets
        .iter()
        .map(|(c, s)| (c.as_str(), s.as_str()))
        .collect();
    let mut host_values = vec!["host-github-token-S2"];
    if !host_value.is_empty() {
        host_values.push(host_value);
    }
    w.assert_isolation(&secrets, &host_values).await;
    w.assert_no_leaks(&daemon.logs()).await;
}

/// S2 while the daemon's environment holds empty deployment-wide values
/// (CHASE_USERNAME="" and so on).
#[tokio::test(flavor = "multi_thread")]
async fn s2_username_password_with_empty_host_values() {
    username_password_on_every_trigger("").await;
}

/// S2 while the daemon's environment holds stale non-empty deployment-wide
/// values (CHASE_PASSWORD="stale-deploy-value" and so on).
#[tokio::test(flavor = "multi_thread")]
async fn s2_username_password_with_stale_host_values() {
    username_password_on_every_trigger("stale-deploy-value").await;
}

/// S3: revoked, deleted, unknown-key, tampered and copied-ciphertext
/// credentials each refuse the launch with their typed failure, no child,
/// no retry, and no fallback to the daemon's non-empty GITHUB_TOKEN. A
/// credential revoked after successful runs is refused on the very next run
/// of the same daemon process (nothing cached).
#[tokio::test(flavor = "multi_thread")]
async fn s3_unresolvable_credentials_refuse_the_launch() {
    let w = World::new().await;
    let cases = [
        ("gh-revoked", "credential_revoked"),
        ("gh-deleted", "credential_deleted"),
        ("gh-unknown-key", "credential_unrecoverable"),
        ("gh-tampered", "credential_unrecoverable"),
        ("gh-copied", "credential_unrecoverable"),
    ];
    let mut secrets = Vec::new();
    for name in ["gh-source", "gh-cached"]
        .into_iter()
        .chain(cases.iter().map(|(c, _)| *c))
    {
        w.add_connection(name, "github").await;
        let token = format!("ghp-{name}-S3-secret");
        w.set_credential(name, "static_secret", None, &token).await;
        secrets.push((name, token));
    }
    let (code, out, err) = w.cli(&["credentials", "revoke", "gh-revoked"], "");
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = w.cli(&["credentials", "delete", "gh-deleted"], "");
    assert_eq!(code, 0, "{out}{err}");
    w.db.exec(
        "update credentials set key_id = 'k9' where connection_id = 'gh-unknown-key';
         update credentials set ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1)
             where connection_id = 'gh-tampered';
         update credentials c set nonce = s.nonce, ciphertext = s.ciphertext
             from credentials s
             where s.connection_id = 'gh-source' and c.connection_id = 'gh-copied';",
    )
    .await;
    let host_token = "host-github-token-must-not-be-used";
    let daemon = w.start(&[("GITHUB_TOKEN", host_token)]).await;

    // Successful runs first, so a cache would have something to serve.
    for round in 1..=2 {
        w.manual(&["gh-cached"]).await;
        w.db.wait_until(&format!(
            "select count(*) = {round} from runs where connection_id = 'gh-cached' and status = 'succeeded'"
        ))
        .await;
    }
    let (code, out, err) = w.cli(&["credentials", "revoke", "gh-cached"], "");
    assert_eq!(code, 0, "{out}{err}");
    w.manual(&["gh-cached"]).await;
    w.db.wait_until(
        "select count(*) = 3 from runs where connection_id = 'gh-cached' and status <> 'running'",
    )
    .await;
    let cached = w.runs("gh-cached").await;
    let last = cached.last().expect("runs of gh-cached");
    assert_eq!(
        (last.status.as_str(), last.failure_kind.as_deref()),
        ("refused", Some("credential_revoked")),
        "a credential revoked after successful runs is refused: {cached:?}"
    );
    assert!(!recorded_runs(w.dir()).contains(&last.id));
    for run in &cached[..2] {
        assert_eq!(w.env(run.id)["GITHUB_TOKEN"], "ghp-gh-cached-S3-secret");
    }

    let names: Vec<&str> = cases.iter().map(|(c, _)| *c).collect();
    w.manual(&names).await;
    w.db.wait_until(&format!(
        "select count(*) = {} from runs where status <> 'running' and connection_id in {}",
        names.len(),
        sql_list(&names)
    ))
    .await;
    let recorded = recorded_runs(w.dir());
    for (connection, kind) in cases {
        let runs = w.runs(connection).await;
        assert_eq!(runs.len(), 1, "{connection}: {runs:?}");
        let run = &runs[0];
        assert_eq!(
            (run.status.as_str(), run.failure_kind.as_deref()),
            ("refused", Some(kind)),
            "{connection}: {run:?}"
        );
        assert!(
            run.pid.is_none() && !run.started && run.exit_code.is_none(),
            "{connection}: a refused run has no child: {run:?}"
        );
        assert!(
            !recorded.contains(&run.id),
            "{connection}: the stand-in ran for a refused run"
        );
    }
    let retries: i64 =
        w.db.scalar("select count(*) from run_commands where trigger = 'retry'")
            .await;
    assert_eq!(retries, 0, "refusals are not retried");
    let secrets: Vec<(&str, &str)> = secrets.iter().map(|(c, s)| (*c, s.as_str())).collect();
    w.assert_isolation(&secrets, &[host_token]).await;
    w.assert_no_leaks(&daemon.logs()).await;
}

/// Missing, revoked and deleted credentials open exactly one open
/// `credentials_required` interaction per connection however many runs are
/// refused; unrecoverable and kind-mismatched ones open none and are logged
/// at ERROR. `credentials set` resolves the open interaction and the next
/// run succeeds with the new value.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_ask_the_owner_once_and_setting_a_credential_answers() {
    let w = World::new().await;
    for name in [
        "i-missing",
        "i-revoked",
        "i-deleted",
        "i-tampered",
        "i-mismatch",
    ] {
        w.add_connection(name, "github").await;
    }
    for name in ["i-revoked", "i-deleted", "i-tampered", "i-mismatch"] {
        w.set_credential(name, "static_secret", None, &format!("ghp-{name}-old"))
            .await;
    }
    assert_eq!(w.cli(&["credentials", "revoke", "i-revoked"], "").0, 0);
    assert_eq!(w.cli(&["credentials", "delete", "i-deleted"], "").0, 0);
    // A migration moved i-mismatch to a connector that takes
    // username_password, leaving its static_secret behind.
    w.db.exec(
        "update credentials set ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1)
             where connection_id = 'i-tampered';
         update connections set connector = 'chase' where id = 'i-mismatch';",
    )
    .await;
    let daemon = w.start(&[]).await;
    let all = [
        "i-missing",
        "i-revoked",
        "i-deleted",
        "i-tampered",
        "i-mismatch",
    ];
    let thrice: Vec<&str> = all.iter().flat_map(|c| [*c; 3]).collect();
    w.manual(&thrice).await;
    w.db.wait_until("select count(*) = 15 from runs where status = 'refused'")
        .await;

    let interactions: Vec<(String, String, String, i64)> = sqlx::query_as(
        "select connection_id, kind, status, count(*) over (partition by connection_id)
         from interactions order by connection_id",
    )
    .fetch_all(&w.db.pool)
    .await
    .expect("interactions");
    let expected: Vec<(String, String, String, i64)> = ["i-deleted", "i-missing", "i-revoked"]
        .iter()
        .map(|c| {
            (
                c.to_string(),
                "credentials_required".into(),
                "open".into(),
                1,
            )
        })
        .collect();
    assert_eq!(
        interactions, expected,
        "one open interaction per connection needing its owner"
    );

    let logs = daemon.logs();
    for (connection, kind) in [
        ("i-tampered", "credential_unrecoverable"),
        ("i-mismatch", "credential_kind_mismatch"),
    ] {
        let refusals = w.runs(connection).await;
        assert!(
            refusals
                .iter()
                .all(|r| r.failure_kind.as_deref() == Some(kind)),
            "{connection}: {refusals:?}"
        );
        let logged = logs.lines().any(|line| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                return false;
            };
            v["level"] == "ERROR" && v["failure_kind"] == kind && line.contains(connection)
        });
        assert!(logged, "{connection}: {kind} logged at ERROR:\n{logs}");
        let recorded = recorded_runs(w.dir());
        assert!(refusals.iter().all(|r| !recorded.contains(&r.id)));
    }

    let mut fresh = BTreeMap::new();
    for name in ["i-missing", "i-revoked", "i-deleted"] {
        let token = format!("ghp-{name}-new");
        let id = w.set_credential(name, "static_secret", None, &token).await;
        fresh.insert(name, (id, token));
    }
    let open: i64 = w
        .db
        .scalar("select count(*) from interactions where status = 'open' or resolved_at is null")
        .await;
    assert_eq!(
        open, 0,
        "setting a credential resolves the open interaction"
    );
    let resolved: i64 =
        w.db.scalar("select count(*) from interactions where status = 'resolved'")
            .await;
    assert_eq!(resolved, 3);
    w.manual(&["i-missing", "i-revoked", "i-deleted"]).await;
    w.db.wait_until(
        "select count(*) = 3 from runs where trigger = 'manual' and status <> 'refused' and status <> 'running'",
    )
    .await;
    for (name, (id, token)) in &fresh {
        let run = w.runs(name).await.pop().expect("a run");
        assert_eq!(run.status, "succeeded", "{name}: {run:?}");
        assert_injected(&w, run.id, *id, &[("GITHUB_TOKEN", token.as_str())]).await;
    }
    w.assert_no_leaks(&daemon.logs()).await;
}

/// R3: a Chase connection whose stored credential is a static_secret (Chase
/// accepts only username_password) is refused `credential_kind_mismatch`
/// without a child, and `check` reports exactly that defect. The `legacy`
/// connector explicitly accepts a static_secret variant: it gets
/// LEGACY_PASSWORD and no LEGACY_USERNAME.
#[tokio::test(flavor = "multi_thread")]
async fn r3_kind_mismatch_is_refused_and_reported_unless_accepted() {
    let w = World::new().await;
    // Stored while the connection was a github one; a migration then moved
    // it to chase without converting the credential.
    w.add_connection("bob-chase", "github").await;
    let mismatched = w
        .set_credential("bob-chase", "static_secret", None, "chase-token-R3")
        .await;
    w.db.exec("update connections set connector = 'chase' where id = 'bob-chase'")
        .await;
    w.add_connection("bob-legacy", "legacy").await;
    let legacy_static = w
        .set_credential("bob-legacy", "static_secret", None, "legacy-pw-R3-static")
        .await;
    w.add_connection("carol-legacy", "legacy").await;
    let legacy_pair = w
        .set_credential(
            "carol-legacy",
            "username_password",
            Some("carol.legacy@example.test"),
            "legacy-pw-R3-pair",
        )
        .await;

    let (code, out, err) = w.cli(&["check"], "");
    assert_ne!(code, 0, "check finds the mismatch:\n{out}{err}");
    let defects: Vec<&str> = out.lines().filter(|l| l.starts_with("DEFECT")).collect();
    assert_eq!(
        defects.len(),
        1,
        "only the mismatch is a defect:\n{out}{err}"
    );
    assert!(
        defects[0].contains("credential_kind_mismatch")
            && defects[0].contains("bob-chase")
            && defects[0].contains(&format!("credential {mismatched}")),
        "{}",
        defects[0]
    );

    let daemon = w.start(&[]).await;
    w.manual(&["bob-chase", "bob-legacy", "carol-legacy"]).await;
    w.db.wait_until("select count(*) = 3 from runs where status <> 'running'")
        .await;
    let chase = &w.runs("bob-chase").await[0];
    assert_eq!(
        (chase.status.as_str(), chase.failure_kind.as_deref()),
        ("refused", Some("credential_kind_mismatch")),
        "{chase:?}"
    );
    assert!(chase.pid.is_none() && !chase.started && !recorded_runs(w.dir()).contains(&chase.id));
    let interactions: i64 = w.db.scalar("select count(*) from interactions").await;
    assert_eq!(interactions, 0, "a migration defect does not ask the owner");

    let legacy = &w.runs("bob-legacy").await[0];
    assert_eq!(legacy.status, "succeeded", "{legacy:?}");
    assert_injected(
        &w,
        legacy.id,
        legacy_static,
        &[("LEGACY_PASSWORD", "legacy-pw-R3-static")],
    )
    .await;
    let carol = &w.runs("carol-legacy").await[0];
    assert_eq!(carol.status, "succeeded", "{carol:?}");
    assert_injected(
        &w,
        carol.id,
        legacy_pair,
        &[
            ("LEGACY_USERNAME", "carol.legacy@example.test"),
            ("LEGACY_PASSWORD", "legacy-pw-R3-pair"),
        ],
    )
    .await;
    w.assert_no_leaks(&daemon.logs()).await;
}

/// Isolation: connections of five connectors run side by side while the
/// daemon's environment sets every credential variable: each child sees
/// its own stored values only, no other connection's secret and no
/// credential variable of another connector.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_sees_only_its_own_connections_credential() {
    let w = World::new().await;
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (connection, connector) in [
        ("dan-amazon", "amazon"),
        ("dan-chase", "chase"),
        ("erin-chase", "chase"),
        ("dan-reddit", "reddit"),
        ("dan-github", "github"),
    ] {
        w.add_connection(connection, connector).await;
        let secret = format!("{connection}-secret-iso");
        if connector == "github" {
            w.set_credential(connection, "static_secret", None, &secret)
                .await;
        } else {
            let username = format!("{connection}-user-iso");
            w.set_credential(connection, "username_password", Some(&username), &secret)
                .await;
            secrets.push((connection.to_owned(), username));
        }
        secrets.push((connection.to_owned(), secret));
    }
    let host: Vec<(String, String)> = all_credential_vars()
        .map(|v| (v.to_owned(), format!("host-{v}-iso")))
        .collect();
    let host_env: Vec<(&str, &str)> = host.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = w.start(&host_env).await;
    let connections = [
        "dan-amazon",
        "dan-chase",
        "erin-chase",
        "dan-reddit",
        "dan-github",
    ];
    w.manual(&connections).await;
    w.manual(&connections).await;
    w.db.wait_until("select count(*) = 10 from runs where status = 'succeeded'")
        .await;
    let github = w.runs("dan-github").await;
    let env = w.env(github[0].id);
    assert_eq!(env["GITHUB_TOKEN"], "dan-github-secret-iso");
    assert!(
        !env.keys()
            .any(|k| k.starts_with("CHASE_") || k.starts_with("AMAZON_")),
        "{env:?}"
    );
    let erin = w.env(w.runs("erin-chase").await[0].id);
    assert_eq!(erin["CHASE_USERNAME"], "erin-chase-user-iso");
    assert_eq!(erin["CHASE_PASSWORD"], "erin-chase-secret-iso");
    let secrets: Vec<(&str, &str)> = secrets
        .iter()
        .map(|(c, s)| (c.as_str(), s.as_str()))
        .collect();
    let host_values: Vec<&str> = host.iter().map(|(_, v)| v.as_str()).collect();
    w.assert_isolation(&secrets, &host_values).await;
    w.assert_no_leaks(&daemon.logs()).await;
}

/// Fallback (SPEC §4): only a connector with `allow_env_fallback`, and only
/// for a connection with no credential rows at all, passes the daemon's
/// non-empty value through, recorded as `process_env` with a WARN. A
/// revoked row on the same connector is refused, and a connector without
/// the flag is refused `credential_missing` though the host has a value.
#[tokio::test(flavor = "multi_thread")]
async fn env_fallback_only_when_allowed_and_nothing_is_stored() {
    let w = World::new().await;
    w.add_connection("fb-none", "fallback").await;
    w.add_connection("fb-revoked", "fallback").await;
    w.add_connection("gh-none", "github").await;
    w.set_credential(
        "fb-revoked",
        "static_secret",
        None,
        "fb-stored-then-revoked",
    )
    .await;
    assert_eq!(w.cli(&["credentials", "revoke", "fb-revoked"], "").0, 0);
    let daemon = w
        .start(&[
            ("FALLBACK_TOKEN", "from-host"),
            ("GITHUB_TOKEN", "gh-from-host"),
        ])
        .await;
    w.manual(&["fb-none", "fb-revoked", "gh-none"]).await;
    w.db.wait_until("select count(*) = 3 from runs where status <> 'running'")
        .await;

    let fb = &w.runs("fb-none").await[0];
    assert_eq!(fb.status, "succeeded", "{fb:?}");
    assert_eq!(fb.credential_source.as_deref(), Some("process_env"));
    assert_eq!(fb.credential_id, None);
    assert_eq!(w.env(fb.id)["FALLBACK_TOKEN"], "from-host");
    let logs = daemon.logs();
    assert!(
        logs.lines().any(|l| l.contains("\"level\":\"WARN\"")
            && l.contains("allow_env_fallback")
            && l.contains("fb-none")),
        "the fallback is logged at WARN:\n{logs}"
    );
    let runs: String =
        w.db.scalar("select string_agg(r::text, ' ') from runs r")
            .await;
    assert!(
        !logs.contains("from-host") && !runs.contains("from-host"),
        "the passed-through value is a secret too"
    );

    let recorded = recorded_runs(w.dir());
    for (connection, kind) in [
        ("fb-revoked", "credential_revoked"),
        ("gh-none", "credential_missing"),
    ] {
        let run = &w.runs(connection).await[0];
        assert_eq!(
            (run.status.as_str(), run.failure_kind.as_deref()),
            ("refused", Some(kind)),
            "{connection}: {run:?}"
        );
        assert!(run.pid.is_none() && !run.started && !recorded.contains(&run.id));
    }
    w.assert_no_leaks(&logs).await;
}

/// Child protocol (SPEC §6): a child that prints a `credentials_required`
/// interaction and exits 1 fails the run `interaction_required`, is not
/// retried, and opens one interaction, still one after it happens again.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_raising_an_interaction_asks_the_owner_without_retry() {
    let w = World::new().await;
    w.add_connection("pat-github", "github").await;
    w.set_credential("pat-github", "static_secret", None, "ghp-pat-protocol")
        .await;
    w.behaviour("pat-github", Some("interaction"));
    let daemon = w.start(&[]).await;
    w.manual(&["pat-github"]).await;
    w.db.wait_until("select count(*) = 1 from runs where status <> 'running'")
        .await;
    let run = &w.runs("pat-github").await[0];
    assert_eq!(
        (
            run.status.as_str(),
            run.failure_kind.as_deref(),
            run.exit_code
        ),
        ("failed", Some("interaction_required"), Some(1)),
        "{run:?}"
    );
    assert_eq!(w.env(run.id)["GITHUB_TOKEN"], "ghp-pat-protocol");
    let retries: i64 =
        w.db.scalar("select count(*) from run_commands where trigger = 'retry'")
            .await;
    assert_eq!(retries, 0, "interaction_required is not retried");
    let open: Vec<(String, Option<i64>)> = sqlx::query_as(
        "select kind, run_id from interactions where status = 'open' and connection_id = 'pat-github'",
    )
    .fetch_all(&w.db.pool)
    .await
    .expect("interactions");
    assert_eq!(open, [("credentials_required".to_owned(), Some(run.id))]);

    w.manual(&["pat-github"]).await;
    w.db.wait_until("select count(*) = 2 from runs where status <> 'running'")
        .await;
    let count: i64 = w.db.scalar("select count(*) from interactions").await;
    assert_eq!(count, 1, "the interaction is deduplicated");
    w.assert_no_leaks(&daemon.logs()).await;
}

/// CLI: `credentials set` refuses an empty secret and a username_password
/// without `--username`, storing nothing; setting twice leaves one active
/// credential and the older one revoked; revoke and delete keep the rows.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_cli_set_revoke_delete() {
    let w = World::new().await;
    w.add_connection("cli-github", "github").await;
    w.add_connection("cli-chase", "chase").await;
    let count = |sql: &'static str| w.db.scalar::<i64>(sql);

    for stdin in ["", "\n"] {
        let (code, out, err) = w.cli(
            &[
                "credentials",
                "set",
                "cli-github",
                "--kind",
                "static_secret",
            ],
            stdin,
        );
        assert_ne!(code, 0, "an empty secret is refused: {out}{err}");
    }
    let (code, out, err) = w.cli(
        &[
            "credentials",
            "set",
            "cli-chase",
            "--kind",
            "username_password",
        ],
        "chase-pw-without-user\n",
    );
    assert_ne!(code, 0, "username_password needs --username: {out}{err}");
    assert!(
        !out.contains("chase-pw-without-user") && !err.contains("chase-pw-without-user"),
        "{out}{err}"
    );
    assert_eq!(count("select count(*) from credentials").await, 0);

    let first = w
        .set_credential("cli-github", "static_secret", None, "ghp-cli-first")
        .await;
    let second = w
        .set_credential("cli-github", "static_secret", None, "ghp-cli-second")
        .await;
    assert_ne!(first, second);
    let rows = credential_rows(&w, "revoked_at").await;
    assert_eq!(
        rows,
        [
            (first, "revoked".into(), true),
            (second, "active".into(), false)
        ]
    );

    let (code, out, err) = w.cli(&["credentials", "revoke", "cli-github"], "");
    assert_eq!(code, 0, "{out}{err}");
    let rows = credential_rows(&w, "revoked_at").await;
    assert_eq!(
        rows,
        [
            (first, "revoked".into(), true),
            (second, "revoked".into(), true)
        ]
    );
    let (code, _, _) = w.cli(&["credentials", "revoke", "cli-github"], "");
    assert_ne!(code, 0, "nothing active is left to revoke");

    let (code, out, err) = w.cli(&["credentials", "delete", "cli-github"], "");
    assert_eq!(code, 0, "{out}{err}");
    let rows = credential_rows(&w, "deleted_at").await;
    assert_eq!(
        rows,
        [
            (first, "deleted".into(), true),
            (second, "deleted".into(), true)
        ],
        "delete keeps the rows"
    );
    w.assert_no_leaks("").await;
}

/// Every credential row as (id, status, whether `stamp` is set), oldest
/// first.
async fn credential_rows(w: &World, stamp: &str) -> Vec<(i64, String, bool)> {
    sqlx::query_as(&format!(
        "select id, status, {stamp} is not null from credentials order by id"
    ))
    .fetch_all(&w.db.pool)
    .await
    .expect("credentials")
}

/// Keys (SPEC §5): `keys generate` writes a 0600 file; a key directory
/// holding a group-readable key stops `connectord run` at once with an
/// error naming the file and its mode.
#[tokio::test(flavor = "multi_thread")]
async fn key_files_must_be_private() {
    let w = World::new().await;
    let key = w.dir().join("keys/k1.key");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o600, "keys generate writes mode 0600");
    assert_eq!(std::fs::metadata(&key).expect("key file").len(), 32);

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let run = tokio::process::Command::new(support::binary())
        .arg("--config")
        .arg(&w.config)
        .arg("run")
        .env("DATABASE_URL", &w.db.url)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the daemon started despite a group-readable key")
        .expect("run connectord");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("0640"),
        "the error names the file and its mode: {stderr}"
    );
}

/// Seals `plaintext` for credential `id` as releases did before the
/// connector was part of the associated data, with the key file itself.
fn seal_first_layout(
    key_file: &Path,
    connection: &str,
    id: i64,
    plaintext: &connectord::credentials::secret::Plaintext,
) -> (Vec<u8>, Vec<u8>) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let bytes = std::fs::read(key_file).expect("read key");
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("key"));
    let aad =
        connectord::credentials::keys::associated_data(&connectord::credentials::keys::Binding {
            connection_id: connection,
            credential_id: id,
            kind: plaintext.kind().as_str(),
            key_id: "k1",
            connector: None,
        });
    let nonce = [7u8; 12];
    let mut buf = plaintext.encode().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .expect("seal");
    (nonce.to_vec(), buf)
}

/// A credential is bound to the connector it was stored for: pointing its
/// connection at another site's connector with SQL refuses the launch
/// (whatever `sealed_for` is made to say), and so do an unbound row that
/// does not decrypt as one and a ciphertext longer than any credential.
/// Rows stored before the binding are re-encrypted at the daemon's start
/// and keep working. `check` names each defect, and storing the
/// credential again for the new connector is the way back.
#[tokio::test(flavor = "multi_thread")]
async fn a_credential_goes_only_to_the_connector_it_was_stored_for() {
    use connectord::credentials::secret::{Plaintext, Secret};
    let w = World::new().await;
    for (id, connector) in [
        ("chase-1", "chase"),
        ("chase-2", "chase"),
        ("nulled", "chase"),
        ("before", "chase"),
        ("huge", "github"),
    ] {
        w.add_connection(id, connector).await;
    }
    w.set_credential("chase-1", "username_password", Some("ann"), "chase-pw-1")
        .await;
    w.set_credential("chase-2", "username_password", Some("bob"), "chase-pw-2")
        .await;
    w.set_credential("nulled", "username_password", Some("cy"), "chase-pw-3")
        .await;
    w.set_credential("huge", "static_secret", None, "ghp-huge")
        .await;
    // A row as stored before credentials were bound to their connector.
    let id: i64 =
        w.db.scalar("select nextval(pg_get_serial_sequence('credentials', 'id'))")
            .await;
    let old = Plaintext::UsernamePassword {
        username: Secret::new("dee".to_owned()),
        password: Secret::new("chase-pw-before".to_owned()),
    };
    let (nonce, ciphertext) = seal_first_layout(&w.dir().join("keys/k1.key"), "before", id, &old);
    sqlx::query(
        "insert into credentials (id, connection_id, kind, key_id, nonce, ciphertext)
         values ($1, 'before', 'username_password', 'k1', $2, $3)",
    )
    .bind(id)
    .bind(&nonce)
    .bind(&ciphertext)
    .execute(&w.db.pool)
    .await
    .expect("insert an unbound credential");
    w.db.exec(
        "update connections set connector = 'amazon' where id in ('chase-1', 'chase-2');
         update credentials set sealed_for = 'amazon' where connection_id = 'chase-2';
         update credentials set sealed_for = null where connection_id = 'nulled';
         update credentials set ciphertext = ciphertext || decode(repeat('00', 300000), 'hex')
             where connection_id = 'huge';",
    )
    .await;

    let (code, out, err) = w.cli(&["check"], "");
    assert_ne!(code, 0, "{out}{err}");
    let report = format!("{out}{err}");
    for expected in [
        "of chase-1 was stored for connector chase, but the connection names amazon",
        "of nulled is not bound to its connector yet",
        "of before is not bound to its connector yet",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }

    let daemon = w.start(&[]).await;
    let (sealed_for, bound_nonce): (Option<String>, Vec<u8>) =
        sqlx::query_as("select sealed_for, nonce from credentials where id = $1")
            .bind(id)
            .fetch_one(&w.db.pool)
            .await
            .expect("the unbound row");
    assert_eq!(sealed_for.as_deref(), Some("chase"));
    assert_ne!(bound_nonce, nonce, "re-encrypted under a fresh nonce");
    let nulled: Option<String> =
        w.db.scalar("select sealed_for from credentials where connection_id = 'nulled'")
            .await;
    assert_eq!(
        nulled, None,
        "a bound row passed off as unbound stays refused"
    );

    let all = ["chase-1", "chase-2", "nulled", "before", "huge"];
    w.manual(&all).await;
    w.db.wait_until(&format!(
        "select count(*) = 5 from runs where status <> 'running' and connection_id in {}",
        sql_list(&all)
    ))
    .await;
    let recorded = recorded_runs(w.dir());
    for (connection, detail) in [
        (
            "chase-1",
            "was stored for connector chase, but the connection now names amazon",
        ),
        ("chase-2", "does not authenticate"),
        (
            "nulled",
            "stored before credentials were bound to their connector",
        ),
        ("huge", "longer than any credential can be"),
    ] {
        let (status, kind, text): (String, String, String) = sqlx::query_as(
            "select status, failure_kind, failure_detail from runs where connection_id = $1",
        )
        .bind(connection)
        .fetch_one(&w.db.pool)
        .await
        .expect("run");
        assert_eq!(
            (status.as_str(), kind.as_str()),
            ("refused", "credential_unrecoverable"),
            "{connection}: {text}"
        );
        assert!(text.contains(detail), "{connection}: {text}");
    }
    let before = &w.runs("before").await[0];
    assert_eq!(before.status, "succeeded", "{before:?}");
    assert_eq!(
        recorded,
        vec![before.id],
        "only the bound row reached a child"
    );
    let env = w.env(before.id);
    assert_eq!(env["CHASE_USERNAME"], "dee");
    assert_eq!(env["CHASE_PASSWORD"], "chase-pw-before");
    let logs = daemon.logs();
    assert!(
        logs.contains("re-encrypted credentials stored before they were bound"),
        "{logs}"
    );

    // Storing the credential again is how a connection changes connector.
    w.set_credential("chase-1", "username_password", Some("ann"), "amazon-pw-1")
        .await;
    w.manual(&["chase-1"]).await;
    w.db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'chase-1' and status = 'succeeded'",
    )
    .await;
    let run = w.runs("chase-1").await.pop().expect("run");
    let env = w.env(run.id);
    assert_eq!(env["AMAZON_USERNAME"], "ann");
    assert_eq!(env["AMAZON_PASSWORD"], "amazon-pw-1");
    assert!(!env.values().any(|v| v.contains("chase-pw-1")));
    w.secrets.lock().unwrap().push("chase-pw-before".to_owned());
    w.assert_no_leaks(&daemon.logs()).await;
}

/// `--username -` takes the username from stdin's first line and the
/// password from the rest, so neither is in argv; the child gets both.
/// Without a second line, nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn username_and_password_both_from_stdin() {
    let w = World::new().await;
    w.add_connection("eve-usaa", "usaa").await;
    let set = |stdin: &str| {
        let args = [
            "credentials",
            "set",
            "eve-usaa",
            "--kind",
            "username_password",
        ];
        w.cli(&[&args[..], &["--username", "-"]].concat(), stdin)
    };
    let (code, out, err) = set("only-a-username");
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("first line"), "{err}");
    assert_eq!(w.active_credential("eve-usaa").await, None);
    let (code, out, err) = set("eve@example.test\r\npass word\nwith a newline\n");
    assert_eq!(code, 0, "{out}{err}");
    w.secrets
        .lock()
        .unwrap()
        .extend(["eve@example.test".to_owned(), "with a newline".to_owned()]);
    let _daemon = w.start(&[]).await;
    w.manual(&["eve-usaa"]).await;
    w.db.wait_until("select count(*) = 1 from runs where status = 'succeeded'")
        .await;
    let run = &w.runs("eve-usaa").await[0];
    let env = w.env(run.id);
    assert_eq!(env["USAA_USERNAME"], "eve@example.test");
    assert_eq!(env["USAA_PASSWORD"], "pass word\nwith a newline");
}
