//! `latticed`: the regional Lattice node. Not built yet (issue 4); this shell
//! exists so the workspace has its final shape.

fn main() {
    eprintln!(
        "latticed is not implemented yet: see issue 4 (the regional node). lattice-core {} is.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
