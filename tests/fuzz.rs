//! Bad data from outside is a value to report, never a panic: property
//! tests over the config parser, the cron wrapper and the child protocol
//! line parser.

use connectord::config::Config;
use connectord::run::protocol::parse_line;
use connectord::schedule::cron::{jitter_offset, parse_cron, parse_timezone, FireRule};
use proptest::prelude::*;

/// Fragments that steer generated text toward what the parsers care about.
fn cron_like() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        Just("*".to_owned()),
        Just("*/0".to_owned()),
        Just("L".to_owned()),
        Just("5#3".to_owned()),
        Just("MON-FRI".to_owned()),
        Just("@daily".to_owned()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        "[0-9,/*#LW?-]{1,6}",
        ".{0,4}",
    ];
    prop::collection::vec(atom, 0..8).prop_map(|parts| parts.join(" "))
}

fn toml_like() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("[daemon]".to_owned()),
        Just("[connectors.x]".to_owned()),
        Just("command = \"/bin/true\"".to_owned()),
        Just("lease = \"-5s\"".to_owned()),
        Just("lease = \"99999999999999h\"".to_owned()),
        Just("timeout = 5".to_owned()),
        Just("credential = { kind = \"static_secret\" }".to_owned()),
        Just("accepts = [{ kind = \"username_password\", username_env = \"\", password_env = \"P\" }]".to_owned()),
        Just("max_concurrency = -1".to_owned()),
        "[a-z_]{1,10} = \"[^\"]{0,8}\"",
        ".{0,20}",
    ];
    prop::collection::vec(line, 0..10).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn config_parser_never_panics(text in toml_like()) {
        let _ = Config::parse(&text);
    }

    #[test]
    fn config_parser_never_panics_on_any_text(text in ".{0,200}") {
        let _ = Config::parse(&text);
    }

    #[test]
    fn cron_wrapper_never_panics(expr in cron_like(), tz in "[A-Za-z/_+-]{0,20}", jitter in any::<i32>(), at in 0i64..4_102_444_800) {
        if let Ok(expr) = parse_cron(&expr) {
            let tz = parse_timezone(&tz).unwrap_or(chrono_tz::UTC);
            let rule = FireRule { expr, tz, jitter: jitter_offset("conn", jitter) };
            let at = chrono::DateTime::from_timestamp(at, 0).expect("in range");
            if let Some(next) = rule.next_after(at) {
                prop_assert!(next > at);
            }
            if let Some(latest) = rule.latest_at_or_before(at) {
                prop_assert!(latest <= at);
            }
        }
    }

    #[test]
    fn protocol_parser_never_panics(line in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_line(&line);
    }

    #[test]
    fn protocol_parser_never_panics_on_json_shapes(
        kind in prop_oneof![Just("log"), Just("progress"), Just("interaction"), Just("other")],
        field in "[a-z]{0,8}",
        value in prop_oneof![Just("1".to_owned()), Just("\"x\"".to_owned()), Just("null".to_owned()), Just("[]".to_owned()), Just("1e999".to_owned())],
    ) {
        let line = format!("{{\"type\":\"{kind}\",\"{field}\":{value}}}");
        let _ = parse_line(line.as_bytes());
    }
}
