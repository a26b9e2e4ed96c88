//! The `litefs` binary: parse the command line and hand over to [`litefs::cli`].

fn main() -> std::process::ExitCode {
    litefs::cli::main()
}
