//! The environment a connector child receives (SPEC §4), built in a fixed
//! order where each step overrides the one before:
//!
//! 1. empty;
//! 2. host variables on the allowlist (`[child_env] inherit` plus the
//!    connector's own `inherit`) **minus** every variable any connector
//!    declares for credentials, so a deployment-wide `CHASE_PASSWORD` can
//!    never reach a child, and an empty one can never shadow a stored value;
//! 3. the connector's fixed `env` table;
//! 4. run metadata (`CONNECTORD_*`, the state file among them), and for a sandboxed child its private
//!    `HOME` and `TMPDIR`, replacing whatever came before;
//! 5. the resolved credential, always last.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;

use crate::config::{Config, ConnectorConfig};
use crate::credentials::secret::Secret;
use crate::run::spawn::CStrings;
use crate::vocabulary::Trigger;

/// One variable's value; secrets keep their redacting wrapper until the
/// moment they are handed to the spawn call.
pub enum EnvValue {
    Plain(OsString),
    Secret(Secret),
}

/// The final environment, one value per name.
#[derive(Default)]
pub struct ChildEnv {
    vars: BTreeMap<String, EnvValue>,
}

impl fmt::Debug for ChildEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in &self.vars {
            match value {
                EnvValue::Plain(v) => map.entry(name, v),
                EnvValue::Secret(_) => map.entry(name, &"[redacted]"),
            };
        }
        map.finish()
    }
}

fn value_bytes(value: &EnvValue) -> &[u8] {
    match value {
        EnvValue::Plain(v) => v.as_bytes(),
        EnvValue::Secret(s) => s.expose().as_bytes(),
    }
}

/// Run metadata every child receives (step 4).
pub struct RunMeta<'a> {
    pub run_id: i64,
    pub connection_id: &'a str,
    pub trigger: Trigger,
    pub attempt: i32,
    /// A sandboxed child's private directories, as it sees them.
    pub private: Option<PrivateDirs<'a>>,
    /// `CONNECTORD_STATE_FILE`, as the child sees it.
    pub state_file: Option<&'a OsStr>,
}

/// The run's own `HOME` and `TMPDIR`.
#[derive(Clone, Copy)]
pub struct PrivateDirs<'a> {
    pub home: &'a str,
    pub tmp: &'a str,
}

impl ChildEnv {
    /// Builds the environment; `host` looks a variable up in the daemon's
    /// own environment and `credential` holds the resolver's output.
    pub fn build(
        config: &Config,
        connector: &ConnectorConfig,
        meta: &RunMeta<'_>,
        credential: Vec<(String, Secret)>,
        host: impl Fn(&str) -> Option<OsString>,
    ) -> ChildEnv {
        let mut env = ChildEnv::default();
        let forbidden = config.credential_variables();
        for name in config.child_env.inherit.iter().chain(&connector.inherit) {
            if forbidden.iter().any(|f| f == name) {
                continue;
            }
            if let Some(value) = host(name) {
                env.set(name, EnvValue::Plain(value));
            }
        }
        for (name, value) in &connector.env {
            env.set(name, EnvValue::Plain(value.into()));
        }
        env.set(
            "CONNECTORD_RUN_ID",
            EnvValue::Plain(meta.run_id.to_string().into()),
        );
        env.set(
            "CONNECTORD_CONNECTION_ID",
            EnvValue::Plain(meta.connection_id.into()),
        );
        env.set(
            "CONNECTORD_TRIGGER",
            EnvValue::Plain(meta.trigger.as_str().into()),
        );
        env.set(
            "CONNECTORD_ATTEMPT",
            EnvValue::Plain(meta.attempt.to_string().into()),
        );
        if let Some(state_file) = meta.state_file {
            env.set("CONNECTORD_STATE_FILE", EnvValue::Plain(state_file.into()));
        }
        if let Some(private) = meta.private {
            env.set("HOME", EnvValue::Plain(private.home.into()));
            env.set("TMPDIR", EnvValue::Plain(private.tmp.into()));
        }
        for (name, secret) in credential {
            env.set(&name, EnvValue::Secret(secret));
        }
        env
    }

    fn set(&mut self, name: &str, value: EnvValue) {
        self.vars.insert(name.to_owned(), value);
    }

    /// The environment as `execve` takes it, in one buffer zeroed on drop.
    pub fn block(&self) -> std::io::Result<CStrings> {
        let entries: Vec<[&[u8]; 3]> = self
            .vars
            .iter()
            .map(|(name, value)| [name.as_bytes(), b"=", value_bytes(value)])
            .collect();
        CStrings::new(&entries)
    }

    /// A plain variable's value (`PATH`, to find the program as the child
    /// would); secrets are not handed out here.
    pub fn plain(&self, name: &str) -> Option<&OsStr> {
        match self.vars.get(name)? {
            EnvValue::Plain(v) => Some(v),
            EnvValue::Secret(_) => None,
        }
    }

    /// Variable names, for tests and diagnostics (never values).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
            [connectors.chase]
            command = "/bin/true"
            env = { MODE = "fixed", PATH = "/connector/bin" }
            inherit = ["EXTRA"]
            credential = { kind = "username_password", username_env = "CHASE_USERNAME", password_env = "CHASE_PASSWORD" }

            [connectors.github]
            command = "/bin/true"
            inherit = ["GITHUB_TOKEN"]
            credential = { kind = "static_secret", env = "GITHUB_TOKEN" }
            "#,
        )
        .expect("valid config")
    }

    fn host(name: &str) -> Option<OsString> {
        match name {
            "PATH" => Some("/usr/bin".into()),
            "HOME" => Some("/home/d".into()),
            "EXTRA" => Some("x".into()),
            // Deployment-wide credential values, empty and stale: neither
            // may reach a child.
            "CHASE_PASSWORD" => Some("".into()),
            "GITHUB_TOKEN" => Some("stale".into()),
            _ => None,
        }
    }

    #[test]
    fn order_and_exclusions() {
        let config = config();
        let meta = RunMeta {
            run_id: 7,
            connection_id: "alice-github",
            trigger: Trigger::Scheduled,
            attempt: 2,
            private: None,
            state_file: None,
        };
        let env = ChildEnv::build(
            &config,
            &config.connectors["github"],
            &meta,
            vec![("GITHUB_TOKEN".into(), Secret::new("stored".into()))],
            host,
        );
        let debug = format!("{env:?}");
        assert!(!debug.contains("stored"), "{debug}");
        let names: Vec<_> = env.names().collect();
        assert_eq!(
            names,
            [
                "CONNECTORD_ATTEMPT",
                "CONNECTORD_CONNECTION_ID",
                "CONNECTORD_RUN_ID",
                "CONNECTORD_TRIGGER",
                "GITHUB_TOKEN",
                "HOME",
                "PATH"
            ]
        );
        match &env.vars["GITHUB_TOKEN"] {
            EnvValue::Secret(s) => assert_eq!(s.expose(), "stored"),
            EnvValue::Plain(_) => panic!("the stored credential must win"),
        }
    }

    #[test]
    fn connector_env_overrides_host_and_credentials_never_inherit() {
        let config = config();
        let meta = RunMeta {
            run_id: 1,
            connection_id: "alice-chase",
            trigger: Trigger::Manual,
            attempt: 1,
            private: None,
            state_file: None,
        };
        let env = ChildEnv::build(&config, &config.connectors["chase"], &meta, vec![], host);
        assert!(matches!(&env.vars["PATH"], EnvValue::Plain(p) if p == "/connector/bin"));
        assert!(env.vars.contains_key("EXTRA"));
        assert!(!env.vars.contains_key("CHASE_PASSWORD"));
        assert!(!env.vars.contains_key("GITHUB_TOKEN"));
    }

    #[test]
    fn a_sandboxed_child_gets_its_own_home_and_tmpdir_under_its_credential() {
        let mut config = config();
        let chase = config.connectors.get_mut("chase").unwrap();
        chase.env.insert("HOME".into(), "/fixed".into());
        chase.env.insert("TMPDIR".into(), "/fixed-tmp".into());
        let meta = RunMeta {
            run_id: 1,
            connection_id: "alice-chase",
            trigger: Trigger::Manual,
            attempt: 1,
            private: Some(PrivateDirs {
                home: "/run/connector/home",
                tmp: "/run/connector/tmp",
            }),
            state_file: None,
        };
        let env = ChildEnv::build(
            &config,
            &config.connectors["chase"],
            &meta,
            vec![("CHASE_PASSWORD".into(), Secret::new("stored".into()))],
            host,
        );
        assert_eq!(env.plain("HOME"), Some(OsStr::new("/run/connector/home")));
        assert_eq!(env.plain("TMPDIR"), Some(OsStr::new("/run/connector/tmp")));
        assert!(
            matches!(&env.vars["CHASE_PASSWORD"], EnvValue::Secret(s) if s.expose() == "stored")
        );
    }
}
