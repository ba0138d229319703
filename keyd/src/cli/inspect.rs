//! `keyd inspect FILE`: show a CA certificate, node certificate or roster.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_proto::armor;
use mesh_proto::cert::{
    AUTHORITY_CERT_LABEL, AuthorityCert, CA_CERT_LABEL, CaCert, NODE_CERT_LABEL, NodeCert,
};
use mesh_proto::roster::{ROSTER_LABEL, Roster};
use serde_json::{Value, json};

use crate::{files, time};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A certificate or roster file.
    file: PathBuf,
    /// CA certificate to check signatures against.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn validity(not_before: u64, not_after: u64, now: u64) -> &'static str {
    if now < not_before {
        "not yet valid"
    } else if now > not_after {
        "EXPIRED"
    } else {
        "valid"
    }
}

fn ca_json(c: &CaCert, now: u64) -> Value {
    let b = c.body();
    json!({
        "kind": "ca-certificate",
        "name": b.name,
        "network_id": b.network_id,
        "fingerprint": c.fingerprint().to_hex(),
        "not_before": time::rfc3339(b.not_before),
        "not_after": time::rfc3339(b.not_after),
        "status": validity(b.not_before, b.not_after, now),
        "signature": "self-signature ok",
    })
}

fn node_json(c: &NodeCert, ca: Option<&CaCert>, now: u64) -> Value {
    let b = c.body();
    let signature = match ca {
        Some(ca) if ca.signed(c) => "ok".to_string(),
        // An authority's key is in the roster that lists it (keyd inspect
        // ROSTER --ca-cert checks it); a certificate alone cannot say which.
        Some(ca) if b.issuer != ca.fingerprint() => format!(
            "NOT SIGNED BY THIS CA (issuer {}: an authority key, checked with the roster that lists it, or another CA)",
            &b.issuer.to_hex()[..16]
        ),
        Some(_) => "NOT SIGNED BY THIS CA".to_string(),
        None => "not checked (pass --ca-cert)".to_string(),
    };
    json!({
        "kind": "node-certificate",
        "name": b.name,
        "node_id": b.node_id.to_string(),
        "network_id": b.network_id,
        "fingerprint": c.fingerprint().to_hex(),
        "addresses": b.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "groups": b.groups,
        "attributes": b.attributes,
        "not_before": time::rfc3339(b.not_before),
        "not_after": time::rfc3339(b.not_after),
        "status": validity(b.not_before, b.not_after, now),
        "wg_public": b.wg_public.to_base64(),
        "noise_public": b.noise_public.to_base64(),
        "issuer": b.issuer.to_hex(),
        "signature": signature,
    })
}

fn authority_json(a: &AuthorityCert, now: u64) -> Value {
    let b = a.body();
    json!({
        "kind": "authority-certificate",
        "name": b.name,
        "network_id": b.network_id,
        "fingerprint": a.fingerprint().to_hex(),
        "public_key": b.public_key.iter().map(|x| format!("{x:02x}")).collect::<String>(),
        "not_before": time::rfc3339(b.not_before),
        "not_after": time::rfc3339(b.not_after),
        "status": validity(b.not_before, b.not_after, now),
        "issuer": b.issuer.to_hex(),
        "signature": "ok",
    })
}

fn roster_json(r: &Roster, checked: bool, now: u64) -> Value {
    json!({
        "kind": "roster",
        "network_id": r.network_id(),
        "serial": r.serial(),
        "issued_at": time::rfc3339(r.issued_at()),
        "not_after": time::rfc3339(r.not_after()),
        "status": if now > r.not_after() { "EXPIRED" } else { "valid" },
        "issuer": r.issuer().to_hex(),
        "signer": r.signer().to_hex(),
        "fingerprint": r.fingerprint().to_hex(),
        "authorities": r.authorities().iter().map(|a| authority_json(a, now)).collect::<Vec<_>>(),
        "signature": if checked { "ok" } else { "not checked (pass --ca-cert)" },
        "members": r.members().iter().map(|m| {
            let mut v = node_json(&m.cert, None, now);
            v["signature"] = json!(if checked { "ok" } else { "not checked" });
            v["wg_endpoint"] = json!(m.wg_endpoint.map(|e| e.to_string()));
            v["keyd_endpoint"] = json!(m.keyd_endpoint.map(|e| e.to_string()));
            v
        }).collect::<Vec<_>>(),
        "revoked": r.revoked().map(|f| f.to_hex()).collect::<Vec<_>>(),
        "revoked_nodes": r.revoked_nodes().iter().map(|n| n.node_id.to_string()).collect::<Vec<_>>(),
        "firewall": match r.policy() {
            Some(p) => format!("{} rules", p.rules.len()),
            None => "none (no policy: everything passes)".into(),
        },
        "policy_rules": r.policy().map(|p| p.rules.iter().map(|rule| rule.name.clone()).collect::<Vec<_>>()),
    })
}

/// Prints a JSON object as aligned `key  value` lines; nested lists indent.
fn print_text(v: &Value, indent: usize) {
    let Some(obj) = v.as_object() else { return };
    let pad = " ".repeat(indent);
    for (k, val) in obj {
        match val {
            Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
                println!("{pad}{k}:");
                for item in items {
                    print_text(item, indent + 4);
                    println!();
                }
            }
            Value::Array(items) => {
                let list: Vec<String> = items
                    .iter()
                    .map(|i| i.as_str().unwrap_or_default().to_string())
                    .collect();
                println!(
                    "{pad}{k:<14}{}",
                    if list.is_empty() {
                        "-".into()
                    } else {
                        list.join(", ")
                    }
                );
            }
            // Attributes: `KEY=VALUE` pairs (values hold no '=' or ',').
            Value::Object(map) => {
                let pairs: Vec<String> = map
                    .iter()
                    .map(|(name, v)| format!("{name}={}", v.as_str().unwrap_or_default()))
                    .collect();
                println!(
                    "{pad}{k:<14}{}",
                    if pairs.is_empty() {
                        "-".into()
                    } else {
                        pairs.join(", ")
                    }
                );
            }
            Value::Null => println!("{pad}{k:<14}-"),
            Value::String(s) => println!("{pad}{k:<14}{s}"),
            other => println!("{pad}{k:<14}{other}"),
        }
    }
}

pub fn run(a: InspectArgs) -> Result<()> {
    let text = files::read_text(&a.file)?;
    let ca = a
        .ca_cert
        .as_ref()
        .map(|p| super::load_ca_cert(p))
        .transpose()?;
    let now = time::unix_now();
    let ctx = || format!("{}", a.file.display());
    let (label, bytes) = armor::decode_any(&text).with_context(ctx)?;
    let value = match label.as_str() {
        CA_CERT_LABEL => ca_json(&CaCert::from_bytes(&bytes).with_context(ctx)?, now),
        NODE_CERT_LABEL => node_json(
            &NodeCert::from_bytes(&bytes).with_context(ctx)?,
            ca.as_ref(),
            now,
        ),
        ROSTER_LABEL => match &ca {
            Some(ca) => roster_json(
                &Roster::from_bytes(&bytes, ca).with_context(ctx)?,
                true,
                now,
            ),
            None => roster_json(
                &Roster::decode_unverified(&bytes).with_context(ctx)?,
                false,
                now,
            ),
        },
        AUTHORITY_CERT_LABEL => match &ca {
            Some(ca) => authority_json(
                &AuthorityCert::from_bytes(&bytes, ca).with_context(ctx)?,
                now,
            ),
            None => bail!(
                "{}: an authority certificate is checked against its root: pass --ca-cert",
                a.file.display()
            ),
        },
        other => bail!(
            "{}: `{other}` is not a certificate or roster",
            a.file.display()
        ),
    };
    if a.json {
        super::print_json(&value)
    } else {
        print_text(&value, 0);
        Ok(())
    }
}
