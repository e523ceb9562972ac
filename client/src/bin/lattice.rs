//! `lattice`: the command-line client. Not built yet (issue 5).

fn main() {
    eprintln!("lattice: the CLI is not implemented yet (issue 5)");
    std::process::exit(2);
}
