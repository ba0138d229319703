//! mesh-node: the pqmesh data plane. Not built yet (issue 3): this binary only
//! says so, so that nobody mistakes it for a working data plane.

fn main() -> std::process::ExitCode {
    eprintln!("mesh-node: the data plane is not implemented yet (see docs/architecture.md)");
    std::process::ExitCode::from(2)
}
