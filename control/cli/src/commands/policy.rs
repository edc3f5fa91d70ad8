//! `meshctl policy`: the service-to-service ACL policy: tested and explained locally, applied,
//! shown, rolled back on the cluster.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use mesh_api::client::AdminClient;

use super::output::{Format, data, render, when};

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Run a policy file's own tests locally (no cluster needed).
    Test { file: PathBuf },
    /// Validate a policy against the cluster, run its tests, and put it in force.
    Apply { file: PathBuf },
    /// Print the policy in force (or version N).
    Get {
        #[arg(long)]
        version: Option<u64>,
    },
    /// List the policy versions.
    History {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Put version N back in force (as a new version).
    Rollback { version: u64 },
    /// Show the verdict for a request and the rule behind it.
    Explain {
        #[arg(long)]
        from: String,
        /// A service; or, for a connection leaving the mesh, an IPv4 address (with `--name` if
        /// it is one of a `dns:` rule's answers).
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        /// The DNS name the address of `--to` is an answer of (for `dns:` egress rules; repeat).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// HTTP method; leave out METHOD and PATH to ask about a TCP connection.
        method: Option<String>,
        /// Request path.
        path: Option<String>,
        /// A request header, `NAME: VALUE` (repeat for several).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Explain against this file instead of the policy in force.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// Runs `meshctl policy ...` against the leader.
pub async fn run(cmd: PolicyCmd, client: &mut AdminClient) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Test { file } => policy_test(&file)?,
        PolicyCmd::Apply { file } => {
            let (name, text) = read_policy(&file)?;
            // Parse locally first: the same errors, without a round trip.
            policy::Policy::parse(&name, &text)?;
            let applied = client.apply_policy(&name, &text).await?;
            println!("policy version {} in force ({} rule(s))", applied.version, applied.rules);
        }
        PolicyCmd::Get { version } => print!("{}", client.get_policy(version).await?.text),
        PolicyCmd::History { format } => {
            let versions = client.policy_history().await?;
            if !matches!(format, Format::Table) {
                print!("{}", data(format, &versions)?);
                return Ok(());
            }
            print!(
                "{}",
                render(
                    &["VERSION", "APPLIED", "SOURCE", "FILE", "RULES", "IN FORCE"],
                    versions.iter().map(|p| vec![
                        p.version.to_string(),
                        when(p.applied_at),
                        p.source.clone(),
                        p.file.clone(),
                        p.rules.to_string(),
                        if p.current { "yes" } else { "" }.to_owned(),
                    ])
                )
            );
        }
        PolicyCmd::Rollback { version } => {
            let applied = client.rollback_policy(version).await?;
            println!("policy version {version} is back in force as version {}", applied.version);
        }
        PolicyCmd::Explain { from, to, port, method, path, headers, names, .. } => {
            let current = client.get_policy(None).await?;
            let p = policy::Policy::parse(&format!("policy version {}", current.version), &current.text)?;
            explain(&p, &from, &to, port, method.as_deref(), path.as_deref(), &headers, &names)?;
        }
    }
    Ok(())
}

pub fn read_policy(file: &PathBuf) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok((file.display().to_string(), text))
}

/// `meshctl policy test`: parse, compile, run the file's tests.
pub fn policy_test(file: &PathBuf) -> anyhow::Result<()> {
    let (name, text) = read_policy(file)?;
    let policy = policy::Policy::parse(&name, &text)?;
    let failures = policy::Engine::compile(&policy).run_tests(&policy.tests);
    for f in &failures {
        println!("FAIL  {name}: {f}");
    }
    println!(
        "{name}: {} rule(s), {} test(s), {} passed, {} failed",
        policy.rules.len(),
        policy.tests.len(),
        policy.tests.len() - failures.len(),
        failures.len()
    );
    anyhow::ensure!(failures.is_empty(), "{} test(s) failed", failures.len());
    Ok(())
}

/// `meshctl policy explain --to ADDRESS`: the verdict on a connection leaving the mesh.
fn explain_egress(
    policy: &policy::Policy,
    from: &str,
    address: std::net::Ipv4Addr,
    port: u16,
    names: &[String],
) {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let request = policy::EgressRequest { from, address, port, names: &names };
    let decision = policy::Engine::compile(policy).evaluate_egress(&request);
    let reason = match decision.rule {
        None => "deny: no rule lets it leave the mesh".to_owned(),
        Some(_) => decision.reason(),
    };
    println!("{}: {reason}", request.describe());
    for (rule, action) in &decision.dry_run {
        println!("  dry run: {rule} would {action}");
    }
}

/// `meshctl policy explain`: the verdict on a request or connection to a service, or (`to` an
/// IPv4 address) on a connection leaving the mesh, and the rule behind it.
#[allow(clippy::too_many_arguments)]
pub fn explain(
    policy: &policy::Policy,
    from: &str,
    to: &str,
    port: u16,
    method: Option<&str>,
    path: Option<&str>,
    headers: &[String],
    names: &[String],
) -> anyhow::Result<()> {
    if let Ok(address) = to.parse::<std::net::Ipv4Addr>() {
        anyhow::ensure!(
            method.is_none() && headers.is_empty(),
            "a connection leaving the mesh is decided as a connection: no METHOD, PATH or header"
        );
        explain_egress(policy, from, address, port, names);
        return Ok(());
    }
    anyhow::ensure!(names.is_empty(), "--name is for an address outside the mesh (--to A.B.C.D)");
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').with_context(|| format!("header `{h}` is not `NAME: VALUE`"))?;
            Ok((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect::<anyhow::Result<_>>()?;
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
    let engine = policy::Engine::compile(policy);
    // Methods are case-sensitive tokens: `delete` is not `DELETE`.
    let http = match method {
        None => None,
        Some(m) => match policy::canonicalize(m, path.unwrap_or("/")) {
            Ok(http) => Some(http),
            Err(e) => {
                println!("{from} -> {to}:{port} {m} {}: refused (400 Bad Request): {e}", path.unwrap_or("/"));
                return Ok(());
            }
        },
    };
    let request = match &http {
        Some(http) => policy::Request::http(from, to, port, http, &pairs),
        None => policy::Request::tcp(from, to, port),
    };
    let decision = engine.evaluate(&request);
    println!("{}: {}", policy::describe(&request), decision.reason());
    for (rule, action) in &decision.dry_run {
        println!("  dry run: {rule} would {action}");
    }
    Ok(())
}
