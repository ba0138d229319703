//! Gives a data plane a firewall document by hand (bench/throughput's
//! `mesh-fw100`, debugging): what keyd sends, without a roster.
//!
//!   firewall_document SOCKET POLICY.toml GENERATION LOCAL PEER...
//!   LOCAL, PEER: NAME=ADDR/LEN[,GROUP...]   e.g. a=10.66.0.1/32,bench
//!
//! Prints the data plane's answer; exits 1 unless it took the document.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use anyhow::{Context, Result, bail};
use mesh_proto::firewall::document::{Answer, Document};
use mesh_proto::firewall::engine::PeerInfo;
use mesh_proto::firewall::policy::Policy;

fn identity(arg: &str) -> Result<PeerInfo> {
    let (name, rest) = arg.split_once('=').context("NAME=ADDR/LEN[,GROUP...]")?;
    let mut parts = rest.split(',');
    let address = parts
        .next()
        .context("an address")?
        .parse()
        .map_err(|_| anyhow::anyhow!("`{rest}`: not ADDR/LEN"))?;
    Ok(PeerInfo {
        name: name.into(),
        groups: parts.map(String::from).collect(),
        attributes: Default::default(),
        addresses: vec![address],
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, policy, generation, local, peers @ ..] = args.as_slice() else {
        bail!("usage: firewall_document SOCKET POLICY.toml GENERATION LOCAL PEER...");
    };
    let policy = Policy::from_toml(&std::fs::read_to_string(policy)?)
        .with_context(|| format!("policy {policy}"))?;
    let peers = peers
        .iter()
        .map(|p| identity(p))
        .collect::<Result<Vec<_>>>()?;
    let doc = Document::new(
        generation.parse()?,
        Some(&policy),
        &identity(local)?,
        &peers,
    );
    let mut s = UnixStream::connect(socket).with_context(|| socket.clone())?;
    s.write_all(doc.to_line().as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    print!("{line}");
    match Answer::parse(&line) {
        Answer::Ok { .. } => Ok(()),
        other => bail!("not taken: {other:?}"),
    }
}
