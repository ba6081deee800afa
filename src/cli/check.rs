//! `connectord check`: the operator's doctor. Every finding is one line
//! naming what is wrong and where; any defect makes the exit status
//! non-zero.

use std::os::unix::fs::PermissionsExt;

use serde::Serialize;

use super::exit;
use crate::admin;
use crate::config::Config;
use crate::run::child_env::{ChildEnv, RunMeta};
use crate::sandbox::SandboxState;
use crate::vocabulary::Trigger;

/// One finding.
#[derive(Debug, Serialize)]
struct Finding {
    ok: bool,
    area: &'static str,
    message: String,
}

#[derive(Default)]
struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, area: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            ok: true,
            area,
            message: message.into(),
        });
    }

    fn defect(&mut self, area: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            ok: false,
            area,
            message: message.into(),
        });
    }
}

pub(crate) async fn run(config: &Config, json: bool) -> anyhow::Result<u8> {
    let mut report = Report::default();
    report.ok(
        "config",
        format!(
            "config parsed; {} connector(s) in the registry",
            config.connectors.len()
        ),
    );
    for (name, connector) in &config.connectors {
        let not_executable = || {
            format!(
                "connector {name}: {} is not an executable file",
                connector.command.display()
            )
        };
        // Found as the spawn finds it, through the PATH its child gets (the
        // connector's `env` or `inherit`, as `ChildEnv` builds it); a match
        // without execute permission is what the search reports as EACCES.
        let meta = RunMeta {
            run_id: 0,
            connection_id: "",
            trigger: Trigger::Manual,
            attempt: 1,
            private: None,
            state_file: None,
        };
        let child_env = ChildEnv::build(config, connector, &meta, Vec::new(), |name| {
            std::env::var_os(name)
        });
        let found = crate::run::spawn::find_program(&connector.command, child_env.plain("PATH"));
        let problem = match found.map(std::fs::metadata) {
            Ok(Ok(meta)) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => None,
            Ok(Ok(_)) => Some(not_executable()),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => Some(not_executable()),
            Ok(Err(e)) | Err(e) => Some(format!(
                "connector {name}: {}: {e}",
                connector.command.display()
            )),
        };
        if let Some(problem) = problem {
            report.defect("registry", problem);
        }
        for (key, paths) in [
            ("read_write_paths", &connector.read_write_paths),
            ("read_only_paths", &connector.read_only_paths),
        ] {
            for path in paths {
                if let Err(e) = std::fs::metadata(path) {
                    report.defect(
                        "sandbox",
                        format!("connector {name}: {key}: {}: {e}", path.display()),
                    );
                }
            }
        }
    }
    match SandboxState::start(config).await {
        SandboxState::Ready(sandbox) => report.ok(
            "sandbox",
            format!(
                "connector children run in the sandbox ({} works here)",
                sandbox.bwrap().display()
            ),
        ),
        SandboxState::Unavailable(reason) => report.defect("sandbox", reason),
        SandboxState::Disabled => report.defect(
            "sandbox",
            "the sandbox is disabled ([sandbox] enabled = false): connector children run with the daemon's account and its view of the machine",
        ),
    }
    let keyring = match crate::daemon::load_keyring(config) {
        Ok(Some(keyring)) => {
            report.ok(
                "keys",
                format!(
                    "keys loaded from {} (primary {})",
                    config.keys.resolved_dir().display(),
                    keyring.primary_id()
                ),
            );
            Some(keyring)
        }
        Ok(None) => {
            report.defect(
                "keys",
                format!(
                    "key directory {} does not exist",
                    config.keys.resolved_dir().display()
                ),
            );
            None
        }
        Err(e) => {
            report.defect("keys", format!("{e:#}"));
            None
        }
    };
    match crate::db::connect(&config.database).await {
        Err(e) => report.defect(
            "database",
            format!(
                "cannot connect to {}: {e}",
                crate::db::redact_url(&config.database.url)
            ),
        ),
        Ok(pool) => {
            check_database(config, keyring.as_ref(), &pool, &mut report).await?;
        }
    }
    let defects = report.findings.iter().filter(|f| !f.ok).count();
    for finding in &report.findings {
        if json {
            println!("{}", serde_json::to_string(finding)?);
        } else {
            let mark = if finding.ok { "ok    " } else { "DEFECT" };
            println!("{mark} {:<12} {}", finding.area, finding.message);
        }
    }
    if !json {
        println!("{defects} defect(s)");
    }
    Ok(if defects == 0 { exit::OK } else { exit::DEFECT })
}

async fn check_database(
    config: &Config,
    keyring: Option<&crate::credentials::keys::Keyring>,
    pool: &sqlx::PgPool,
    report: &mut Report,
) -> anyhow::Result<()> {
    // First: behind a pooler that does not keep sessions, the statements
    // below may land on other sessions and fail at random.
    if !crate::db::keeps_sessions(pool).await? {
        report.defect(
            "database",
            crate::db::sessions_not_kept(&config.database.url),
        );
        return Ok(());
    }
    if !crate::db::migrations_current(pool).await? {
        report.defect(
            "database",
            "migrations are not current; run `connectord migrate`",
        );
        return Ok(());
    }
    report.ok("database", "reachable; migrations current");

    let mut schedules = admin::schedules(pool).await?;
    // By id, as an operator fixing rows goes through them.
    schedules.sort_by_key(|row| row.id);
    let now = chrono::Utc::now();
    for row in schedules {
        let admin::ScheduleRow {
            id,
            connection_id: connection,
            cron,
            timezone: tz,
            jitter_seconds: jitter,
            ..
        } = row;
        let rule = crate::schedule::cron::parse_cron(&cron).and_then(|expr| {
            Ok(crate::schedule::cron::FireRule {
                expr,
                tz: crate::schedule::cron::parse_timezone(&tz)?,
                jitter: crate::schedule::cron::jitter_offset(&connection, jitter),
            })
        });
        match rule {
            Ok(rule) => {
                let mut next = Vec::new();
                let mut at = now;
                while next.len() < 3 {
                    match rule.next_after(at) {
                        Some(t) => {
                            next.push(t.to_rfc3339());
                            at = t;
                        }
                        None => break,
                    }
                }
                report.ok(
                    "schedule",
                    format!(
                        "schedule {id} ({connection}) {cron:?} {tz}: next {}",
                        next.join(", ")
                    ),
                );
            }
            Err(e) => report.defect("schedule", format!("schedule {id} ({connection}): {e}")),
        }
    }

    for admin::ConnectionRow { id, connector, .. } in admin::connections(pool).await? {
        if !config.connectors.contains_key(&connector) {
            report.defect(
                "connection",
                format!("connection {id} names connector {connector:?}, which the registry lacks"),
            );
        }
    }

    for credential in admin::active_credentials(pool).await? {
        let admin::ActiveCredentialRow {
            id,
            connection_id: connection,
            connector,
            kind,
            key_id,
            sealed_for,
        } = credential;
        let mut kind_accepted = true;
        if let Some(entry) = config.connectors.get(&connector) {
            // A connector that needs no credential never reads it: no
            // mismatch is possible.
            if entry.credential.is_some() && entry.mapping_for(kind).is_none() {
                kind_accepted = false;
                report.defect(
                    "credential",
                    format!(
                        "credential {id} of {connection} is {kind}, which connector {connector} does not accept (credential_kind_mismatch)"
                    ),
                );
            }
        }
        // A launch is refused for its kind before its binding is looked
        // at: a kind mismatch is the defect to fix first.
        let unbound = match sealed_for {
            _ if !kind_accepted => None,
            Some(sealed_for) if sealed_for == connector => None,
            Some(sealed_for) => Some(format!(
                "credential {id} of {connection} was stored for connector {sealed_for}, but the connection names {connector}: it will be refused (credential_unrecoverable); store one for {connector}"
            )),
            None => Some(format!(
                "credential {id} of {connection} is not bound to its connector yet: start the daemon with its keys, or run `connectord credentials rotate`"
            )),
        };
        if let Some(defect) = unbound {
            report.defect("credential", defect);
        }
        match keyring {
            Some(keyring) if keyring.contains(&key_id) => {}
            _ => report.defect(
                "credential",
                format!("credential {id} of {connection} is encrypted under key {key_id:?}, which is not in the key directory"),
            ),
        }
    }
    Ok(())
}
