//! `meshctl cluster`, `meshctl unlock` and `meshctl join-token`: cluster-wide settings, unlocking
//! managers (autolock) and the join tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use mesh_api::bundle::AdminBundle;
use mesh_api::client::AdminClient;
use mesh_api::proto::{ClusterView, pb};
use mesh_api::tokens::Role;

use super::output::{Format, data, render, when};

fn when_unix(secs: i64) -> String {
    when(time::OffsetDateTime::from_unix_timestamp(secs).ok())
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Change cluster-wide settings (kept in the replicated state: the same whichever manager
    /// leads). Durations like `12h`, `90m`, `7days`.
    #[command(group(clap::ArgGroup::new("setting").required(true).multiple(true)))]
    Update {
        /// Wrap every manager's data key with an unlock key (printed once), so a restarted
        /// manager serves nothing until `meshctl unlock`; `false` turns it off.
        #[arg(long, action = clap::ArgAction::Set, group = "setting")]
        autolock: Option<bool>,
        /// Lifetime of node certificates issued from now on (1h to 1year).
        #[arg(long, value_parser = duration, group = "setting")]
        cert_expiry: Option<Duration>,
        /// How often each encrypted network's key rotates (1s to 30days).
        #[arg(long, value_parser = duration, group = "setting")]
        key_rotation: Option<Duration>,
        /// Lifetime of workload certificates (1m to 24h).
        #[arg(long, value_parser = duration, group = "setting")]
        workload_cert_expiry: Option<Duration>,
        /// How long a node may be without a session before its endpoints move (1s to 1h).
        #[arg(long, value_parser = duration, group = "setting")]
        down_after: Option<Duration>,
    },
    /// Admin credentials: issue a new bundle (its key made here), list, revoke.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Show the cluster-wide settings in force and the managers.
    Inspect {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show the unlock key (autolock), or replace it with --rotate.
    UnlockKey {
        #[arg(long)]
        rotate: bool,
    },
    /// Show the root CA (digest, expiry) and a rotation's progress; --rotate starts a rotation.
    ///
    /// A rotation makes a new root (or takes --ca-cert/--ca-key, or an external CA's
    /// --ca-cert with --external-ca), cross-signed by the current one (--cross-cert when the
    /// current root is an external CA's), and every node renews from it at once; traffic keeps flowing throughout. Once every
    /// manager and every worker not down has renewed, the old root is trusted no more and the
    /// join tokens pin the new one. This admin bundle is renewed from the new root at the start;
    /// other admin bundles must be issued again (`meshctl cluster admin issue`).
    Ca {
        /// Start a rotation, and follow it until it ends (unless --detach).
        #[arg(long)]
        rotate: bool,
        /// Start the rotation and return at once; `meshctl cluster ca` follows it.
        #[arg(long, requires = "rotate")]
        detach: bool,
        /// The new root's certificate (PEM): a CA certificate whose O is the cluster ID, valid
        /// for a year at least. With --ca-key, or with --external-ca.
        #[arg(long, requires = "rotate")]
        ca_cert: Option<PathBuf>,
        /// The new root's ECDSA P-256 private key (PEM).
        #[arg(long, requires = "ca_cert", conflicts_with = "external_ca")]
        ca_key: Option<PathBuf>,
        /// Rotate to an external CA: the CFSSL server that signs with --ca-cert, e.g.
        /// `cfssl=http://10.0.0.5:8888` (as `mesh-control init --external-ca`). It must sign
        /// before the rotation starts; from then on no manager holds a CA key.
        #[arg(
            long,
            value_name = "cfssl=URL",
            requires_all = ["ca_cert", "external_ca_key"],
            value_parser = parse_external_ca
        )]
        external_ca: Option<String>,
        /// The file holding the external CA's auth key (hex, as in CFSSL's `auth_keys`).
        #[arg(long, value_name = "FILE", requires = "external_ca")]
        external_ca_key: Option<PathBuf>,
        /// The new root cross-signed by the current one (PEM): what lets nodes that trust the
        /// current root take the new one. Needed when the current root is an external CA's (no
        /// manager holds its key); else the leader makes it.
        #[arg(long, value_name = "FILE", requires = "ca_cert")]
        cross_cert: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Write a new admin bundle to DIR (ca.crt, admin.crt, admin.key 0600, control): its key is
    /// made here and never sent; the certificate lasts --expiry (default 30days).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = duration)]
        expiry: Option<Duration>,
        /// Who or what the credential is for.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List the admin credentials the cluster accepts.
    Ls,
    /// Revoke an admin credential (by serial, from `ls`): refused on every call from now on.
    Revoke { serial: String },
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); examples: 24h, 90m, 7days"))
}

/// The settings, one per line.
fn settings(c: &ClusterView) -> String {
    let d = |d: Duration| humantime::format_duration(d).to_string();
    render(
        &["SETTING", "VALUE"],
        [
            ("cluster", c.id.to_string()),
            ("autolock", if c.autolock { "on" } else { "off" }.to_owned()),
            ("cert-expiry", d(c.cert_expiry)),
            ("key-rotation", d(c.key_rotation)),
            ("workload-cert-expiry", d(c.workload_cert_expiry)),
            ("down-after", d(c.down_after)),
            ("managers", c.managers.join(",")),
        ]
        .into_iter()
        .map(|(k, v)| vec![k.to_owned(), v]),
    )
}

/// Runs `meshctl cluster ...` against the leader.
pub async fn run(cmd: ClusterCmd, client: &mut AdminClient) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Update { autolock, cert_expiry, key_rotation, workload_cert_expiry, down_after } => {
            let secs = |d: Option<Duration>| d.map(|d| d.as_secs());
            let request = pb::UpdateClusterRequest {
                autolock,
                cert_expiry_secs: secs(cert_expiry),
                key_rotation_secs: secs(key_rotation),
                workload_cert_expiry_secs: secs(workload_cert_expiry),
                down_after_secs: secs(down_after),
            };
            let key = client.update_settings(request).await?;
            match autolock {
                Some(true) => {
                    println!(
                        "Autolock is on. The unlock key (keep it safe; `meshctl cluster unlock-key` shows it):"
                    );
                    println!("    {key}");
                    println!("A restarted manager serves nothing until given it: meshctl unlock");
                }
                Some(false) => {
                    println!("Autolock is off: managers keep their data key in the clear (mode 0600).")
                }
                None => {}
            }
            if [cert_expiry, key_rotation, workload_cert_expiry, down_after].iter().any(Option::is_some) {
                print!("{}", settings(&client.inspect_cluster().await?));
            }
        }
        ClusterCmd::Admin(AdminCmd::Issue { dir, expiry, label }) => {
            anyhow::ensure!(
                !dir.join("admin.key").exists(),
                "{} already holds an admin bundle; give another --dir",
                dir.display()
            );
            let (key, csr_pem) = mesh_api::join::key_and_csr()?;
            let issued = client.issue_admin(csr_pem, expiry, &label).await?;
            let bundle = AdminBundle {
                managers: issued.managers,
                manager_ids: issued.manager_ids,
                ca_pem: issued.ca_pem,
                identity: mesh_api::tls::Identity { cert_pem: issued.cert_pem, key_pem: key.serialize_pem() },
            };
            bundle.write(&dir)?;
            let credential = issued.credential.unwrap_or_default();
            println!(
                "admin credential {} written to {} (expires {}); use it with MESHCTL_ADMIN={}",
                credential.serial,
                dir.display(),
                when_unix(credential.not_after),
                dir.display()
            );
        }
        ClusterCmd::Admin(AdminCmd::Ls) => {
            let admins = client.list_admins().await?;
            print!(
                "{}",
                render(
                    &["SERIAL", "LABEL", "ISSUED", "EXPIRES"],
                    admins.iter().map(|a| vec![
                        a.serial.clone(),
                        if a.label.is_empty() { "-".to_owned() } else { a.label.clone() },
                        when_unix(a.issued_at),
                        when_unix(a.not_after),
                    ])
                )
            );
        }
        ClusterCmd::Admin(AdminCmd::Revoke { serial }) => {
            let revoked = client.revoke_admin(&serial).await?;
            println!("admin credential {} revoked; it is refused from now on", revoked.serial);
        }
        ClusterCmd::Inspect { format } => {
            let cluster = client.inspect_cluster().await?;
            match format {
                Format::Json | Format::Yaml => print!("{}", data(format, &cluster)?),
                Format::Table => print!("{}", settings(&cluster)),
            }
        }
        ClusterCmd::Ca { .. } => {
            unreachable!("`cluster ca` runs with the admin bundle's directory: see `ca`")
        }
        ClusterCmd::UnlockKey { rotate } => {
            let key = client.unlock_key(rotate).await?;
            if rotate {
                println!("The unlock key was rotated; the previous one no longer unlocks any manager.");
            }
            println!("{key}");
        }
    }
    Ok(())
}

/// A root, as `cluster ca` shows it.
#[derive(serde::Serialize)]
struct RootView {
    digest: String,
    subject: String,
    expires: String,
    /// `signing`, or `previous` (trusted until the rotation ends).
    state: &'static str,
}

/// `cluster ca` as data.
#[derive(serde::Serialize)]
struct CaView {
    roots: Vec<RootView>,
    /// The external CA's URL, when the managers hold no CA key.
    #[serde(skip_serializing_if = "Option::is_none")]
    external: Option<String>,
    /// The external CA's last request, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    external_failed: Option<SignerFailure>,
    rotating: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    nodes: u32,
    renewed: u32,
    late: Vec<LateView>,
}

#[derive(serde::Serialize)]
struct SignerFailure {
    at: String,
    error: String,
}

#[derive(serde::Serialize)]
struct LateView {
    id: String,
    hostname: String,
    role: String,
    offline: bool,
}

fn ca_view(status: &pb::CaStatusResponse) -> CaView {
    let rfc = |secs: i64| {
        time::OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| secs.to_string())
    };
    CaView {
        roots: status
            .roots
            .iter()
            .enumerate()
            .map(|(i, r)| RootView {
                digest: r.digest.clone(),
                subject: r.subject.clone(),
                expires: rfc(r.not_after),
                state: if i == 0 { "signing" } else { "previous" },
            })
            .collect(),
        external: (!status.external.is_empty()).then(|| status.external.clone()),
        external_failed: (!status.external_error.is_empty()).then(|| SignerFailure {
            at: rfc(status.external_error_at),
            error: status.external_error.clone(),
        }),
        rotating: status.rotating,
        started: status.rotating.then(|| rfc(status.started_at)),
        nodes: status.total,
        renewed: status.done,
        late: status
            .late
            .iter()
            .map(|l| LateView {
                id: l.id.clone(),
                hostname: l.hostname.clone(),
                role: Role::try_from(pb::Role::try_from(l.role).unwrap_or(pb::Role::Unspecified))
                    .map_or_else(|_| "?".to_owned(), |r| r.to_string()),
                offline: l.offline,
            })
            .collect(),
    }
}

/// The rotation's progress in one line: nodes renewed out of all, and who is late.
fn progress_line(view: &CaView) -> String {
    let waiting: Vec<String> = view
        .late
        .iter()
        .filter(|l| !l.offline)
        .map(|l| format!("{} ({})", l.hostname, short(&l.id)))
        .collect();
    let offline: Vec<String> = view
        .late
        .iter()
        .filter(|l| l.offline)
        .map(|l| format!("{} ({})", l.hostname, short(&l.id)))
        .collect();
    let mut line = format!("renewed from the new root: {}/{} nodes", view.renewed, view.nodes);
    if !waiting.is_empty() {
        line.push_str(&format!("; waiting for {}", waiting.join(", ")));
    }
    if !offline.is_empty() {
        line.push_str(&format!("; down, not waited for (they must join again): {}", offline.join(", ")));
    }
    line
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn show_ca(status: &pb::CaStatusResponse, format: Format) -> anyhow::Result<()> {
    let view = ca_view(status);
    match format {
        Format::Json | Format::Yaml => print!("{}", data(format, &view)?),
        Format::Table => {
            print!(
                "{}",
                render(
                    &["ROOT", "STATE", "EXPIRES", "SUBJECT"],
                    view.roots.iter().map(|r| vec![
                        r.digest.clone(),
                        r.state.to_owned(),
                        r.expires.clone(),
                        r.subject.clone()
                    ])
                )
            );
            if let Some(url) = &view.external {
                println!("signed by the external CA at {url}: no manager holds the root's key");
            }
            if let Some(failed) = &view.external_failed {
                println!("its last request failed ({}): {}", failed.at, failed.error);
            }
            match &view.started {
                Some(started) => println!("rotation started {started}: {}", progress_line(&view)),
                None => println!("no rotation under way"),
            }
        }
    }
    Ok(())
}

/// Once no rotation is under way, the bundle in `admin_dir` trusts only the roots the cluster
/// does (a rotation left it trusting the old root too).
fn narrow_bundle(admin_dir: &std::path::Path, status: &pb::CaStatusResponse) -> anyhow::Result<()> {
    let mut bundle = AdminBundle::load(admin_dir)?;
    let Ok(trust) = mesh_api::trust::Trust::from_pem(&bundle.ca_pem) else { return Ok(()) };
    let kept: String = trust
        .roots()
        .iter()
        .filter(|r| status.roots.iter().any(|s| s.digest == r.digest))
        .map(|r| r.pem.as_str())
        .collect();
    if !kept.is_empty() && kept != bundle.ca_pem {
        bundle.ca_pem = kept;
        bundle.write(admin_dir)?;
        eprintln!("admin bundle {} trusts the cluster's current root alone now", admin_dir.display());
    }
    Ok(())
}

/// The rotation's status, asked again on a new connection when the managers cut the one in use:
/// the end of a rotation cuts every connection to them, so whoever watches it sees that cut.
async fn ca_status_through_cuts(
    client: &mut AdminClient,
    admin_dir: &std::path::Path,
) -> anyhow::Result<pb::CaStatusResponse> {
    let mut failures = 0;
    loop {
        match client.ca_status().await {
            Ok(status) => return Ok(status),
            Err(e)
                if failures < 10
                    && matches!(e.code(), Some(tonic::Code::Unknown | tonic::Code::Unavailable)) =>
            {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                *client = AdminClient::connect(&AdminBundle::load(admin_dir)?).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `--external-ca cfssl=URL`: the URL.
fn parse_external_ca(value: &str) -> Result<String, String> {
    value
        .strip_prefix("cfssl=")
        .filter(|url| url.starts_with("http://"))
        .map(str::to_owned)
        .ok_or_else(|| format!("`{value}`: expected cfssl=http://HOST:PORT"))
}

/// `meshctl cluster ca [--rotate [--detach] [--ca-cert F --ca-key F]]`. A rotation renews the
/// admin bundle in `admin_dir` from the new root first (the old root's certificates stop working
/// when it ends), then follows the rotation until it ends, unless detached.
pub async fn ca(
    cmd: ClusterCmd,
    client: &mut AdminClient,
    admin_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let ClusterCmd::Ca { rotate, detach, ca_cert, ca_key, external_ca, external_ca_key, cross_cert, format } =
        cmd
    else {
        unreachable!("only `cluster ca` comes here")
    };
    if !rotate {
        let status = ca_status_through_cuts(client, admin_dir).await?;
        if !status.rotating {
            narrow_bundle(admin_dir, &status)?;
        }
        return show_ca(&status, format);
    }
    anyhow::ensure!(
        ca_cert.is_none() || ca_key.is_some() || external_ca.is_some(),
        "--ca-cert goes with --ca-key (a root of the cluster's own) or with --external-ca"
    );
    let read = |path: Option<PathBuf>| -> anyhow::Result<String> {
        path.map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display())))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let request = pb::RotateCaRequest {
        cert_pem: read(ca_cert)?,
        key_pem: read(ca_key)?,
        cross_pem: read(cross_cert)?,
        external_url: external_ca.unwrap_or_default(),
        external_auth_key: read(external_ca_key)?.trim().to_owned(),
    };
    let started = client.rotate_ca(request).await?;
    let new_root = started.roots.first().map(|r| r.digest.clone()).unwrap_or_default();
    eprintln!("root CA rotation started: the new root is {new_root}");
    // This bundle's certificate is the old root's: renewed now, it keeps working after the end.
    let bundle = AdminBundle::load(admin_dir)?;
    let (key, csr_pem) = mesh_api::join::key_and_csr()?;
    let issued = client.issue_admin(csr_pem, None, "renewed by meshctl cluster ca --rotate").await?;
    let renewed = AdminBundle {
        managers: bundle.managers,
        manager_ids: bundle.manager_ids,
        ca_pem: issued.ca_pem,
        identity: mesh_api::tls::Identity { cert_pem: issued.cert_pem, key_pem: key.serialize_pem() },
    };
    renewed.write(admin_dir)?;
    eprintln!(
        "admin bundle {} renewed from the new root; other admin bundles must be issued again \
         (meshctl cluster admin issue) before the rotation ends",
        admin_dir.display()
    );
    *client = AdminClient::connect(&renewed).await?;
    if detach {
        eprintln!("detached: `meshctl cluster ca` shows the rotation's progress");
        return show_ca(&client.ca_status().await?, format);
    }
    let mut last = String::new();
    let status = loop {
        let status = ca_status_through_cuts(client, admin_dir).await?;
        if !status.rotating {
            break status;
        }
        let line = progress_line(&ca_view(&status));
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    narrow_bundle(admin_dir, &status)?;
    eprintln!(
        "root CA rotation done: only {new_root} is trusted now, and the join tokens pin it \
         (meshctl join-token worker|manager shows them)"
    );
    show_ca(&status, format)
}

/// `meshctl unlock --state-dir DIR`: gives the unlock key (from stdin) to the locked manager
/// whose state directory is `state_dir`, on this host.
pub async fn unlock(state_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    let key = if std::io::stdin().is_terminal() {
        read_without_echo("Unlock key: ")?
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("cannot read the unlock key from stdin")?;
        line
    };
    let key = key.trim();
    anyhow::ensure!(!key.is_empty(), "no unlock key given on stdin");
    mesh_api::unlock::unlock(state_dir, key).await?;
    println!("{}: unlocked", state_dir.display());
    Ok(())
}

/// A line from the terminal, not echoed.
fn read_without_echo(prompt: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    use std::io::BufRead;
    eprint!("{prompt}");
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning the terminal's echo off")?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.context("cannot read the unlock key")?;
    Ok(line)
}

/// `meshctl join-token ROLE`: shows (or rotates) the token and how to use it on another host.
pub async fn join_token(
    client: &mut AdminClient,
    bundle: &AdminBundle,
    role: &str,
    rotate: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let role: Role = role.parse().map_err(anyhow::Error::msg)?;
    let token = client.join_token(role, rotate).await?;
    if quiet {
        println!("{token}");
    } else {
        if rotate {
            println!("The {role} join token was rotated; the previous one no longer works.");
        }
        println!("To add a {role}, run on it:");
        let control = bundle.managers.join(",");
        match role {
            Role::Worker => {
                println!("    meshd join --control {control} --token {token} --state-dir /var/lib/meshd")
            }
            Role::Manager => println!(
                "    mesh-control join --control {control} --token {token} --state-dir /var/lib/mesh-control"
            ),
        }
    }
    Ok(())
}
