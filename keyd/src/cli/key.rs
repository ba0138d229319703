//! `keyd key generate`: a node's key pairs, generated on the node itself so
//! private keys never travel. Only the public halves go to the CA.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mesh_proto::identity::{NoisePrivateKey, WgPrivateKey};

use crate::files;

pub const WG_KEY_FILE: &str = "wg.key";
pub const WG_PUB_FILE: &str = "wg.pub";
pub const NOISE_KEY_FILE: &str = "noise.key";
pub const NOISE_PUB_FILE: &str = "noise.pub";

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Write wg.key, wg.pub, noise.key and noise.pub into a directory.
    Generate(GenerateArgs),
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Directory for the key files (created if missing; keys are never overwritten).
    #[arg(long)]
    dir: PathBuf,
}

pub fn run(cmd: KeyCommand) -> Result<()> {
    let KeyCommand::Generate(a) = cmd;
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create directory {}", a.dir.display()))?;
    let wg = WgPrivateKey::generate()?;
    let noise = NoisePrivateKey::generate()?;
    files::write_secret(&a.dir.join(WG_KEY_FILE), &wg.to_text())?;
    files::write_public_key(&a.dir.join(WG_PUB_FILE), &format!("{}\n", wg.public_key()))?;
    files::write_secret(&a.dir.join(NOISE_KEY_FILE), &noise.to_text())?;
    files::write_public_key(
        &a.dir.join(NOISE_PUB_FILE),
        &format!("{}\n", noise.public_key()),
    )?;
    println!(
        "wrote {WG_KEY_FILE}, {WG_PUB_FILE}, {NOISE_KEY_FILE}, {NOISE_PUB_FILE} in {}",
        a.dir.display()
    );
    Ok(())
}
