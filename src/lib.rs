//! connectord runs data connectors for their owners on cron schedules, on
//! retries and on demand, injecting each connection's stored credential.
//!
//! Every trigger becomes a `run_commands` row; every row is claimed by the
//! queue and executed by the same `run::launch::launch`. The tree follows
//! that flow: [`schedule`] and [`queue`] make and claim commands, [`run`]
//! turns one into a recorded run, [`credentials`] holds the only code that
//! decrypts, [`sandbox`] confines every child, and `daemon` wires the
//! loops together. Beside it, [`cli`] is the command line (the top layer:
//! nothing depends on it), [`admin`] the operator's statements it shares
//! with `dev` and the tests, and `dev` the newcomer's demo set-up.
//! `ARCHITECTURE.md` has the code map, module by module, and the
//! invariants.
//!
//! Modules are `pub` only where `src/main.rs`, the tests or the benchmark
//! reach them; the rest is `pub(crate)`.

pub mod admin;
pub mod cli;
pub mod config;
pub mod credentials;
pub(crate) mod daemon;
pub mod db;
// `dev` and its private PostgreSQL are public only for the tests and the
// benchmark, which start the same cluster; they are not the library's API.
#[doc(hidden)]
pub mod dev;
pub(crate) mod metrics;
pub(crate) mod printable;
pub mod queue;
pub mod run;
pub mod sandbox;
pub mod schedule;
pub mod vocabulary;
