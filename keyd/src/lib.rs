//! keyd: pqmesh's key daemon and CA tooling. The binary is a thin clap layer
//! over these modules; all protocol logic lives in `mesh-proto`.

pub mod admission;
pub mod authority;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath_thread;
pub mod dataplane;
pub mod dialled;
pub mod edge;
pub mod files;
pub mod firewall;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod owner;
pub mod policy;
pub mod quic;
pub mod ratelimit;
pub mod refusals;
pub mod sockbuf;
pub mod state;
pub mod text;
pub mod time;
