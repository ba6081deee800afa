//! A run, from a claimed command to its recorded outcome: `launch`
//! decides it, [`child_env`] builds the child's environment, [`spawn`] and
//! [`child`] start and supervise it, [`protocol`] reads what it prints and
//! `report` what it reports while it runs, `codes` the one-time codes it
//! waits for, `record` writes `runs`
//! rows, [`dir`] holds each run's private directory and [`state_file`]
//! the connection's state in it, `failure` names
//! how a run can fail, and `leases` keeps the leases of the runs going
//! while `rescue` settles those of daemons that stopped.

pub mod child;
pub mod child_env;
pub(crate) mod codes;
pub mod dir;
pub(crate) mod failure;
pub(crate) mod launch;
pub(crate) mod leases;
pub mod protocol;
pub(crate) mod record;
pub(crate) mod report;
pub(crate) mod rescue;
pub mod spawn;
pub mod state_file;
