//! connectord runs data connectors for their owners on cron schedules, on
//! retries and on demand, injecting each connection's stored credential.
//!
//! # Layout
//!
//! Every trigger becomes a `run_commands` row; every row is claimed by the
//! queue and executed by the same `launch()`:
//!
//! ```text
//! schedule ─fires─┐
//! retry ──────────┼─> run_commands ─claim─> launch() ─> resolver ─> child_env ─> child ─> runs
//! manual ─────────┘
//! ```
//!
//! - [`config`]: the TOML config and the connector registry.
//! - [`db`]: the pool and embedded migrations.
//! - [`cron`]: cron expressions, time zones, DST and jitter.
//! - [`schedule`]: the timer heap that turns schedule rows into commands.
//! - [`queue`]: claiming commands with `FOR UPDATE SKIP LOCKED`.
//! - [`launch`]: the one path from a claimed command to a recorded run.
//! - [`resolver`]: the only code that decrypts a stored credential.
//! - [`keys`], [`secret`]: key files, AES-256-GCM, redacting plaintext.
//! - [`store`]: writing credentials (set, revoke, delete, rotate).
//! - [`child_env`], [`spawn`], [`child`], [`protocol`]: the child's
//!   environment, starting it, its supervision, and what it may print;
//!   [`report`]: what it reports while it runs, bounded and written aside.
//! - [`sandbox`], [`run_dir`]: the sandbox every child runs in, and each
//!   run's private directory.
//! - [`runs`]: writes to `runs` and `interactions`; [`retention`]: pruning.
//! - [`printable`]: outside text escaped before it is logged or printed.
//! - [`daemon`]: wiring and shutdown; [`supervisor`]: its tasks, watched
//!   as one set; [`systemd`]: the notify protocol;
//!   [`memory`]: giving freed memory back.
//! - [`cli`], [`dev`], [`pgcluster`], [`logging`]: the command line.

pub mod check;
pub mod child;
pub mod child_env;
pub mod cli;
pub mod config;
pub mod cron;
pub mod daemon;
pub mod db;
pub mod dev;
pub mod failure;
pub mod keys;
pub mod launch;
pub mod logging;
pub mod memory;
pub mod pgcluster;
pub mod printable;
pub mod protocol;
pub mod queue;
pub mod report;
pub mod resolver;
pub mod retention;
pub mod run_dir;
pub mod runs;
pub mod sandbox;
pub mod schedule;
pub mod secret;
pub mod spawn;
pub mod store;
pub mod supervisor;
pub mod systemd;
