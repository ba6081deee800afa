//! What the commands print on stdout: tables for people, and with
//! `--json` one JSON object per line for programs. Logs go to stderr, so
//! stdout stays this and nothing else.
//!
//! Table cells are passed through [`printable`]: a row anyone can write
//! (a connection id, a schedule's `last_error`, an interaction's message)
//! must not break the table's lines or steer the terminal.

use std::fmt::{Display, Write as _};

use serde::Serialize;

use crate::printable::printable;

/// A table of left-aligned columns, each padded to its width but the
/// last, which is as long as its text.
pub(crate) struct Table {
    /// The width of every column but the last.
    widths: &'static [usize],
}

impl Table {
    pub(crate) const fn new(widths: &'static [usize]) -> Table {
        Table { widths }
    }

    /// Prints the header line: one name per column.
    pub(crate) fn header(&self, names: &[&str]) {
        let cells: Vec<&dyn Display> = names.iter().map(|name| name as &dyn Display).collect();
        println!("{}", self.line(&cells));
    }

    /// Prints one row: one cell per column, each escaped.
    pub(crate) fn row(&self, cells: &[&dyn Display]) {
        println!("{}", self.line(cells));
    }

    fn line(&self, cells: &[&dyn Display]) -> String {
        debug_assert_eq!(cells.len(), self.widths.len() + 1, "one cell per column");
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let text = cell.to_string();
            let text = printable(&text);
            // Writing to a String cannot fail.
            let _ = match self.widths.get(i) {
                Some(&width) => write!(line, "{text:<width$} "),
                None => write!(line, "{text}"),
            };
        }
        line
    }
}

/// Prints `value` as one line of JSON.
pub(crate) fn json_line(value: &impl Serialize) -> serde_json::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Prints a JSON object the database rendered (`to_jsonb(row)::text`),
/// which holds no line break: JSON escapes every control character.
pub(crate) fn json_text_line(object: &str) {
    println!("{object}");
}
