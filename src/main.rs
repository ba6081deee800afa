//! The `connectord` binary: argument parsing and the library's entry point.

fn main() -> std::process::ExitCode {
    connectord::cli::main()
}
