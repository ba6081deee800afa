//! The engine's cron expressions: each distinct text once, named by a
//! 4-byte id that schedules hold, and a bounded number of croner parses.
//!
//! croner keeps a byte per possible value of every field, years included,
//! in each parsed expression, so holding one parse per distinct expression
//! would cost several times the schedules themselves when many schedules
//! have distinct crons (docs/PERFORMANCE.md, design decision 13). The table
//! keeps every text; while the engine loads it keeps up to
//! [`PARSED_LOADING`] parses, all dropped at once when that many are held
//! (so common expressions are parsed about once, and a million distinct
//! ones do not hold a million parses), and afterwards only the
//! [`PARSED_KEPT`] most recently used ones, parsing again on a miss, which
//! costs far less than a tick's slack. It is the process's one cache of
//! parses: `cron::parse_cron` keeps nothing.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use hashbrown::HashTable;

use crate::schedule::cron::{parse_cron, CronError, CronExpr};

/// An expression's id in the table.
pub type ExprId = u32;

/// Parses kept once loading is done. Expressions that fire often stay
/// parsed, and the kept ones cost little next to the schedules.
pub const PARSED_KEPT: usize = 64;

/// Parses kept during the bulk load: enough for every distinct expression
/// of a fleet whose owners pick a time of day and a day (a parse costs tens
/// of microseconds, so a million rows must not each parse), and a bound on
/// the load's peak (a parse holds several KiB) when nearly every row is
/// distinct. Dropping them all when full costs no scan, and the load's rows
/// ask for the expressions in no order a least-recently-used choice could
/// use.
pub const PARSED_LOADING: usize = 16_384;

#[derive(Default)]
pub struct Exprs {
    /// Every text in use, back to back. One allocation, not one per text:
    /// texts allocated one by one between the load's parses would each keep
    /// a page of the freed parses resident.
    buffer: String,
    /// By id: where its text is in `buffer`, and how many schedules use it.
    spans: Vec<Span>,
    /// Ids, found by their text.
    index: HashTable<ExprId>,
    hasher: RandomState,
    /// Ids no schedule uses any more, for reuse.
    free: Vec<ExprId>,
    /// Bytes of `buffer` that only freed ids point at.
    garbage: usize,
    parsed: HashMap<ExprId, Parsed, BuildHasherDefault<IdHasher>>,
    /// Counts parse uses, to find the least recently used one.
    clock: u64,
    /// False during the bulk load, which keeps up to [`PARSED_LOADING`].
    bounded: bool,
}

#[derive(Clone, Copy, Default)]
struct Span {
    start: usize,
    len: usize,
    /// 0: a free id.
    uses: u32,
}

impl Span {
    fn text(self, buffer: &str) -> &str {
        &buffer[self.start..self.start + self.len]
    }
}

/// Hashes an expression id for the map of parses, which the load asks
/// once a row. Ids are small integers the table hands out, not keys anyone
/// chooses, so one multiply that spreads them into the high bits (which
/// the map's probing reads) does what SipHash does at a fraction of its
/// cost.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(FIBONACCI);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// 2^64 divided by the golden ratio: consecutive ids land far apart.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

struct Parsed {
    expr: CronExpr,
    used: u64,
}

impl Exprs {
    /// Takes a use of `text` (trimmed) for one schedule: its id and parse.
    /// An expression that does not parse is not added.
    pub fn acquire(&mut self, text: &str) -> Result<(ExprId, CronExpr), CronError> {
        let text = text.trim();
        let hash = self.hasher.hash_one(text);
        let (buffer, spans) = (&self.buffer, &self.spans);
        if let Some(&id) = self
            .index
            .find(hash, |&id| spans[id as usize].text(buffer) == text)
        {
            let expr = self.parse(id)?;
            self.spans[id as usize].uses += 1;
            return Ok((id, expr));
        }
        let expr = parse_cron(text)?;
        let span = Span {
            start: self.buffer.len(),
            len: text.len(),
            uses: 1,
        };
        self.buffer.push_str(text);
        let id = match self.free.pop() {
            Some(id) => {
                self.spans[id as usize] = span;
                id
            }
            None => {
                self.spans.push(span);
                ExprId::try_from(self.spans.len() - 1).unwrap_or(ExprId::MAX)
            }
        };
        let (buffer, spans, hasher) = (&self.buffer, &self.spans, &self.hasher);
        self.index.insert_unique(hash, id, |&id| {
            hasher.hash_one(spans[id as usize].text(buffer))
        });
        self.keep(id, expr.clone());
        Ok((id, expr))
    }

    /// Gives back one use of `id`; the text is forgotten with its last use.
    pub fn release(&mut self, id: ExprId) {
        let Some(span) = self.spans.get_mut(id as usize) else {
            return;
        };
        if span.uses == 0 {
            return;
        }
        span.uses -= 1;
        if span.uses > 0 {
            return;
        }
        let span = *span;
        let hash = self.hasher.hash_one(span.text(&self.buffer));
        if let Ok(entry) = self.index.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        self.parsed.remove(&id);
        self.free.push(id);
        self.garbage += span.len;
        if self.garbage > 4096 && self.garbage > self.buffer.len() / 2 {
            self.compact();
        }
    }

    /// Rewrites `buffer` with the texts in use only.
    fn compact(&mut self) {
        let mut buffer = String::with_capacity(self.buffer.len() - self.garbage);
        for span in self.spans.iter_mut() {
            if span.uses == 0 {
                *span = Span::default();
                continue;
            }
            let start = buffer.len();
            buffer.push_str(span.text(&self.buffer));
            span.start = start;
        }
        self.buffer = buffer;
        self.garbage = 0;
    }

    /// The parse of `id`, from the kept ones or parsed again.
    pub fn parse(&mut self, id: ExprId) -> Result<CronExpr, CronError> {
        self.clock += 1;
        if let Some(parsed) = self.parsed.get_mut(&id) {
            parsed.used = self.clock;
            return Ok(parsed.expr.clone());
        }
        let span = self.spans.get(id as usize).copied().unwrap_or_default();
        let expr = parse_cron(span.text(&self.buffer))?;
        self.keep(id, expr.clone());
        Ok(expr)
    }

    fn keep(&mut self, id: ExprId, expr: CronExpr) {
        if self.bounded && self.parsed.len() >= PARSED_KEPT {
            self.forget_least_recent();
        } else if !self.bounded && self.parsed.len() >= PARSED_LOADING {
            self.parsed.clear();
        }
        self.parsed.insert(
            id,
            Parsed {
                expr,
                used: self.clock,
            },
        );
    }

    fn forget_least_recent(&mut self) {
        // A scan, on a miss only: the kept parses are few.
        let oldest = self
            .parsed
            .iter()
            .min_by_key(|(_, parsed)| parsed.used)
            .map(|(&id, _)| id);
        if let Some(id) = oldest {
            self.parsed.remove(&id);
        }
    }

    /// Ends the bulk load: from now on at most [`PARSED_KEPT`] are kept.
    ///
    /// The load's parses all go, even the most recent: each sits among the
    /// others' freed memory and would keep its pages resident. The ones
    /// that fire come back on first use.
    pub fn bound(&mut self) {
        self.bounded = true;
        self.parsed = HashMap::default();
        if self.garbage > 0 {
            self.compact();
        }
        self.buffer.shrink_to_fit();
        self.spans.shrink_to_fit();
        let (buffer, spans, hasher) = (&self.buffer, &self.spans, &self.hasher);
        self.index
            .shrink_to_fit(|&id| hasher.hash_one(spans[id as usize].text(buffer)));
    }

    /// How many distinct texts are in use.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(i: usize) -> String {
        format!("{} {} * * *", i % 60, i / 60)
    }

    #[test]
    fn parses_are_bounded_after_the_load_and_the_recent_ones_stay() {
        let mut exprs = Exprs::default();
        let ids: Vec<ExprId> = (0..PARSED_KEPT + 100)
            .map(|i| exprs.acquire(&text(i)).unwrap().0)
            .collect();
        assert_eq!(exprs.parsed.len(), ids.len(), "the load keeps every parse");
        exprs.bound();
        assert_eq!(exprs.parsed.len(), 0, "the load's parses all go");
        for (i, &id) in ids.iter().enumerate() {
            let expr = exprs.parse(id).unwrap();
            assert_eq!(expr.as_str(), text(i), "a re-parse is the same expression");
            assert!(exprs.parsed.len() <= PARSED_KEPT);
        }
        // The last ones used are the ones kept.
        assert!(exprs.parsed.contains_key(ids.last().unwrap()));
        assert!(!exprs.parsed.contains_key(&ids[0]));
    }

    #[test]
    fn the_load_holds_a_bounded_number_of_parses_however_many_texts() {
        let mut exprs = Exprs::default();
        let texts = |i: usize| format!("{} {} {} * *", i % 60, (i / 60) % 24, 1 + i / 1440);
        let ids: Vec<ExprId> = (0..PARSED_LOADING + 100)
            .map(|i| exprs.acquire(&texts(i)).unwrap().0)
            .collect();
        assert!(
            exprs.parsed.len() <= PARSED_LOADING,
            "{}",
            exprs.parsed.len()
        );
        assert_eq!(exprs.len(), ids.len(), "every text is kept");
        assert_eq!(exprs.parse(ids[0]).unwrap().as_str(), texts(0));
    }

    #[test]
    fn equal_texts_share_an_id_until_their_last_use_is_released() {
        let mut exprs = Exprs::default();
        let (a, first) = exprs.acquire("0 * * * *").unwrap();
        let (b, second) = exprs.acquire(" 0 * * * * ").unwrap();
        assert_eq!(a, b);
        assert!(first.shares_parse_with(&second), "one parse per text");
        exprs.release(a);
        assert_eq!(exprs.len(), 1, "one use is left");
        exprs.release(b);
        assert_eq!(exprs.len(), 0);
        let (c, expr) = exprs.acquire("*/5 * * * *").unwrap();
        assert_eq!(c, a, "a freed id is reused");
        assert_eq!(exprs.parse(c).unwrap(), expr);
        assert!(exprs.acquire("61 * * * *").is_err());
        assert_eq!(exprs.len(), 1, "a bad expression is not added");
    }

    #[test]
    fn released_texts_are_compacted_away_and_the_rest_still_found() {
        let mut exprs = Exprs::default();
        let ids: Vec<ExprId> = (0..1_000)
            .map(|i| exprs.acquire(&text(i)).unwrap().0)
            .collect();
        let full = exprs.buffer.len();
        for (i, &id) in ids.iter().enumerate() {
            if i % 3 != 0 {
                exprs.release(id);
            }
        }
        assert!(exprs.buffer.len() < full, "the freed texts were compacted");
        for (i, &id) in ids.iter().enumerate().step_by(3) {
            assert_eq!(exprs.acquire(&text(i)).unwrap().0, id);
            assert_eq!(exprs.parse(id).unwrap().as_str(), text(i));
        }
        assert_eq!(exprs.len(), 334);
    }
}
