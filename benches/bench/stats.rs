//! Percentiles, and the report: one line per figure, then the targets.
//!
//! Every figure is printed as soon as it is measured, so a run that is
//! interrupted still shows what it got, and the targets at the end. The
//! same lines are appended to a results file under the bench's work
//! directory.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

/// What a figure's numbers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Seconds,
    PerSecond,
    MiB,
    /// Percent of one core.
    Percent,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::Millis if value < 10.0 => format!("{value:.3}ms"),
            Unit::Millis => format!("{value:.1}ms"),
            Unit::Seconds => format!("{value:.3}s"),
            Unit::PerSecond => format!("{value:.0}/s"),
            Unit::MiB => format!("{value:.1}MiB"),
            Unit::Percent => format!("{value:.3}%"),
        }
    }

    /// Whether a bigger number is the better one (for ratios' direction).
    fn higher_is_better(self) -> bool {
        self == Unit::PerSecond
    }
}

/// Nearest-rank percentiles of a sample set.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// `None` for an empty set, which the report prints as "no samples"
    /// rather than as a misleading zero.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Some(Summary {
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: sorted[sorted.len() - 1],
            n: sorted.len(),
        })
    }

    /// A figure measured once: every percentile is the value.
    pub fn single(value: f64) -> Summary {
        Summary {
            p50: value,
            p90: value,
            p99: value,
            max: value,
            n: 1,
        }
    }
}

/// One printed figure.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub unit: Unit,
    pub summary: Option<Summary>,
    /// The baseline's name and summary, for the ratio column.
    pub baseline: Option<(String, Summary)>,
    /// A free-form note (what the figure includes, a caveat).
    pub note: String,
}

impl Figure {
    pub fn new(name: impl Into<String>, unit: Unit, samples: &[f64]) -> Figure {
        Figure {
            name: name.into(),
            unit,
            summary: Summary::of(samples),
            baseline: None,
            note: String::new(),
        }
    }

    pub fn single(name: impl Into<String>, unit: Unit, value: f64) -> Figure {
        Figure {
            name: name.into(),
            unit,
            summary: Some(Summary::single(value)),
            baseline: None,
            note: String::new(),
        }
    }

    pub fn against(mut self, baseline: &Figure) -> Figure {
        if let Some(summary) = baseline.summary {
            self.baseline = Some((baseline.name.clone(), summary));
        }
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    /// p50 of this figure over p50 of its baseline.
    pub fn ratio_p50(&self) -> Option<f64> {
        let (_, base) = self.baseline.as_ref()?;
        ratio(self.summary?.p50, base.p50)
    }

    /// p99 of this figure over p99 of its baseline.
    pub fn ratio_p99(&self) -> Option<f64> {
        let (_, base) = self.baseline.as_ref()?;
        ratio(self.summary?.p99, base.p99)
    }

    pub fn line(&self) -> String {
        let mut out = format!("{:<44}", self.name);
        match &self.summary {
            None => out.push_str(" no samples"),
            Some(s) => {
                let f = |v| self.unit.format(v);
                let _ = write!(
                    out,
                    " p50 {:>10}  p90 {:>10}  p99 {:>10}  max {:>10}  n {:>6}",
                    f(s.p50),
                    f(s.p90),
                    f(s.p99),
                    f(s.max),
                    s.n
                );
            }
        }
        if let Some((name, base)) = &self.baseline {
            let single = self.summary.is_some_and(|s| s.n == 1) && base.n == 1;
            match (self.ratio_p50(), self.ratio_p99()) {
                (Some(r50), _) if single => {
                    let _ = write!(out, "  ratio {} vs {name}", describe_ratio(r50, self.unit));
                }
                (Some(r50), Some(r99)) => {
                    let _ = write!(
                        out,
                        "  ratio p50 {} p99 {} vs {name}",
                        describe_ratio(r50, self.unit),
                        describe_ratio(r99, self.unit)
                    );
                }
                _ => {
                    let _ = write!(out, "  ratio n/a vs {name}");
                }
            }
        }
        if !self.note.is_empty() {
            let _ = write!(out, "  ({})", self.note);
        }
        out
    }
}

fn ratio(value: f64, base: f64) -> Option<f64> {
    (base > 0.0 && value.is_finite()).then(|| value / base)
}

/// `1.62x`, plus "= 7.1x better" when the figure beats its baseline, so a
/// reader need not remember which direction is good for which unit.
fn describe_ratio(ratio: f64, unit: Unit) -> String {
    let better = if unit.higher_is_better() {
        ratio
    } else {
        1.0 / ratio
    };
    if better >= 1.5 {
        format!("{ratio:.3}x (= {better:.1}x better)")
    } else {
        format!("{ratio:.3}x")
    }
}

/// A target, checked against measured figures.
pub struct Check {
    pub label: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// Collects figures and checks, prints them, and appends them to a file.
pub struct Report {
    pub figures: Vec<Figure>,
    pub checks: Vec<Check>,
    file: Option<std::fs::File>,
}

impl Report {
    pub fn new(path: Option<PathBuf>) -> Report {
        let file = path.and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        Report {
            figures: Vec::new(),
            checks: Vec::new(),
            file,
        }
    }

    /// Prints a line and keeps it in the results file.
    pub fn say(&mut self, line: &str) {
        println!("{line}");
        if let Some(file) = &mut self.file {
            let _ = writeln!(file, "{line}");
        }
    }

    pub fn add(&mut self, figure: Figure) -> Figure {
        let line = figure.line();
        self.say(&line);
        self.figures.push(figure.clone());
        figure
    }

    pub fn check(
        &mut self,
        label: impl Into<String>,
        measured: impl Into<String>,
        met: Option<bool>,
    ) {
        self.checks.push(Check {
            label: label.into(),
            measured: measured.into(),
            met,
        });
    }

    pub fn finish(&mut self) {
        self.say("");
        self.say("== targets ==");
        let lines: Vec<String> = self
            .checks
            .iter()
            .map(|c| {
                let verdict = match c.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "n/a",
                };
                format!("{:<7} {:<58} {}", verdict, c.label, c.measured)
            })
            .collect();
        for line in lines {
            self.say(&line);
        }
    }
}
