//! Schedules: cron expressions and the engine that turns `schedules` rows
//! into `run_commands` rows on time.
//!
//! - [`cron`]: expressions, time zones, DST and jitter;
//! - [`Engine`]: the timer heap over every firing row;
//! - `leadership`: which daemon of several fires them (SPEC §16);
//! - `exprs`: each distinct expression text once, with a bounded cache of
//!   parses; `slots`: the engine's compact per-row state.

pub mod cron;
mod engine;
mod exprs;
mod leadership;
mod slots;

pub use engine::{Edit, Engine};
pub use leadership::LEADER_CHANNEL;
