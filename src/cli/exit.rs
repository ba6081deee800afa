//! Exit statuses, documented in `--help` (`Cli`'s `after_help`); 2, bad
//! usage, is clap's own.

/// Success; for `trigger --wait`, the run succeeded.
pub(crate) const OK: u8 = 0;
/// The command could not do its job (bad config, database, input).
pub(crate) const ERROR: u8 = 1;
/// `check` found a defect.
pub(crate) const DEFECT: u8 = 1;
/// `trigger --wait`: the run failed.
pub(crate) const RUN_FAILED: u8 = 3;
/// `trigger --wait`: the launch was refused (no child was started).
pub(crate) const RUN_REFUSED: u8 = 4;
/// `trigger --wait`: the run was skipped.
pub(crate) const RUN_SKIPPED: u8 = 5;
