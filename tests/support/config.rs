//! The daemon's config for a test, built as TOML values rather than text:
//! every test starts from the same keys directory and short graces, and
//! says only what it changes.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// A whole config file.
#[derive(Clone)]
pub struct Config {
    table: Table,
}

impl Config {
    /// Keys under `dir/keys`, the daemon named `instance`, with graces and
    /// a lease short enough that a test's shutdowns and rescues take
    /// seconds.
    pub fn new(dir: &Path, instance: &str) -> Config {
        Config {
            table: Table::new(),
        }
        .set("keys", "dir", path(&dir.join("keys")))
        .daemon("instance_id", instance)
        .daemon("shutdown_grace", "1s")
        .daemon("kill_grace", "500ms")
        .daemon("lease", "2s")
    }

    /// Sets `key` in `[daemon]`.
    pub fn daemon(self, key: &str, value: impl Into<Value>) -> Config {
        self.set("daemon", key, value)
    }

    /// Sets `key` in `[section]`.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Config {
        section_of(&mut self.table, section).insert(key.to_owned(), value.into());
        self
    }

    /// Adds (or replaces) a connector.
    pub fn connector(mut self, connector: Connector) -> Config {
        section_of(&mut self.table, "connectors")
            .insert(connector.name, Value::Table(connector.table));
        self
    }

    /// The config as the daemon reads it.
    pub fn text(&self) -> String {
        toml::to_string(&self.table).expect("a config of TOML values renders")
    }

    /// Writes the config to `path` and returns it.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.text()).expect("write config");
        path.to_owned()
    }
}

fn section_of<'a>(table: &'a mut Table, name: &str) -> &'a mut Table {
    match table
        .entry(name.to_owned())
        .or_insert_with(|| Value::Table(Table::new()))
    {
        Value::Table(section) => section,
        other => panic!("[{name}] is {other:?}, not a table"),
    }
}

/// One `[connectors.NAME]` section.
#[derive(Clone)]
pub struct Connector {
    name: String,
    table: Table,
}

impl Connector {
    pub fn new(name: &str, command: impl AsRef<Path>) -> Connector {
        Connector {
            name: name.to_owned(),
            table: Table::new(),
        }
        .set("command", path(command.as_ref()))
    }

    /// A stand-in that records what it received in `dir`: told where by
    /// `RECORD_DIR`, and allowed to write there through the sandbox.
    pub fn recording(name: &str, command: impl AsRef<Path>, dir: &Path) -> Connector {
        Connector::new(name, command)
            .env("RECORD_DIR", path(dir))
            .read_write(dir)
    }

    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Connector {
        self.table.insert(key.to_owned(), value.into());
        self
    }

    pub fn args(self, args: &[&str]) -> Connector {
        self.set("args", args.to_vec())
    }

    pub fn env(mut self, key: &str, value: impl Into<Value>) -> Connector {
        section_of(&mut self.table, "env").insert(key.to_owned(), value.into());
        self
    }

    pub fn timeout(self, timeout: &str) -> Connector {
        self.set("timeout", timeout)
    }

    /// Up to `max_attempts` attempts, `backoff` doubling up to
    /// `max_backoff` between them.
    pub fn retry(self, max_attempts: i64, backoff: &str, max_backoff: &str) -> Connector {
        let mut retry = Table::new();
        retry.insert("max_attempts".into(), max_attempts.into());
        retry.insert("backoff".into(), backoff.into());
        retry.insert("max_backoff".into(), max_backoff.into());
        self.set("retry", retry)
    }

    /// One attempt: a failure is final.
    pub fn no_retry(self) -> Connector {
        let mut retry = Table::new();
        retry.insert("max_attempts".into(), 1.into());
        self.set("retry", retry)
    }

    /// Takes a `static_secret` credential in `env`.
    pub fn static_secret(self, env: &str) -> Connector {
        self.set("credential", static_secret(env))
    }

    /// Takes a `username_password` credential in the two variables.
    pub fn username_password(self, username_env: &str, password_env: &str) -> Connector {
        let mut credential = Table::new();
        credential.insert("kind".into(), "username_password".into());
        credential.insert("username_env".into(), username_env.into());
        credential.insert("password_env".into(), password_env.into());
        self.set("credential", credential)
    }

    /// Also accepts a `static_secret` credential, injected as `env`.
    pub fn also_accepts_static_secret(self, env: &str) -> Connector {
        self.set("accepts", vec![static_secret(env)])
    }

    pub fn read_write(self, dir: &Path) -> Connector {
        self.push("read_write_paths", path(dir))
    }

    pub fn read_only(self, dir: impl AsRef<Path>) -> Connector {
        self.push("read_only_paths", path(dir.as_ref()))
    }

    fn push(mut self, key: &str, value: String) -> Connector {
        match self
            .table
            .entry(key.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            Value::Array(values) => values.push(value.into()),
            other => panic!("{key} is {other:?}, not an array"),
        }
        self
    }
}

fn static_secret(env: &str) -> Table {
    let mut credential = Table::new();
    credential.insert("kind".into(), "static_secret".into());
    credential.insert("env".into(), env.into());
    credential
}

fn path(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}
