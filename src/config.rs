//! The TOML configuration of SPEC §4, parsed into typed structs.
//!
//! Every table denies unknown keys, and every value is checked while it is
//! parsed, so a mistake is reported by the `toml` parser with the file, line
//! and key it came from instead of surfacing later as odd behaviour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::vocabulary::CredentialKind;

/// The whole config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub child_env: ChildEnvConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The runtime registry: one entry per connector, keyed by its name.
    #[serde(default)]
    pub connectors: BTreeMap<String, ConnectorConfig>,
    /// The file this config was read from, when it was: the sandbox hides
    /// it from every child.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://connectord@localhost/connectord".to_owned(),
            max_connections: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Where `<key_id>.key` files live. `None` means `$CREDENTIALS_DIRECTORY`
    /// (systemd's `LoadCredential=`), then `/etc/connectord/keys`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default = "default_primary")]
    pub primary: String,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            dir: None,
            primary: default_primary(),
        }
    }
}

fn default_primary() -> String {
    "k1".to_owned()
}

impl KeysConfig {
    /// The key directory after applying the systemd default.
    pub fn resolved_dir(&self) -> PathBuf {
        if let Some(dir) = &self.dir {
            return dir.clone();
        }
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from("/etc/connectord/keys"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Names this daemon in `runs.instance_id` and `run_commands.claimed_by`.
    pub instance_id: Option<String>,
    #[serde(deserialize_with = "positive_u32")]
    pub max_concurrent_runs: u32,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    #[serde(with = "duration")]
    pub kill_grace: Duration,
    #[serde(with = "duration")]
    pub catchup_window: Duration,
    #[serde(deserialize_with = "lease_duration")]
    pub lease: Duration,
    /// How often the queue looks for work when no notification arrives.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// How often every schedule row is re-read in case a notification was missed.
    #[serde(with = "duration")]
    pub reconcile_interval: Duration,
    /// How connector processes are created.
    pub spawn: SpawnMethod,
}

/// How connector processes are created (`[daemon] spawn`). Either way a
/// child gets the same program, arguments, environment, descriptors,
/// process group and parent-death signal; only the system calls differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SpawnMethod {
    /// `"vfork"`: `clone(CLONE_VM | CLONE_VFORK)`, which does not copy the
    /// daemon's memory (`run::spawn`).
    #[default]
    Vfork,
    /// `"command"`: the standard library's `fork` and `exec`: slower, and
    /// the fallback where the fast path's `clone` is refused or misbehaves
    /// (a seccomp filter, an emulator, a debugger).
    Command,
}

impl SpawnMethod {
    /// The value as the config file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SpawnMethod::Vfork => "vfork",
            SpawnMethod::Command => "command",
        }
    }
}

impl<'de> Deserialize<'de> for SpawnMethod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SpawnMethod, D::Error> {
        let text = String::deserialize(d)?;
        [SpawnMethod::Vfork, SpawnMethod::Command]
            .into_iter()
            .find(|method| method.as_str() == text)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown spawn method {text:?}; write \"vfork\" or \"command\""
                ))
            })
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            instance_id: None,
            max_concurrent_runs: 16,
            shutdown_grace: Duration::from_secs(30),
            kill_grace: Duration::from_secs(10),
            catchup_window: Duration::from_secs(3600),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(300),
            spawn: SpawnMethod::Vfork,
        }
    }
}

impl DaemonConfig {
    /// `instance_id` from the config, or `hostname:pid`.
    pub fn resolved_instance_id(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".to_owned());
        format!("{host}:{}", std::process::id())
    }
}

/// How long finished history is kept; `"0s"` keeps everything of a kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    #[serde(with = "duration")]
    pub runs: Duration,
    #[serde(with = "duration")]
    pub commands: Duration,
    #[serde(with = "duration")]
    pub interactions: Duration,
    #[serde(with = "duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "positive_u32")]
    pub batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        RetentionConfig {
            runs: Duration::from_secs(90 * DAY),
            commands: Duration::from_secs(30 * DAY),
            interactions: Duration::from_secs(90 * DAY),
            interval: Duration::from_secs(600),
            batch: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChildEnvConfig {
    pub inherit: Vec<String>,
}

impl Default for ChildEnvConfig {
    fn default() -> Self {
        ChildEnvConfig {
            inherit: ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// SPEC §12: every child runs in a sandbox unless this says otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    pub enabled: bool,
    /// Host paths every child may read.
    #[serde(deserialize_with = "absolute_paths")]
    pub read_only_paths: Vec<PathBuf>,
    /// The bubblewrap program; `None` finds `bwrap` on the daemon's `PATH`.
    pub bwrap: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            enabled: true,
            read_only_paths: Vec::new(),
            bwrap: None,
        }
    }
}

/// SPEC §13: the state each connection keeps between runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The largest state file that is stored; a larger one is not, and
    /// the connection keeps its old state.
    #[serde(deserialize_with = "size::deserialize")]
    pub max_bytes: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// SPEC §15: the Prometheus endpoint, off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// The address `/metrics` is served on.
    #[serde(deserialize_with = "socket_address")]
    pub listen: Option<std::net::SocketAddr>,
}

fn socket_address<'de, D>(deserializer: D) -> Result<Option<std::net::SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an address and port like \"127.0.0.1:9464\""
        ))
    })
}

/// One connector of the registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    #[serde(deserialize_with = "non_empty_path")]
    pub command: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    /// Fixed variables for the child.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra host variables passed through to the child.
    #[serde(default)]
    pub inherit: Vec<String>,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_max_concurrency", deserialize_with = "positive_u32")]
    pub max_concurrency: u32,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The credential the connector authenticates with; `None` needs none.
    #[serde(default)]
    pub credential: Option<CredentialSpec>,
    /// Explicit backward-compatible variants of stored kinds.
    #[serde(default)]
    pub accepts: Vec<CredentialSpec>,
    #[serde(default)]
    pub allow_env_fallback: bool,
    /// Host paths this connector's children may write, inside the sandbox.
    #[serde(default, deserialize_with = "absolute_paths")]
    pub read_write_paths: Vec<PathBuf>,
    /// Host paths this connector's children may read, inside the sandbox.
    #[serde(default, deserialize_with = "absolute_paths")]
    pub read_only_paths: Vec<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_concurrency() -> u32 {
    4
}

/// How a stored credential kind maps onto a connector's variables.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialSpec {
    StaticSecret {
        #[serde(deserialize_with = "env_name")]
        env: String,
    },
    UsernamePassword {
        #[serde(deserialize_with = "env_name")]
        username_env: String,
        #[serde(deserialize_with = "env_name")]
        password_env: String,
    },
}

impl CredentialSpec {
    /// The stored `credentials.kind` this mapping reads.
    pub fn kind(&self) -> CredentialKind {
        match self {
            CredentialSpec::StaticSecret { .. } => CredentialKind::StaticSecret,
            CredentialSpec::UsernamePassword { .. } => CredentialKind::UsernamePassword,
        }
    }

    /// The variables this mapping writes into a child's environment.
    pub fn variables(&self) -> Vec<&str> {
        match self {
            CredentialSpec::StaticSecret { env } => vec![env],
            CredentialSpec::UsernamePassword {
                username_env,
                password_env,
            } => vec![username_env, password_env],
        }
    }
}

impl ConnectorConfig {
    /// The mapping for a stored kind: the declared credential first, then an
    /// explicitly accepted variant. `None` is a kind mismatch.
    pub fn mapping_for(&self, stored_kind: CredentialKind) -> Option<&CredentialSpec> {
        self.credential
            .iter()
            .chain(self.accepts.iter())
            .find(|spec| spec.kind() == stored_kind)
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; 1 disables retries.
    #[serde(default = "default_max_attempts", deserialize_with = "positive_u32")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff", with = "duration")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff", with = "duration")]
    pub max_backoff: Duration,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30 * 60)
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: default_max_attempts(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// A lease shorter than a second could not be renewed in time.
fn lease_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let lease = duration::deserialize(d)?;
    if lease < Duration::from_secs(1) {
        return Err(serde::de::Error::custom("the lease must be at least 1s"));
    }
    Ok(lease)
}

fn non_empty_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let path = PathBuf::deserialize(d)?;
    if path.as_os_str().is_empty() {
        return Err(serde::de::Error::custom("must not be empty"));
    }
    Ok(path)
}

/// Sandbox paths are bound where they are on the host, so they must say
/// where that is.
fn absolute_paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    let paths = Vec::<PathBuf>::deserialize(d)?;
    if let Some(relative) = paths.iter().find(|p| !p.is_absolute()) {
        return Err(serde::de::Error::custom(format!(
            "{:?} is not an absolute path",
            relative.display()
        )));
    }
    Ok(paths)
}

/// A variable name a child's environment can hold.
fn env_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if !is_env_name(&name) {
        return Err(serde::de::Error::custom(format!(
            "{name:?} is not a valid environment variable name (letters, digits and '_', not starting with a digit)"
        )));
    }
    Ok(name)
}

fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(n)
}

/// Durations written as `"30s"`, `"5m"`, `"1h"`, `"1h 30m"`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write it like \"30s\", \"5m\" or \"1h\""
            ))
        })
    }
}

/// Sizes written as `"4MiB"`, `"512 KiB"`, `"100kB"` or a number of bytes.
mod size {
    use serde::{Deserialize, Deserializer};

    /// A state is read into memory whole, sealed and sent in one
    /// statement; past this it belongs in the connector's own storage.
    pub const MAX: u64 = 256 * 1024 * 1024;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let bytes = match Written::deserialize(d)? {
            Written::Bytes(n) => n,
            Written::Text(text) => parse(&text).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {text:?}; write it like \"4MiB\", \"512KiB\" or a number of bytes"
                ))
            })?,
        };
        if bytes > MAX {
            return Err(serde::de::Error::custom("must be at most 256MiB"));
        }
        Ok(bytes)
    }

    /// `<number>[ ]<unit>`, the units of SI (kB, MB, GB) and IEC (KiB,
    /// MiB, GiB), or bytes (B, or none).
    pub fn parse(text: &str) -> Option<u64> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" | "K" | "k" => 1000,
            "KiB" => 1 << 10,
            "MB" | "M" => 1000 * 1000,
            "MiB" => 1 << 20,
            "GB" | "G" => 1000 * 1000 * 1000,
            "GiB" => 1 << 30,
            _ => return None,
        };
        number.checked_mul(scale)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn sizes() {
            assert_eq!(super::parse("4MiB"), Some(4 << 20));
            assert_eq!(super::parse("100 kB"), Some(100_000));
            assert_eq!(super::parse("512KiB"), Some(512 << 10));
            assert_eq!(super::parse("17"), Some(17));
            assert_eq!(super::parse("1.5MiB"), None);
            assert_eq!(super::parse("MiB"), None);
            assert_eq!(super::parse("4 parsecs"), None);
            assert_eq!(super::parse("99999999999999999999GiB"), None);
        }
    }
}

/// The parser's message, which quotes the offending line; for a line that
/// may hold a password (the database URL), only its position and the
/// reason, never the text.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return error.to_string();
    };
    let line_start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let line = text[line_start..line_end].to_ascii_lowercase();
    if !(line.contains("url") || line.contains("password") || line.contains("postgres")) {
        return error.to_string();
    }
    let line_number = text[..line_start].matches('\n').count() + 1;
    let column = span.start - line_start + 1;
    format!(
        "TOML parse error at line {line_number}, column {column} (the line is not shown: it may hold a password): {}",
        error.message()
    )
}

/// A config file that could not be used; the message names the file, and
/// for TOML errors the line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Invalid { path: PathBuf, source: ParseError },
}

/// Config text that is not a valid config. Every message names where the
/// problem is, and none quotes a line that may hold a password.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not TOML, or not the config's shape: an unknown key, a wrong type,
    /// a bad value. The message names the line, column and key.
    #[error("{0}")]
    Toml(String),
    #[error("[connectors.{connector}] declares kind {kind:?} twice across credential and accepts")]
    KindDeclaredTwice {
        connector: String,
        kind: &'static str,
    },
    #[error("[connectors.{connector}] has `accepts` but no `credential`")]
    AcceptsWithoutCredential { connector: String },
}

impl Config {
    /// Reads and validates a config file, then applies `DATABASE_URL`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|source| ConfigError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        config.apply_env();
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ParseError::Toml(toml_error(text, &e)))?;
        config.validate()?;
        Ok(config)
    }

    /// `DATABASE_URL` overrides the file, as operators expect of a
    /// PostgreSQL client.
    pub fn apply_env(&mut self) {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            if !url.is_empty() {
                self.database.url = url;
            }
        }
    }

    /// Cross-field checks the types cannot express.
    fn validate(&self) -> Result<(), ParseError> {
        for (name, connector) in &self.connectors {
            let mut declared = Vec::new();
            for spec in connector.credential.iter().chain(&connector.accepts) {
                if declared.contains(&spec.kind()) {
                    return Err(ParseError::KindDeclaredTwice {
                        connector: name.clone(),
                        kind: spec.kind().as_str(),
                    });
                }
                declared.push(spec.kind());
            }
            if !connector.accepts.is_empty() && connector.credential.is_none() {
                return Err(ParseError::AcceptsWithoutCredential {
                    connector: name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Every variable any connector declares for credentials. These never
    /// pass from the host into any child (SPEC §4 step 2).
    pub fn credential_variables(&self) -> Vec<String> {
        let mut vars: Vec<String> = self
            .connectors
            .values()
            .flat_map(|c| c.credential.iter().chain(c.accepts.iter()))
            .flat_map(|spec| spec.variables())
            .map(str::to_owned)
            .collect();
        vars.sort();
        vars.dedup();
        vars
    }
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_parses() {
        let config = Config::parse(
            r#"
            [database]
            url = "postgres://connectord@localhost/connectord"
            max_connections = 10

            [keys]
            dir = "/etc/connectord/keys"
            primary = "k1"

            [daemon]
            instance_id = "host-a"
            max_concurrent_runs = 16
            shutdown_grace = "30s"
            kill_grace = "10s"
            catchup_window = "1h"
            lease = "30s"

            [child_env]
            inherit = ["PATH", "HOME"]

            [connectors.chase]
            command = "/usr/lib/connectors/chase"
            args = ["--headless"]
            timeout = "30m"
            max_concurrency = 2
            credential = { kind = "username_password", username_env = "CHASE_USERNAME", password_env = "CHASE_PASSWORD" }
            accepts = [{ kind = "static_secret", env = "CHASE_PASSWORD" }]

            [connectors.github]
            command = "/usr/lib/connectors/github"
            credential = { kind = "static_secret", env = "GITHUB_TOKEN" }
            retry = { max_attempts = 5, backoff = "1s", max_backoff = "1m" }
            "#,
        )
        .expect("the spec's example is valid");
        let chase = &config.connectors["chase"];
        assert_eq!(chase.timeout, Duration::from_secs(1800));
        assert_eq!(
            chase.mapping_for(CredentialKind::StaticSecret),
            Some(&CredentialSpec::StaticSecret {
                env: "CHASE_PASSWORD".into()
            })
        );
        assert_eq!(config.connectors["github"].retry.max_attempts, 5);
        assert_eq!(
            config.credential_variables(),
            ["CHASE_PASSWORD", "CHASE_USERNAME", "GITHUB_TOKEN"]
        );
    }

    /// Each bad input is rejected with a message naming what is wrong and
    /// where.
    #[test]
    fn bad_input_names_line_and_key() {
        let check = |text: &str, expected: &[&str]| {
            let err = Config::parse(text).expect_err(text).to_string();
            for part in expected {
                assert!(err.contains(part), "{err:?} lacks {part:?}");
            }
        };
        check(
            "[daemon]\nshutdown_grase = \"30s\"\n",
            &["line 2", "shutdown_grase"],
        );
        check(
            "[daemon]\nlease = \"soon\"\n",
            &["line 2", "invalid duration"],
        );
        check("[bogus]\n", &["line 1", "bogus"]);
        check(
            "[connectors.x]\ncommand = \"/bin/true\"\ncredential = { kind = \"oauth\", env = \"X\" }\n",
            &["line 3", "oauth"],
        );
        check(
            "[connectors.x]\ncommand = \"/bin/true\"\ncredential = { kind = \"static_secret\", env = \"X\", extra = 1 }\n",
            &["line 3", "extra"],
        );
        check("[connectors.x]\nargs = []\n", &["command"]);
        check(
            "[connectors.x]\ncommand = \"/bin/true\"\nmax_concurrency = 0\n",
            &["line 3", "at least 1"],
        );
        check(
            "[connectors.x]\ncommand = \"/bin/true\"\ncredential = { kind = \"static_secret\", env = \"A B\" }\n",
            &["line 3", "A B"],
        );
        check(
            "[daemon]\nmax_concurrent_runs = 0\n",
            &["line 2", "at least 1"],
        );
        check("[daemon]\nlease = \"500ms\"\n", &["line 2", "at least 1s"]);
        check(
            "[connectors.x]\ncommand = \"\"\n",
            &["line 2", "must not be empty"],
        );
        check(
            "[connectors.x]\ncommand = \"/bin/true\"\naccepts = [{ kind = \"static_secret\", env = \"X\" }]\n",
            &["connectors.x", "no `credential`"],
        );
        check(
            "[connectors.x]\ncommand = \"/bin/true\"\nread_write_paths = [\"out\"]\n",
            &[
                "line 3",
                "read_write_paths",
                "\"out\" is not an absolute path",
            ],
        );
        check(
            "[sandbox]\nread_only_paths = [\"/opt/a\", \"b\"]\n",
            &["line 2", "read_only_paths", "\"b\" is not an absolute path"],
        );
        check(
            "[sandbox]\nenable = false\n",
            &["line 2", "unknown field `enable`"],
        );
        check(
            "[daemon]\nspawn = \"fork\"\n",
            &[
                "line 2",
                "spawn",
                "unknown spawn method \"fork\"",
                "\"vfork\" or \"command\"",
            ],
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let config = Config::parse(include_str!("../config/connectors.example.toml"))
            .expect("config/connectors.example.toml parses");
        for browser in ["amazon", "chase", "reddit", "usaa"] {
            let upper = browser.to_uppercase();
            assert_eq!(
                config.connectors[browser].credential,
                Some(CredentialSpec::UsernamePassword {
                    username_env: format!("{upper}_USERNAME"),
                    password_env: format!("{upper}_PASSWORD"),
                })
            );
        }
        assert_eq!(
            config.connectors["github"]
                .credential
                .as_ref()
                .map(CredentialSpec::kind),
            Some(CredentialKind::StaticSecret)
        );
    }

    #[test]
    fn partial_tables_take_defaults() {
        let config = Config::parse(
            "[database]\nurl = \"postgres://x@db/y\"\n[child_env]\n[keys]\ndir = \"/k\"\n[daemon]\nlease = \"5s\"\n",
        )
        .expect("every key has a default");
        assert_eq!(config.database.max_connections, 10);
        assert_eq!(config.child_env.inherit.len(), 6);
        assert_eq!(config.keys.primary, "k1");
        assert_eq!(config.daemon.kill_grace, Duration::from_secs(10));
    }

    #[test]
    fn defaults_apply() {
        let config = Config::parse("").expect("an empty file is valid");
        assert_eq!(config.daemon.max_concurrent_runs, 16);
        assert_eq!(config.daemon.catchup_window, Duration::from_secs(3600));
        assert_eq!(config.child_env.inherit.len(), 6);
        assert_eq!(config.keys.primary, "k1");
        assert!(config.sandbox.enabled, "children are sandboxed by default");
        assert_eq!(config.daemon.spawn, SpawnMethod::Vfork);
        let command = Config::parse("[daemon]\nspawn = \"command\"\n").expect("valid");
        assert_eq!(command.daemon.spawn, SpawnMethod::Command);
        assert_eq!(config.sandbox.bwrap, None);
    }
}
