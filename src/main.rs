//! The `connectord` binary: argument parsing and the library's entry point.

fn main() -> std::process::ExitCode {
    // Inside a sandbox this binary is the connector's init: it must start
    // before anything else of the daemon does (threads, signal handlers).
    let mut args = std::env::args_os();
    if args
        .nth(1)
        .is_some_and(|a| a == connectord::sandbox::init::SUBCOMMAND)
    {
        connectord::sandbox::init::main(std::env::args_os().collect());
    }
    connectord::cli::main()
}
