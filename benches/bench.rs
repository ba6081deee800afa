//! The connectord benchmark: the real daemon against baselines measured in
//! the same run. `docs/PERFORMANCE.md` describes every figure.
//!
//! ```text
//! cargo bench --bench bench -- --short    # the default
//! cargo bench --bench bench -- --full     # >= 2,000 pickup samples, 30 s idle, 500 edits
//! cargo bench --bench bench -- --short --only pickup,resolver --perf
//! ```
//!
//! It starts its own PostgreSQL cluster (`target/connectord-bench-pg`, or
//! its `/var/tmp` stand-in as root; left running for the next run, like the
//! test cluster), creates a fresh database, compiles `benches/probe.c` as
//! the connector, and runs `connectord --config F run` as a child process
//! (the binary cargo built for this bench). Every figure is printed as one
//! line (p50, p90, p99, max, n, ratio to its baseline), then the targets;
//! the lines are also kept in `target/connectord-bench/results.txt`.
//!
//! # Layout
//!
//! - `setup`: the cluster, database, key, probe, FIFO, config, connections.
//! - `daemon`: the real daemon as a child process; `perf` attachment.
//! - `minimal`: the minimal-daemon and spawn-only baselines.
//! - `pickup` (P1), `throughput` (P2), `sandbox` (P7), `resolver` (P6), `state`
//!   (P8), `codes` (P9), `metrics` (P10), `schedules` (P3–P5), `tcs` (the
//!   tokio-cron-scheduler baseline of P3/P4).
//! - `sim` (P11): a million connections, 1, 3 and 10 daemons.
//! - `stats`: percentiles and the report; `procfs`: RSS and CPU.
//!
//! (A bench's crate root looks for modules beside it, hence the `#[path]`s.)
//!
//! Sections: pickup, throughput, sandbox, resolver, state, codes, metrics, schedules, tcs
//! (`--only`; tcs needs schedules), and sim (P11, the million connections
//! and 1/3/10 daemons), which runs only when `--only` names it.

#[path = "bench/codes.rs"]
mod codes;
#[path = "bench/daemon.rs"]
mod daemon;
#[path = "bench/metrics.rs"]
mod metrics;
#[path = "bench/minimal.rs"]
mod minimal;
#[path = "bench/pickup.rs"]
mod pickup;
#[path = "bench/procfs.rs"]
mod procfs;
#[path = "bench/resolver.rs"]
mod resolver;
#[path = "bench/sandbox.rs"]
mod sandbox;
#[path = "bench/schedules.rs"]
mod schedules;
#[path = "bench/setup.rs"]
mod setup;
#[path = "bench/sim.rs"]
mod sim;
#[path = "bench/state.rs"]
mod state;
#[path = "bench/stats.rs"]
mod stats;
#[path = "bench/tcs.rs"]
mod tcs;
#[path = "bench/throughput.rs"]
mod throughput;

use std::process::ExitCode;
use std::time::Instant;

use setup::{Env, Mode};
use stats::Report;

const USAGE: &str =
    "usage: cargo bench --bench bench -- [--short | --full] [--perf] [--only SECTION,...]
sections: pickup, throughput, sandbox, resolver, state, codes, metrics, schedules, tcs,
          sim (only when named)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut mode = None;
    let mut perf = false;
    let mut only = Vec::new();
    // `cargo bench` appends `--bench`; `cargo test --benches` does not, and
    // the bench must not start a database and daemons under `cargo test`.
    let mut asked = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--bench" => asked = true,
            "--short" => {
                asked = true;
                mode = Some(Mode::short());
            }
            "--full" => {
                asked = true;
                mode = Some(Mode::full());
            }
            "--perf" => perf = true,
            "--only" => match iter.next() {
                Some(list) => only.extend(list.split(',').map(str::to_owned)),
                None => {
                    eprintln!("--only needs a list of sections\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if !asked {
        println!("the connectord benchmark runs only under `cargo bench`; {USAGE}");
        return ExitCode::SUCCESS;
    }
    let mut mode = mode.unwrap_or_else(Mode::short);
    mode.perf = perf;
    mode.only = only;

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench: cannot build the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mode: Mode) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut env = Env::new(mode).await?;
    let mut report = Report::new(Some(env.work.join("results.txt")));
    report.say("");
    report.say(&format!(
        "connectord bench, {} mode, {}",
        if env.mode.full { "full" } else { "short" },
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    ));
    report.say(&format!("machine: {}", procfs::machine()));
    let commit = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    report.say(&format!("source: {}", commit.trim()));
    report.say(&format!(
        "daemon: {}; probe: {}",
        env.daemon_bin.display(),
        env.probe.display()
    ));

    let mut pickup = None;
    let mut section = Instant::now();
    let mut took = |name: &str| {
        eprintln!("bench: {name} took {:.0}s", section.elapsed().as_secs_f64());
        section = Instant::now();
    };
    if env.mode.runs("pickup") {
        pickup = Some(pickup::run(&mut env, &mut report).await?);
        took("pickup");
    }
    if env.mode.runs("throughput") {
        throughput::run(&mut env, &mut report).await?;
        took("throughput");
    }
    if env.mode.runs("sandbox") {
        sandbox::run(&mut env, &mut report).await?;
        took("sandbox");
    }
    if env.mode.runs("resolver") {
        let pickup = pickup.as_ref().map(|p| &p.connectord);
        resolver::run(&mut env, &mut report, pickup).await?;
        took("resolver");
    }
    if env.mode.runs("state") {
        state::run(&mut env, &mut report).await?;
        took("state");
    }
    if env.mode.runs("codes") {
        codes::run(&mut env, &mut report).await?;
        took("codes");
    }
    if env.mode.runs("metrics") {
        metrics::run(&mut env, &mut report).await?;
        took("metrics");
    }
    if env.mode.runs("schedules") {
        let idle_rss = pickup.as_ref().and_then(|p| p.idle_rss_mib);
        let scale = schedules::run(&mut env, &mut report, idle_rss).await?;
        took("schedules");
        if env.mode.runs("tcs") {
            tcs::run(&mut env, &mut report, &scale).await?;
            took("tcs");
        }
    }
    // Only when named: it seeds a million connections and runs fourteen
    // daemons, minutes of work the other sections do not need.
    if env.mode.only.iter().any(|s| s == "sim") {
        sim::run(&mut env, &mut report).await?;
        took("sim");
    }
    report.finish();
    report.say(&format!(
        "bench took {:.0}s; daemon logs and results under {}",
        started.elapsed().as_secs_f64(),
        env.work.display()
    ));
    env.cleanup().await;
    Ok(())
}
