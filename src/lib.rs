//! connectord runs data connectors for their owners on cron schedules, on
//! retries and on demand, injecting each connection's stored credential.
//!
//! Every trigger becomes a `run_commands` row; every row is claimed by the
//! queue and executed by the same [`run::launch::launch`]. The tree follows
//! that flow: [`schedule`] and [`queue`] make and claim commands, [`run`]
//! turns one into a recorded run, [`credentials`] holds the only code that
//! decrypts, [`sandbox`] confines every child, and [`daemon`] wires the
//! loops together. `ARCHITECTURE.md` has the code map, module by module,
//! and the invariants.

pub mod check;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod db;
pub mod dev;
pub mod logging;
pub mod pgcluster;
pub mod printable;
pub mod queue;
pub mod run;
pub mod sandbox;
pub mod schedule;
pub mod vocabulary;
