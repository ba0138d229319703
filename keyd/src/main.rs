use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = keyd::cli::Cli::parse();
    match keyd::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
