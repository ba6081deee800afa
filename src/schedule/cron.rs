//! Cron schedules: parsing expressions and time zones, and working out when a
//! schedule fires.
//!
//! A schedule is a cron expression read on the wall clock of an IANA time
//! zone, shifted by a fixed per-connection jitter so that thousands of
//! connections that share `0 * * * *` do not all start in the same second.
//! [`FireRule`] bundles those three things and answers the two questions the
//! scheduler asks: when is the next fire ([`FireRule::next_after`]), and what
//! was the last fire that should have happened by now
//! ([`FireRule::latest_at_or_before`], for catching up after downtime).
//!
//! # Expressions
//!
//! [`parse_cron`] uses croner 4 with these settings:
//!
//! - five fields (minute, hour, day of month, month, day of week; the second
//!   is 0), or six fields with a leading seconds field; croner's optional
//!   seventh (year) field is rejected;
//! - the macros `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily` and
//!   `@hourly`, in any letter case; croner has no `@midnight` or `@reboot`, so
//!   those are rejected;
//! - Vixie cron's rule when both day fields are restricted: a day matches when
//!   either field matches, so `0 0 13 * 5` fires on every 13th and on every
//!   Friday;
//! - croner's extensions (`L`, `W`, `#`, `?`, the names `MON` and `JAN`, and a
//!   `+` before the day of week to require both day fields) as croner defines
//!   them.
//!
//! An expression that parses but can never fire, such as `0 0 30 2 *` or
//! `,,, * * * *`, is rejected as well: a schedule that silently never runs is
//! always a mistake, and searching for its next fire would cost milliseconds
//! (seconds, for an empty time field) on every call.
//!
//! [`parse_cron`] parses afresh on every call. A [`CronExpr`] is only an
//! [`Arc`] around croner's parse, so a [`FireRule`] stays small and cheap to
//! clone; the engine keeps one parse per distinct expression text, and only a
//! bounded number of them, in `schedule::exprs`, the one cache of parses.
//!
//! # Daylight saving time
//!
//! The rule is the wall clock's: every local time that the expression matches
//! fires exactly once.
//!
//! - A matching time that does not exist, because the clocks spring forward
//!   over it, fires at the first instant after the gap. `30 2 * * *` in
//!   Europe/Berlin on 2026-03-29 fires at 03:00 CEST (01:00 UTC). Several
//!   skipped times collapse into that one fire.
//! - A matching time that happens twice, because the clocks fall back, fires
//!   at its first occurrence only. `30 2 * * *` in Europe/Berlin on 2026-10-25
//!   fires at 02:30 CEST (00:30 UTC) and not at 02:30 CET.
//!
//! The same rule holds for frequent expressions. `*/15 * * * *` fires at
//! 02:00, 02:15, 02:30 and 02:45 in the first pass of Berlin's repeated hour
//! and not again in the second pass, so it pauses for 75 minutes once a year;
//! `5 * * * *` fires at 03:00 and 03:05 on the spring-forward day, because its
//! 02:05 does not exist. One rule for every expression was chosen over croner's
//! split (below) because it needs no guess about which expressions are
//! "intervals", never fires more often than the wall clock shows matching
//! times, never loses a fire, and costs at most one longer pause a year.
//!
//! croner 4 has its own handling, but only for expressions with exactly one
//! second, one minute and one hour: those fire after a gap and once in an
//! overlap, as above. Every other expression skips matching times inside a gap
//! and fires in both passes of an overlap, so `30 2,14 * * *` would lose its
//! 02:30 run in spring and run twice in autumn. This module therefore lets
//! croner search naive wall-clock time, where no time is missing or repeated,
//! and maps each match to an instant itself with chrono-tz.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{
    DateTime, FixedOffset, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta,
    TimeZone, Utc,
};
use chrono_tz::{GapInfo, Tz};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// How far back [`FireRule::latest_at_or_before`] looks: five years, with room
/// for two leap days.
const CATCH_UP_HORIZON_DAYS: i64 = 5 * 365 + 2;

/// How many matches of the expression one search examines before it gives up.
///
/// The first match is the answer in every time zone we know of; the later ones
/// only guard against a time zone quirk that the reasoning in
/// [`FireRule::next_after`] did not foresee, and the bound turns such a quirk
/// into `None` instead of a long loop.
const MAX_CANDIDATES: usize = 64;

/// The start of the window in which [`parse_cron`] checks that an expression
/// fires at all.
///
/// croner stops every search at the year 5000, and the Gregorian calendar,
/// weekdays included, repeats every 400 years. An expression without a year
/// field that matches nothing between 4590 and 5000 therefore matches nothing
/// ever, and starting there bounds the check to 410 years of searching.
const FIRES_AT_ALL_PROBE: NaiveDateTime = match NaiveDate::from_ymd_opt(4590, 1, 1) {
    Some(date) => date.and_time(NaiveTime::MIN),
    // This arm runs only during compilation, where it would stop the build;
    // 4590-01-01 is a valid date, so it is never taken.
    None => panic!("4590-01-01 is a valid date"),
};

/// A parsed cron expression.
///
/// It is an [`Arc`] around croner's parse, which the engine shares between
/// every schedule that uses the same expression text, so cloning is a
/// reference-count increment.
#[derive(Clone)]
pub struct CronExpr {
    cron: Arc<Cron>,
}

impl CronExpr {
    /// Whether `self` and `other` are one shared parse, not merely equal.
    #[cfg(test)]
    pub(crate) fn shares_parse_with(&self, other: &CronExpr) -> bool {
        Arc::ptr_eq(&self.cron, &other.cron)
    }

    /// Returns the expression in croner's normalised form: upper case, with
    /// macros and month or weekday names replaced by numbers (`@daily` reads
    /// `0 0 * * *`).
    pub fn as_str(&self) -> &str {
        self.cron.as_str()
    }
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CronExpr").field(&self.as_str()).finish()
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        // The engine's schedules share one parse per expression text, so the
        // pointer check settles most comparisons without looking at the
        // pattern.
        Arc::ptr_eq(&self.cron, &other.cron) || self.cron == other.cron
    }
}

impl Eq for CronExpr {}

/// Why an expression or a time zone name was refused.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// The expression does not parse, or it can never fire.
    #[error("bad cron expression {expr:?}: {reason}")]
    Syntax {
        /// The expression as it was given, before trimming.
        expr: String,
        /// croner's explanation, or this module's when the expression parses
        /// but never fires.
        reason: String,
    },
    /// The name is not an IANA time zone that chrono-tz knows.
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
}

/// Parses a cron expression; see the [module documentation](self) for the
/// accepted syntax.
///
/// Surrounding whitespace is ignored. Every call compiles the expression
/// and checks that it fires, so a caller that parses the same text
/// repeatedly keeps its parses itself, as the engine does in
/// `schedule::exprs`.
pub fn parse_cron(expr: &str) -> Result<CronExpr, CronError> {
    let cron = compile(expr.trim()).map_err(|reason| CronError::Syntax {
        expr: expr.to_owned(),
        reason,
    })?;
    Ok(CronExpr {
        cron: Arc::new(cron),
    })
}

/// Parses an IANA time zone name such as `Europe/Berlin` or `UTC`.
///
/// Surrounding whitespace is ignored; the name itself is case-sensitive, as in
/// the IANA database.
pub fn parse_timezone(name: &str) -> Result<Tz, CronError> {
    name.trim()
        .parse::<Tz>()
        .map_err(|_| CronError::TimeZone(name.to_owned()))
}

/// A schedule's firing rule: expression + zone + fixed jitter offset.
#[derive(Clone, Debug)]
pub struct FireRule {
    /// The cron expression, read on the wall clock of `tz`.
    pub expr: CronExpr,
    /// The time zone whose wall clock the expression is read on.
    pub tz: Tz,
    /// How long after each match of the expression the schedule fires; see
    /// [`jitter_offset`].
    pub jitter: Duration,
}

impl FireRule {
    /// Returns the first fire instant strictly after `after`, jitter included,
    /// or `None` if the expression never fires again.
    ///
    /// Feeding each result back in walks every fire exactly once, in strictly
    /// increasing order. `None` also comes back past the year 5000, where
    /// croner stops searching, and for a jitter too large for chrono.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // A fire is a tick of the expression plus the jitter, so the first fire
        // after `after` belongs to the first tick after `after - jitter`.
        let jitter = self.jitter_delta()?;
        let tick = self.next_tick(after.checked_sub_signed(jitter)?)?;
        tick.checked_add_signed(jitter)
    }

    /// Returns the most recent fire instant at or before `at`, jitter
    /// included, for catching up after downtime; `None` if there was none in
    /// the five years before `at`.
    ///
    /// A fire returned here is one that [`next_after`](Self::next_after) also
    /// produces.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let jitter = self.jitter_delta()?;
        let tick = self.latest_tick(at.checked_sub_signed(jitter)?)?;
        tick.checked_add_signed(jitter)
    }

    /// The jitter as a chrono duration, or `None` if it is too large for one
    /// (hundreds of millions of years).
    fn jitter_delta(&self) -> Option<TimeDelta> {
        TimeDelta::from_std(self.jitter).ok()
    }

    /// The first tick (fire without jitter) strictly after `after`.
    fn next_tick(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Ticks come from matching wall-clock times through `fire_instant`,
        // which never maps a later wall-clock time to an earlier instant. So
        // the answer is the first matching wall-clock time whose instant lies
        // after `after`, and the search can start at `after`'s own reading,
        // with one exception: in the second pass of a repeated range, the
        // readings up to the end of the range already fired in the first pass,
        // so the search starts where the range ends.
        let (wall, offset) = wall_clock(self.tz, &after)?;
        let (mut from, mut inclusive) = match end_of_second_pass(self.tz, wall, offset) {
            Some(end) => (end, true),
            None => (wall, false),
        };
        for _ in 0..MAX_CANDIDATES {
            // croner fails only when no match exists before the year 5000.
            let candidate = self.expr.cron.find_next_occurrence(&from, inclusive).ok()?;
            if let Some(fire) = fire_instant(self.tz, candidate) {
                if fire > after {
                    return Some(fire);
                }
            }
            from = candidate;
            inclusive = false;
        }
        None
    }

    /// The last tick (fire without jitter) at or before `at`, within the
    /// catch-up horizon.
    fn latest_tick(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // The mirror image of `next_tick`: every matching wall-clock time up to
        // `at`'s reading fired at or before `at`, and in the second pass of a
        // repeated range so did every one up to the end of the range.
        let (wall, offset) = wall_clock(self.tz, &at)?;
        let horizon = wall.checked_sub_signed(TimeDelta::days(CATCH_UP_HORIZON_DAYS))?;
        let (mut from, mut inclusive) = match end_of_second_pass(self.tz, wall, offset) {
            Some(end) => (end, false),
            None => (wall, true),
        };
        for _ in 0..MAX_CANDIDATES {
            let candidate = self
                .expr
                .cron
                .find_previous_occurrence(&from, inclusive)
                .ok()?;
            if candidate < horizon {
                return None;
            }
            if let Some(fire) = fire_instant(self.tz, candidate) {
                if fire <= at {
                    return Some(fire);
                }
            }
            from = candidate;
            inclusive = false;
        }
        None
    }
}

/// Returns a connection's fixed jitter: a whole number of seconds in
/// `[0, jitter_seconds)`, or zero when `jitter_seconds <= 0`.
///
/// The offset is the FNV-1a 64 hash of the id's UTF-8 bytes modulo
/// `jitter_seconds`, so it is the same in every process and every release.
/// std's `DefaultHasher` is not used because its output may change between
/// Rust versions, and a changed offset would move every schedule at once.
pub fn jitter_offset(connection_id: &str, jitter_seconds: i32) -> Duration {
    match u64::try_from(jitter_seconds) {
        Ok(range) if range > 0 => Duration::from_secs(fnv1a_64(connection_id.as_bytes()) % range),
        _ => Duration::ZERO,
    }
}

/// The 64-bit FNV-1a hash, written out so that its values are fixed
/// forever: for values that must be the same in every process and every
/// release, a connection's jitter here and the directory of a checkout's
/// private PostgreSQL (`dev::pgcluster`).
pub(crate) fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// Parses `text` with the module's croner settings and checks that it can
/// fire, returning the reason to show the user otherwise.
fn compile(text: &str) -> Result<Cron, String> {
    let parser = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        // Vixie cron's OR of the two day fields; this is croner's default, and
        // it is spelled out because the product depends on it.
        .dom_and_dow(false)
        .build();
    let cron = parser.parse(text).map_err(|error| error.to_string())?;

    // croner accepts a field that lists no value at all, such as `,,,`. Such a
    // time field would make every search step hour by hour to the year 5000,
    // which takes seconds, so it is caught here before the search below.
    let pattern = &cron.pattern;
    for (name, field) in [
        ("second", &pattern.seconds),
        ("minute", &pattern.minutes),
        ("hour", &pattern.hours),
        ("month", &pattern.months),
    ] {
        if field.values().is_empty() {
            return Err(format!("the {name} field matches no value"));
        }
    }
    if cron
        .find_next_occurrence(&FIRES_AT_ALL_PROBE, true)
        .is_err()
    {
        return Err(
            "the expression matches no date (such as February 30th), so it never fires".to_owned(),
        );
    }
    Ok(cron)
}

/// The wall-clock reading of `instant` in `tz` and the UTC offset in force
/// then, or `None` if the reading is outside chrono's range of dates.
fn wall_clock(tz: Tz, instant: &DateTime<Utc>) -> Option<(NaiveDateTime, FixedOffset)> {
    let utc = instant.naive_utc();
    let offset = tz.offset_from_utc_datetime(&utc).fix();
    Some((utc.checked_add_offset(offset)?, offset))
}

/// If `wall`, read with `offset`, lies in the second pass of a range of
/// wall-clock times that `tz` repeats, returns the first wall-clock time after
/// that range; otherwise `None`.
fn end_of_second_pass(tz: Tz, wall: NaiveDateTime, offset: FixedOffset) -> Option<NaiveDateTime> {
    let LocalResult::Ambiguous(first, second) = tz.offset_from_local_datetime(&wall) else {
        return None;
    };
    let first = first.fix();
    if first == offset {
        return None;
    }
    // The clocks went back by `repeated` seconds, so the range ends within that
    // many seconds after `wall`. chrono-tz does not say where, so bisect on
    // whole seconds, which is exact because offsets and transitions are whole
    // seconds: about twelve look-ups for an hour, on one hour a year.
    let repeated = i64::from(first.local_minus_utc()) - i64::from(second.fix().local_minus_utc());
    let mut inside = wall.and_utc().timestamp();
    let mut outside = inside.checked_add(repeated)?;
    while outside - inside > 1 {
        let middle = inside + (outside - inside) / 2;
        let repeats = matches!(
            tz.offset_from_local_datetime(&naive_from_seconds(middle)?),
            LocalResult::Ambiguous(..)
        );
        if repeats {
            inside = middle;
        } else {
            outside = middle;
        }
    }
    naive_from_seconds(outside)
}

/// The instant at which the matching wall-clock time `wall` fires in `tz`:
/// its only occurrence, its first occurrence if the clocks repeat it, or the
/// first instant after the gap if the clocks skip it.
fn fire_instant(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    let offset = match tz.offset_from_local_datetime(&wall) {
        LocalResult::Single(offset) | LocalResult::Ambiguous(offset, _) => offset.fix(),
        LocalResult::None => {
            return GapInfo::new(&wall, &tz)?
                .end
                .map(|end| end.with_timezone(&Utc));
        }
    };
    Some(wall.checked_sub_offset(offset)?.and_utc())
}

/// The naive date and time `seconds` after the Unix epoch.
fn naive_from_seconds(seconds: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp(seconds, 0).map(|instant| instant.naive_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::Timelike;

    /// Reads a UTC instant written as `YYYY-MM-DD HH:MM:SS`.
    fn utc(text: &str) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
            .unwrap_or_else(|error| panic!("test instant {text:?} is malformed: {error}"))
            .and_utc()
    }

    fn rule(expr: &str, zone: &str, jitter_seconds: u64) -> FireRule {
        FireRule {
            expr: parse_cron(expr).unwrap_or_else(|error| panic!("{error}")),
            tz: parse_timezone(zone).unwrap_or_else(|error| panic!("{error}")),
            jitter: Duration::from_secs(jitter_seconds),
        }
    }

    /// Asserts that the fires of `expr` in `zone` strictly after `after` are
    /// `expected`, in order, with each fire found from the previous one.
    fn check(expr: &str, zone: &str, after: &str, expected: &[&str]) {
        let rule = rule(expr, zone, 0);
        let mut at = utc(after);
        for want in expected {
            let got = rule.next_after(at);
            assert_eq!(
                got,
                Some(utc(want)),
                "{expr:?} in {zone}: the fire after {at}"
            );
            at = utc(want);
        }
    }

    /// Asserts what `latest_at_or_before` says for `expr` in `zone` at `at`.
    fn check_latest(expr: &str, zone: &str, jitter_seconds: u64, at: &str, expected: Option<&str>) {
        let rule = rule(expr, zone, jitter_seconds);
        assert_eq!(
            rule.latest_at_or_before(utc(at)),
            expected.map(utc),
            "{expr:?} in {zone} with jitter {jitter_seconds}s: the latest fire at or before {at}"
        );
    }

    #[test]
    fn five_field_expressions() {
        // 2026-05-01 is a Friday.
        check(
            "*/20 9-10 * * 1-5",
            "UTC",
            "2026-05-01 10:30:00",
            &[
                "2026-05-01 10:40:00",
                "2026-05-04 09:00:00",
                "2026-05-04 09:20:00",
                "2026-05-04 09:40:00",
                "2026-05-04 10:00:00",
            ],
        );
        check(
            "0 12 * JAN,JUL MON",
            "UTC",
            "2026-06-01 00:00:00",
            &["2026-07-06 12:00:00", "2026-07-13 12:00:00"],
        );
        // A five-field expression fires on the minute, not on every second of it.
        check(
            "* * * * *",
            "UTC",
            "2026-05-01 10:00:00",
            &["2026-05-01 10:01:00", "2026-05-01 10:02:00"],
        );
    }

    #[test]
    fn six_field_expressions_have_a_leading_seconds_field() {
        check(
            "*/20 * * * * *",
            "UTC",
            "2026-05-01 10:00:05",
            &[
                "2026-05-01 10:00:20",
                "2026-05-01 10:00:40",
                "2026-05-01 10:01:00",
            ],
        );
        check(
            "30 15 8 * * *",
            "UTC",
            "2026-05-01 09:00:00",
            &["2026-05-02 08:15:30", "2026-05-03 08:15:30"],
        );
    }

    #[test]
    fn macros() {
        let after = "2026-05-01 10:00:00";
        check("@hourly", "UTC", after, &["2026-05-01 11:00:00"]);
        check("@daily", "UTC", after, &["2026-05-02 00:00:00"]);
        check("@weekly", "UTC", after, &["2026-05-03 00:00:00"]);
        check("@monthly", "UTC", after, &["2026-06-01 00:00:00"]);
        check("@yearly", "UTC", after, &["2027-01-01 00:00:00"]);
        check("@annually", "UTC", after, &["2027-01-01 00:00:00"]);
        check("@Daily", "UTC", after, &["2026-05-02 00:00:00"]);
        check(" \t@daily\n", "UTC", after, &["2026-05-02 00:00:00"]);
        // Midnight in Berlin is 22:00 UTC in summer.
        check("@daily", "Europe/Berlin", after, &["2026-05-01 22:00:00"]);
        // croner has no @midnight or @reboot.
        for unsupported in ["@midnight", "@reboot", "@daily 5"] {
            assert!(
                matches!(parse_cron(unsupported), Err(CronError::Syntax { .. })),
                "{unsupported:?} should be refused"
            );
        }
    }

    #[test]
    fn restricted_day_of_month_and_day_of_week_are_ored_like_vixie_cron() {
        // Fridays in April 2026 are the 3rd, 10th, 17th and 24th, and the 13th
        // is a Monday.
        check(
            "0 0 13 * 5",
            "UTC",
            "2026-04-01 00:00:00",
            &[
                "2026-04-03 00:00:00",
                "2026-04-10 00:00:00",
                "2026-04-13 00:00:00",
                "2026-04-17 00:00:00",
                "2026-04-24 00:00:00",
                "2026-05-01 00:00:00",
            ],
        );
        // A `*` in either day field leaves only the other one in force.
        check(
            "0 0 13 * *",
            "UTC",
            "2026-04-01 00:00:00",
            &["2026-04-13 00:00:00", "2026-05-13 00:00:00"],
        );
    }

    #[test]
    fn fixed_times_across_daylight_saving_changes() {
        // (expression, zone, after, fires). Berlin goes 02:00 CET -> 03:00
        // CEST at 01:00 UTC on 2026-03-29 and 03:00 CEST -> 02:00 CET at 01:00
        // UTC on 2026-10-25. New York goes 02:00 EST -> 03:00 EDT at 07:00 UTC
        // on 2026-03-08 and 02:00 EDT -> 01:00 EST at 06:00 UTC on 2026-11-01.
        // Each case also checks that the next fire is on the following day.
        let cases: &[(&str, &str, &str, &[&str])] = &[
            // Spring forward, Berlin: 02:30 does not exist, 01:30 does.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-27 12:00:00",
                &[
                    "2026-03-28 01:30:00",
                    "2026-03-29 01:00:00",
                    "2026-03-30 00:30:00",
                ],
            ),
            (
                "30 1 * * *",
                "Europe/Berlin",
                "2026-03-28 12:00:00",
                &["2026-03-29 00:30:00", "2026-03-29 23:30:00"],
            ),
            // Fall back, Berlin: 02:30 happens twice, 01:30 once.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-24 12:00:00",
                &["2026-10-25 00:30:00", "2026-10-26 01:30:00"],
            ),
            (
                "30 1 * * *",
                "Europe/Berlin",
                "2026-10-24 12:00:00",
                &["2026-10-24 23:30:00", "2026-10-26 00:30:00"],
            ),
            // Spring forward, New York: 02:30 does not exist, 01:30 does.
            (
                "30 2 * * *",
                "America/New_York",
                "2026-03-07 12:00:00",
                &["2026-03-08 07:00:00", "2026-03-09 06:30:00"],
            ),
            (
                "30 1 * * *",
                "America/New_York",
                "2026-03-07 12:00:00",
                &["2026-03-08 06:30:00", "2026-03-09 05:30:00"],
            ),
            // Fall back, New York: 01:30 happens twice, 02:30 once.
            (
                "30 1 * * *",
                "America/New_York",
                "2026-10-31 12:00:00",
                &["2026-11-01 05:30:00", "2026-11-02 06:30:00"],
            ),
            (
                "30 2 * * *",
                "America/New_York",
                "2026-10-31 12:00:00",
                &["2026-11-01 07:30:00", "2026-11-02 07:30:00"],
            ),
            // Several hours or a stepped minute with a fixed hour follow the
            // same rule; croner's own handling would skip the gap and fire
            // twice in the overlap here.
            (
                "30 2,14 * * *",
                "Europe/Berlin",
                "2026-03-28 12:00:00",
                &[
                    "2026-03-28 13:30:00",
                    "2026-03-29 01:00:00",
                    "2026-03-29 12:30:00",
                    "2026-03-30 00:30:00",
                ],
            ),
            (
                "30 2,14 * * *",
                "Europe/Berlin",
                "2026-10-24 12:00:00",
                &[
                    "2026-10-24 12:30:00",
                    "2026-10-25 00:30:00",
                    "2026-10-25 13:30:00",
                    "2026-10-26 01:30:00",
                ],
            ),
            (
                "*/15 2 * * *",
                "Europe/Berlin",
                "2026-03-28 12:00:00",
                &["2026-03-29 01:00:00", "2026-03-30 00:00:00"],
            ),
            (
                "*/15 2 * * *",
                "Europe/Berlin",
                "2026-10-24 12:00:00",
                &[
                    "2026-10-25 00:00:00",
                    "2026-10-25 00:15:00",
                    "2026-10-25 00:30:00",
                    "2026-10-25 00:45:00",
                    "2026-10-26 01:00:00",
                ],
            ),
            // A six-field time in the gap fires at the end of the gap too.
            (
                "15 30 2 * * *",
                "America/New_York",
                "2026-03-07 12:00:00",
                &["2026-03-08 07:00:00", "2026-03-09 06:30:15"],
            ),
        ];
        for (expr, zone, after, fires) in cases {
            check(expr, zone, after, fires);
        }
    }

    #[test]
    fn frequent_expressions_fire_once_per_wall_clock_time() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            // Spring forward: 02:00 to 02:45 collapse into 03:00 CEST, which
            // matches anyway.
            (
                "*/15 * * * *",
                "Europe/Berlin",
                "2026-03-29 00:30:00",
                &[
                    "2026-03-29 00:45:00",
                    "2026-03-29 01:00:00",
                    "2026-03-29 01:15:00",
                ],
            ),
            // Fall back: the repeated hour fires in its first pass only, so
            // 02:45 CEST is followed by 03:00 CET, 75 minutes later.
            (
                "*/15 * * * *",
                "Europe/Berlin",
                "2026-10-25 00:30:00",
                &[
                    "2026-10-25 00:45:00",
                    "2026-10-25 02:00:00",
                    "2026-10-25 02:15:00",
                ],
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01 03:30:00",
                &[
                    "2026-11-01 04:00:00",
                    "2026-11-01 05:00:00",
                    "2026-11-01 07:00:00",
                    "2026-11-01 08:00:00",
                ],
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-03-08 05:30:00",
                &[
                    "2026-03-08 06:00:00",
                    "2026-03-08 07:00:00",
                    "2026-03-08 08:00:00",
                ],
            ),
            // 02:05 does not exist, so it fires at 03:00 CEST, just before
            // 03:05 CEST.
            (
                "5 * * * *",
                "Europe/Berlin",
                "2026-03-29 00:00:00",
                &[
                    "2026-03-29 00:05:00",
                    "2026-03-29 01:00:00",
                    "2026-03-29 01:05:00",
                ],
            ),
            // Every second: the second pass of the repeated hour is silent.
            (
                "* * * * * *",
                "Europe/Berlin",
                "2026-10-25 00:59:58",
                &["2026-10-25 00:59:59", "2026-10-25 02:00:00"],
            ),
        ];
        for (expr, zone, after, fires) in cases {
            check(expr, zone, after, fires);
        }
    }

    #[test]
    fn searching_from_inside_the_second_pass_of_a_repeated_hour() {
        // 01:10 UTC on 2026-10-25 reads 02:10 CET in Berlin, the second pass.
        check(
            "30 2 * * *",
            "Europe/Berlin",
            "2026-10-25 01:10:00",
            &["2026-10-26 01:30:00"],
        );
        check(
            "*/15 * * * *",
            "Europe/Berlin",
            "2026-10-25 01:10:00",
            &["2026-10-25 02:00:00"],
        );
        check(
            "* * * * * *",
            "Europe/Berlin",
            "2026-10-25 01:59:58",
            &["2026-10-25 02:00:00"],
        );
        // Early in the second pass, an every-second expression has thousands of
        // wall-clock times behind it that already fired in the first pass; the
        // search has to jump over them, not walk them.
        check(
            "* * * * * *",
            "Europe/Berlin",
            "2026-10-25 01:00:05",
            &["2026-10-25 02:00:00"],
        );
        check(
            "* * * * * *",
            "America/New_York",
            "2026-11-01 06:00:00",
            &["2026-11-01 07:00:00"],
        );
        // Looking back from the second pass finds the end of the first pass,
        // the latest fire, not the first pass's copy of the current reading.
        for (expr, at, latest) in [
            ("* * * * * *", "2026-10-25 01:00:05", "2026-10-25 00:59:59"),
            ("*/15 * * * *", "2026-10-25 01:20:00", "2026-10-25 00:45:00"),
            ("10 2 * * *", "2026-10-25 01:20:00", "2026-10-25 00:10:00"),
            ("20 2 * * *", "2026-10-25 01:20:00", "2026-10-25 00:20:00"),
            ("30 2 * * *", "2026-10-25 01:20:00", "2026-10-25 00:30:00"),
        ] {
            check_latest(expr, "Europe/Berlin", 0, at, Some(latest));
        }
        // A fractional second inside the second pass changes nothing.
        let rule = rule("*/15 * * * *", "Europe/Berlin", 0);
        let after = utc("2026-10-25 01:10:00") + TimeDelta::milliseconds(250);
        assert_eq!(rule.next_after(after), Some(utc("2026-10-25 02:00:00")));
    }

    #[test]
    fn unusual_transitions() {
        // Samoa skipped 2011-12-30 entirely, going from 23:59:59 UTC-10 on the
        // 29th to 00:00 UTC+14 on the 31st, so noon on the 30th fires at that
        // midnight.
        check(
            "0 12 * * *",
            "Pacific/Apia",
            "2011-12-29 00:00:00",
            &[
                "2011-12-29 22:00:00",
                "2011-12-30 10:00:00",
                "2011-12-30 22:00:00",
            ],
        );
        // Lord Howe Island moves its clocks by half an hour: 02:00 -> 02:30 on
        // 2026-10-04 (15:30 UTC the day before) and 02:00 -> 01:30 on
        // 2026-04-05 (15:00 UTC the day before).
        check(
            "15 2 * * *",
            "Australia/Lord_Howe",
            "2026-10-02 12:00:00",
            &[
                "2026-10-02 15:45:00",
                "2026-10-03 15:30:00",
                "2026-10-04 15:15:00",
            ],
        );
        check(
            "45 1 * * *",
            "Australia/Lord_Howe",
            "2026-04-03 12:00:00",
            &[
                "2026-04-03 14:45:00",
                "2026-04-04 14:45:00",
                "2026-04-05 15:15:00",
            ],
        );
    }

    #[test]
    fn next_after_is_strictly_after_even_within_a_second() {
        let rule = rule("0 3 * * *", "UTC", 0);
        let tick = utc("2026-05-10 03:00:00");
        assert_eq!(rule.next_after(tick), Some(utc("2026-05-11 03:00:00")));
        let just_after = tick + TimeDelta::milliseconds(500);
        assert_eq!(
            rule.next_after(just_after),
            Some(utc("2026-05-11 03:00:00"))
        );
        let just_before = tick - TimeDelta::milliseconds(500);
        assert_eq!(rule.next_after(just_before), Some(tick));
    }

    #[test]
    fn latest_at_or_before() {
        // (expression, zone, jitter in seconds, at, latest fire).
        let cases: &[(&str, &str, u64, &str, Option<&str>)] = &[
            (
                "0 3 * * *",
                "UTC",
                0,
                "2026-05-10 02:59:59",
                Some("2026-05-09 03:00:00"),
            ),
            // A fire exactly at `at` counts.
            (
                "0 3 * * *",
                "UTC",
                0,
                "2026-05-10 03:00:00",
                Some("2026-05-10 03:00:00"),
            ),
            // With 90 seconds of jitter the fire is at 03:01:30.
            (
                "0 3 * * *",
                "UTC",
                90,
                "2026-05-10 03:01:29",
                Some("2026-05-09 03:01:30"),
            ),
            (
                "0 3 * * *",
                "UTC",
                90,
                "2026-05-10 03:01:30",
                Some("2026-05-10 03:01:30"),
            ),
            // Spring forward in Berlin: 02:30 fired at the end of the gap.
            (
                "30 2 * * *",
                "Europe/Berlin",
                0,
                "2026-03-29 01:00:00",
                Some("2026-03-29 01:00:00"),
            ),
            (
                "30 2 * * *",
                "Europe/Berlin",
                0,
                "2026-03-29 00:59:59",
                Some("2026-03-28 01:30:00"),
            ),
            // Fall back in Berlin, asked during the second pass (02:45 CET):
            // 02:30 fired in the first pass, and so did */15's 02:45.
            (
                "30 2 * * *",
                "Europe/Berlin",
                0,
                "2026-10-25 01:45:00",
                Some("2026-10-25 00:30:00"),
            ),
            (
                "*/15 * * * *",
                "Europe/Berlin",
                0,
                "2026-10-25 01:45:00",
                Some("2026-10-25 00:45:00"),
            ),
            (
                "*/15 * * * *",
                "Europe/Berlin",
                0,
                "2026-10-25 02:00:00",
                Some("2026-10-25 02:00:00"),
            ),
            // New York's repeated 01:xx, asked at 01:40 EST.
            (
                "30 1 * * *",
                "America/New_York",
                0,
                "2026-11-01 06:40:00",
                Some("2026-11-01 05:30:00"),
            ),
            // 29 February on a Monday: 2016 is more than five years before
            // 2026, but within five years of 2020.
            ("0 0 29 2 +1", "UTC", 0, "2026-01-01 00:00:00", None),
            (
                "0 0 29 2 +1",
                "UTC",
                0,
                "2020-01-01 00:00:00",
                Some("2016-02-29 00:00:00"),
            ),
            (
                "0 0 1 1 *",
                "UTC",
                0,
                "2026-05-10 00:00:00",
                Some("2026-01-01 00:00:00"),
            ),
        ];
        for &(expr, zone, jitter, at, expected) in cases {
            check_latest(expr, zone, jitter, at, expected);
        }
    }

    #[test]
    fn jitter_is_deterministic_and_in_range() {
        // Published FNV-1a 64 test vectors pin the hash, and with it every
        // connection's offset, across releases.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_64(b"foo"), 0xdcb2_7518_fed9_d577);
        assert_eq!(
            jitter_offset("foobar", 3600),
            Duration::from_secs(0x8594_4171_f739_67e8 % 3600)
        );
        // Two offsets written out, so that a change to the hash or to how
        // it becomes seconds shows here as moved schedules.
        assert_eq!(jitter_offset("conn-1", 300), Duration::from_secs(1));
        assert_eq!(
            jitter_offset("alice-github", 3600),
            Duration::from_secs(1069)
        );

        for id in [
            "",
            "a",
            "conn-1",
            "conn-2",
            "ünïcödé",
            "a much longer connection id",
        ] {
            assert_eq!(jitter_offset(id, 0), Duration::ZERO);
            assert_eq!(jitter_offset(id, -5), Duration::ZERO);
            assert_eq!(jitter_offset(id, i32::MIN), Duration::ZERO);
            assert_eq!(jitter_offset(id, 1), Duration::ZERO);
            assert_eq!(jitter_offset(id, 300), jitter_offset(id, 300));
            assert_eq!(jitter_offset(id, 300).subsec_nanos(), 0);
        }
        let mut distinct = std::collections::HashSet::new();
        for n in 0..1000 {
            let offset = jitter_offset(&format!("connection-{n}"), 60);
            assert!(offset < Duration::from_secs(60), "{offset:?}");
            distinct.insert(offset);
        }
        // A thousand ids over sixty slots should use nearly all of them.
        assert!(
            distinct.len() >= 55,
            "only {} distinct offsets",
            distinct.len()
        );
        assert!(jitter_offset("conn", i32::MAX) < Duration::from_secs(i32::MAX as u64));
    }

    #[test]
    fn jitter_shifts_every_fire() {
        let rule = rule("0 * * * *", "UTC", 90);
        check_fires_from(&rule, "2026-05-10 10:00:00", "2026-05-10 10:01:30");
        check_fires_from(&rule, "2026-05-10 10:01:29", "2026-05-10 10:01:30");
        check_fires_from(&rule, "2026-05-10 10:01:30", "2026-05-10 11:01:30");
        // Jitter longer than the period still walks every fire once.
        let rule = rule_with_jitter("*/10 * * * *", "Europe/Berlin", Duration::from_secs(3599));
        let mut at = utc("2026-10-25 00:00:00");
        let mut fires = Vec::new();
        for _ in 0..20 {
            let fire = rule.next_after(at).expect("the expression keeps firing");
            assert!(fire > at);
            assert_eq!(rule.latest_at_or_before(fire), Some(fire));
            fires.push(fire);
            at = fire;
        }
        assert_eq!(fires[0], utc("2026-10-25 00:09:59"));
    }

    fn check_fires_from(rule: &FireRule, after: &str, expected: &str) {
        assert_eq!(
            rule.next_after(utc(after)),
            Some(utc(expected)),
            "after {after}"
        );
    }

    fn rule_with_jitter(expr: &str, zone: &str, jitter: Duration) -> FireRule {
        FireRule {
            jitter,
            ..rule(expr, zone, 0)
        }
    }

    #[test]
    fn bad_expressions_are_syntax_errors() {
        let bad = [
            "",
            "   ",
            "garbage",
            "* * * *",
            "* * * * * * *",
            "0 0 1 1 * 2030 x",
            "60 * * * *",
            "* 24 * * *",
            "*/0 * * * *",
            "* * 32 * *",
            "* * * 13 *",
            "* * * * 8",
            "* * * * 5#6",
            "@midnight",
            "@reboot",
            // Parses, but never fires.
            "0 0 30 2 *",
            "0 0 31 4 *",
            ",,, * * * *",
            "* * * * +",
            "0 0 31 2 +1",
        ];
        for expr in bad {
            match parse_cron(expr) {
                Err(CronError::Syntax {
                    expr: shown,
                    reason,
                }) => {
                    assert_eq!(shown, expr);
                    assert!(!reason.is_empty(), "{expr:?} needs a reason");
                }
                other => panic!("{expr:?} should be a syntax error, got {other:?}"),
            }
        }
        let error = parse_cron("*/0 * * * *").expect_err("a zero step is refused");
        assert_eq!(
            error.to_string(),
            "bad cron expression \"*/0 * * * *\": Component error: Step cannot be zero."
        );
    }

    #[test]
    fn time_zones() {
        for good in [
            "Europe/Berlin",
            "America/New_York",
            "UTC",
            "Etc/GMT+5",
            " Asia/Tokyo ",
        ] {
            assert!(parse_timezone(good).is_ok(), "{good:?}");
        }
        for bad in ["", "Mars/Olympus_Mons", "CEST+1", "europe/berlin"] {
            match parse_timezone(bad) {
                Err(CronError::TimeZone(name)) => assert_eq!(name, bad),
                other => panic!("{bad:?} should be an unknown zone, got {other:?}"),
            }
        }
        let error = parse_timezone("Mars/Olympus_Mons").expect_err("Mars has no IANA zone");
        assert_eq!(error.to_string(), "unknown time zone \"Mars/Olympus_Mons\"");
    }

    #[test]
    fn equal_expressions_are_equal() {
        // Sharing one parse per text is the engine's table's job; see
        // `schedule::exprs`.
        let a = parse_cron("0 */6 * * *").expect("valid");
        let b = parse_cron("  0 */6 * * *\t").expect("valid");
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "0 */6 * * *");
        assert_ne!(a, parse_cron("0 */7 * * *").expect("valid"));
        // A FireRule is an Arc, a two-byte zone and a Duration.
        assert!(std::mem::size_of::<FireRule>() <= 32);
    }

    #[test]
    fn never_panics_on_odd_input() {
        let mut inputs: Vec<String> = [
            "",
            " ",
            "\0",
            "*",
            "@",
            "@@daily",
            "@DAILY@",
            "@hourly @daily",
            "é * * * *",
            "ß * * * *",
            "ﬀ * * * *",
            "İ * * * *",
            "😀 * * * *",
            "* * * * MON😀",
            "99999999999999999999 * * * *",
            "4294967296 * * * *",
            "65536 * * * *",
            "*/65536 * * * *",
            "*/99999999999 * * * *",
            "*/0 * * * *",
            "0/0 * * * *",
            "60 * * * *",
            "-1 * * * *",
            "- * * * *",
            "1-0 * * * *",
            "59-0 * * * *",
            "*/ * * * *",
            "/5 * * * *",
            "5/ * * * *",
            "1,,2 * * * *",
            ",,, * * * *",
            "* * * * * * *",
            "* * * * * * * *",
            "* * * *",
            "0 0 0 0 0",
            "? ? ? ? ?",
            "* * * * +",
            "* * * * ++5",
            "+ * * * *",
            "* * L * *",
            "* * LW * *",
            "* * 0W * *",
            "* * 32W * *",
            "* * W * *",
            "* * * * 5#0",
            "* * * * 5#",
            "* * * * #",
            "* * * * 7#5",
            "* * * * 7L",
            "* * * * 0-7",
            "* * * * 7-1",
            "* * * * SUN-MON",
            "* * * DEC-JAN *",
            "0 0 29 2 1",
            "0 0 L 2 *",
            "0 0 0 * * L",
            "1 2 3 4 5 6",
            "*\t*\n*\r* *",
            "* * * * * *",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();

        // A fixed pseudo-random mix of field tokens, so the test is repeatable.
        // Most tokens are valid in every field, so that a good share of the
        // mixes parse and get evaluated; the rest are odd.
        let valid = ["*", "*/7", "1", "2", "1-5", "1,3", "2-4/2", "?"];
        let odd = [
            "*/0",
            "0",
            "59",
            "60",
            "23",
            "24",
            "31",
            "-1",
            "5-1",
            "L",
            "W",
            "LW",
            "5L",
            "5#2",
            "+5",
            "1/2",
            "/5",
            ",",
            "MON",
            "JAN",
            "é",
            "99999999999999999999",
            "0-59/13",
            "1,15,31",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let fields = 4 + random() % 4;
            let expr: Vec<&str> = (0..fields)
                .map(|_| {
                    if random() % 5 == 0 {
                        odd[(random() % odd.len() as u64) as usize]
                    } else {
                        valid[(random() % valid.len() as u64) as usize]
                    }
                })
                .collect();
            inputs.push(expr.join(" "));
        }

        let zone = parse_timezone("Europe/Berlin").expect("a valid zone");
        let instants = [
            utc("2026-03-29 00:59:00"),
            utc("2026-10-25 01:30:00"),
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
        ];
        let mut parsed = 0;
        for input in &inputs {
            let Ok(expr) = parse_cron(input) else {
                continue;
            };
            parsed += 1;
            let rule = FireRule {
                expr,
                tz: zone,
                jitter: Duration::from_secs(7),
            };
            for at in instants {
                if let Some(next) = rule.next_after(at) {
                    assert!(next > at, "{input:?} after {at}");
                }
                if let Some(latest) = rule.latest_at_or_before(at) {
                    assert!(latest <= at, "{input:?} at {at}");
                }
            }
        }
        // The sweep is only worth something if some of it parses.
        assert!(
            parsed >= 20,
            "only {parsed} of {} inputs parsed",
            inputs.len()
        );

        // Extreme jitter gives None rather than a panic.
        let rule = rule_with_jitter("* * * * *", "UTC", Duration::MAX);
        assert_eq!(rule.next_after(utc("2026-01-01 00:00:00")), None);
        assert_eq!(rule.latest_at_or_before(utc("2026-01-01 00:00:00")), None);
        // croner stops searching in the year 5000.
        let rule = rule_with_jitter("* * * * *", "UTC", Duration::ZERO);
        assert_eq!(rule.next_after(utc("5000-06-01 00:00:00")), None);
    }

    /// Walks a year of fires of `expr` in `zone` and checks that they strictly
    /// increase, land on matching wall-clock times (or a gap's end), agree with
    /// `latest_at_or_before`, and number `expected`.
    fn walk_a_year(
        expr: &str,
        zone: &str,
        expected: usize,
        wall_matches: impl Fn(u32, u32) -> bool,
    ) {
        let rule = rule(expr, zone, 0);
        let tz = rule.tz;
        let start = tz
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .expect("New Year's midnight exists once")
            .with_timezone(&Utc);
        let end = tz
            .with_ymd_and_hms(2027, 1, 1, 0, 0, 0)
            .single()
            .expect("New Year's midnight exists once")
            .with_timezone(&Utc);
        let mut at = start - TimeDelta::seconds(1);
        let mut count = 0;
        loop {
            let fire = rule.next_after(at).expect("the expression keeps firing");
            assert!(fire > at, "{expr:?} in {zone}: {fire} after {at}");
            if fire >= end {
                break;
            }
            let local = fire.with_timezone(&tz);
            // The end of a gap is the only fire allowed off the pattern.
            let after_gap = tz
                .from_local_datetime(&(local.naive_local() - TimeDelta::seconds(1)))
                .single()
                .is_none();
            assert!(
                wall_matches(local.hour(), local.minute()) || after_gap,
                "{expr:?} in {zone}: {local} does not match"
            );
            // Checking every tenth fire keeps the test quick in debug builds.
            if count % 10 == 1 {
                assert_eq!(rule.latest_at_or_before(fire), Some(fire));
                assert_eq!(
                    rule.latest_at_or_before(fire - TimeDelta::seconds(1)),
                    Some(at),
                    "{expr:?} in {zone}: the fire before {fire}"
                );
            }
            count += 1;
            at = fire;
        }
        assert_eq!(count, expected, "{expr:?} in {zone}: fires in 2026");
    }

    #[test]
    fn a_year_of_fires_strictly_increases() {
        // Nine matching minutes an hour, 24 hours a day, 365 days; the nine in
        // the skipped hour collapse into the 03:00 fire, and the repeated hour
        // fires once.
        let every_seventh_minute = |_: u32, minute: u32| minute % 7 == 0;
        walk_a_year(
            "*/7 * * * *",
            "Europe/Berlin",
            9 * 24 * 365 - 9,
            every_seventh_minute,
        );
        walk_a_year(
            "*/7 * * * *",
            "America/New_York",
            9 * 24 * 365 - 9,
            every_seventh_minute,
        );
        // Eight a day; neither zone skips or repeats a multiple of three hours.
        let every_third_hour = |hour: u32, minute: u32| hour % 3 == 0 && minute == 0;
        walk_a_year("0 */3 * * *", "Europe/Berlin", 8 * 365, every_third_hour);
        walk_a_year("0 */3 * * *", "America/New_York", 8 * 365, every_third_hour);
        // Lord Howe skips 02:00 to 02:29: its five matches collapse into one
        // fire at 02:30, which does not match by itself.
        walk_a_year(
            "*/7 * * * *",
            "Australia/Lord_Howe",
            9 * 24 * 365 - 5 + 1,
            every_seventh_minute,
        );
    }
}
