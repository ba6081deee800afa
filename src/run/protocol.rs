//! What a connector child may print on stdout (SPEC §6).
//!
//! A line that is a JSON object with a `type` is a message; every other line
//! is plain connector output. A JSON object whose `type` or fields are not
//! understood is reported as such, never a panic: the child is outside our
//! control and its output is data, not instructions.

use serde::Deserialize;

/// One stdout line, classified.
#[derive(Debug, PartialEq)]
pub enum Line {
    Message(Message),
    /// A JSON object with a `type` we could not use; the reason says why.
    Malformed(String),
    /// Anything else: logged as connector output.
    Text,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Log {
        #[serde(default)]
        level: Option<String>,
        message: String,
    },
    Progress {
        records: i64,
    },
    Interaction {
        kind: InteractionKind,
        #[serde(default)]
        message: Option<String>,
        /// How long a `code_required` interaction waits for its answer
        /// (`"5m"`); see [`code_timeout`].
        #[serde(default)]
        timeout: Option<String>,
    },
}

/// The interactions a connector may open: the kinds SPEC names, and no
/// other. A kind is a row an owner is asked to act on, so a child cannot
/// invent new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InteractionKind {
    /// The owner must reconnect: store a new credential.
    CredentialsRequired,
    /// The owner must give a one-time code.
    CodeRequired,
}

impl InteractionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InteractionKind::CredentialsRequired => "credentials_required",
            InteractionKind::CodeRequired => "code_required",
        }
    }
}

/// Classifies one line (without its newline). Invalid UTF-8 is plain text.
/// How long a code request waits when it names no timeout.
pub const DEFAULT_CODE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// The longest a code request may wait.
pub const MAX_CODE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// The wait a code request asks for: its `timeout` if it parses, at most
/// an hour; the default when it names none or one that does not parse.
pub fn code_timeout(timeout: Option<&str>) -> std::time::Duration {
    timeout
        .and_then(|t| humantime::parse_duration(t).ok())
        .unwrap_or(DEFAULT_CODE_TIMEOUT)
        .min(MAX_CODE_TIMEOUT)
}

pub fn parse_line(line: &[u8]) -> Line {
    let trimmed = line.trim_ascii();
    if !trimmed.starts_with(b"{") {
        return Line::Text;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(trimmed) else {
        return Line::Text;
    };
    if value.get("type").is_none() {
        return Line::Text;
    }
    match serde_json::from_value::<Message>(value) {
        Ok(message) => Line::Message(message),
        Err(e) => Line::Malformed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Line) {
        assert_eq!(parse_line(input.as_bytes()), expected, "{input}");
    }

    #[test]
    fn classifies_lines() {
        check("hello", Line::Text);
        check("", Line::Text);
        check("{not json", Line::Text);
        check(r#"{"no_type":1}"#, Line::Text);
        check("[1,2]", Line::Text);
        check(
            r#"{"type":"progress","records":120}"#,
            Line::Message(Message::Progress { records: 120 }),
        );
        check(
            r#"  {"type":"log","level":"info","message":"hi"}  "#,
            Line::Message(Message::Log {
                level: Some("info".into()),
                message: "hi".into(),
            }),
        );
        check(
            r#"{"type":"interaction","kind":"credentials_required","message":"log in"}"#,
            Line::Message(Message::Interaction {
                kind: InteractionKind::CredentialsRequired,
                message: Some("log in".into()),
                timeout: None,
            }),
        );
        assert!(matches!(
            parse_line(br#"{"type":"interaction","kind":"teleport_required"}"#),
            Line::Malformed(_)
        ));
        assert!(matches!(
            parse_line(br#"{"type":"progress","records":"many"}"#),
            Line::Malformed(_)
        ));
        assert!(matches!(
            parse_line(br#"{"type":"teleport"}"#),
            Line::Malformed(_)
        ));
        assert_eq!(parse_line(b"\xff\xfe{"), Line::Text);
    }
}
