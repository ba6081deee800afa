//! A real browser connector inside the sandbox (SPEC §12, S2): headless
//! Debian Chromium, driven by Playwright (tests/browser/login.js), logs in
//! to a login form served by this test with the connection's stored
//! username and password, on a manual and on a scheduled run, with
//! Chromium's own sandbox on.
//!
//! It needs Chromium (`/usr/bin/chromium`), Node.js and
//! `tests/browser/node_modules` (`npm ci --prefix tests/browser`); CI
//! installs all three. Elsewhere, without them, it says so and passes.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::{cli, Config, Connector, Daemon, Scratch, TestDb};

const USERNAME: &str = "alice.chase";
const PASSWORD: &str = "correct-horse-42";

fn browser_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"))
}

/// Whether this machine can run the test; in CI it must.
fn have_browser() -> bool {
    let missing: Vec<&str> = [
        ("/usr/bin/chromium", Path::new("/usr/bin/chromium").exists()),
        ("node", Path::new("/usr/bin/node").exists()),
        (
            "tests/browser/node_modules",
            browser_dir().join("node_modules/playwright-core").exists(),
        ),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI installs the browser test's prerequisites; missing: {missing:?}"
    );
    eprintln!("skipping the browser test; missing: {missing:?}");
    false
}

/// Serves a login form; a POST with the right username and password gets
/// "Welcome", anything else "Denied". Returns the URL and the count of
/// successful logins.
async fn login_site() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/login", listener.local_addr().expect("addr"));
    let logins = Arc::new(AtomicUsize::new(0));
    let counter = logins.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then as much body as Content-Length says.
                let body = loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if text.len() >= end + 4 + length {
                        break text[end + 4..end + 4 + length].to_owned();
                    }
                };
                let page = if request.starts_with(b"POST") {
                    let expected = format!("u={USERNAME}&p={PASSWORD}");
                    if body == expected {
                        counter.fetch_add(1, Ordering::SeqCst);
                        "<p id=result>Welcome back</p>".to_owned()
                    } else {
                        "<p id=result>Denied</p>".to_owned()
                    }
                } else {
                    "<form method=post action=/login><input id=username name=u>\
                     <input id=password name=p type=password><button id=submit>Log in</button></form>"
                        .to_owned()
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (url, logins)
}

/// A Chase connection with a stored username/password logs in through
/// Chromium in the sandbox on a manual and on a scheduled run.
#[tokio::test(flavor = "multi_thread")]
async fn chromium_logs_in_from_inside_the_sandbox() {
    if !have_browser() {
        return;
    }
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let (url, logins) = login_site().await;
    let keys = dir.path.join("keys");
    let script = browser_dir().join("login.js");
    let config = Config::new(&dir.path, "browser").connector(
        Connector::new("chase", "node")
            .args(&[script.to_str().expect("UTF-8")])
            .timeout("2m")
            .env("LOGIN_URL", url.as_str())
            .read_only(browser_dir())
            .no_retry()
            .username_password("CHASE_USERNAME", "CHASE_PASSWORD"),
    );
    let config_path = config.write(&dir.path.join("connectord.toml"));
    let keys_arg = keys.to_str().expect("utf-8");
    let (code, out, err) = cli(
        &db,
        None,
        &["keys", "generate", "--id", "k1", "--dir", keys_arg],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
    db.exec("insert into connections (id, connector) values ('alice-chase', 'chase')")
        .await;
    let (code, out, err) = cli(
        &db,
        Some(&config_path),
        &[
            "credentials",
            "set",
            "alice-chase",
            "--kind",
            "username_password",
            "--username",
            USERNAME,
        ],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;

    db.exec("insert into run_commands (connection_id, trigger) values ('alice-chase', 'manual')")
        .await;
    db.wait_until("select count(*) = 1 from runs where trigger = 'manual' and status <> 'running'")
        .await;
    let (status, records, detail): (String, Option<i64>, Option<String>) =
        sqlx::query_as("select status, records, failure_detail from runs where trigger = 'manual'")
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!(
        (status.as_str(), records),
        ("succeeded", Some(1)),
        "{detail:?}\n{}",
        daemon.logs()
    );

    // A schedule firing every second: its first run logs in the same way.
    db.exec("insert into schedules (connection_id, cron) values ('alice-chase', '* * * * * *')")
        .await;
    db.wait_until(
        "select count(*) >= 1 from runs where trigger = 'scheduled' and status = 'succeeded'",
    )
    .await;
    db.exec("delete from schedules").await;

    assert!(logins.load(Ordering::SeqCst) >= 2);
    let logs = daemon.logs();
    assert!(logs.contains("page says: Welcome back"), "{logs}");
    assert!(
        logs.contains("chromium sandbox: on"),
        "Chromium's own sandbox was off inside ours:\n{logs}"
    );
    assert!(!logs.contains(PASSWORD), "the password reached the log");
}
