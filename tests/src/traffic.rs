//! Traffic between lab workloads, and the underlay as an eavesdropper or an attacker on the
//! switch sees it: a TCP transfer checked end to end, captures of the bridge, and datagrams
//! injected from a host.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use crate::lab::{Lab, script};

/// The address of `service`'s first endpoint on `network`.
pub fn address(lab: &Lab, service: &str, network: &str) -> String {
    let json: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["service", "inspect", service])).unwrap();
    json["endpoints"][0]["addresses"][network].as_str().unwrap().to_owned()
}

pub fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    lab.exec(from, &["ping", "-c", "1", "-W", "1", to]).stdout(Stdio::null()).status().unwrap().success()
}

/// Starts a receiving end in `ns`; returns it once it listens.
pub fn serve(lab: &Lab, ns: &str, port: u16) -> Child {
    let mut child = lab
        .exec(ns, &["python3", &script("tcp.py"), "serve", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    child
}

/// Sends `size` bytes from `ns` to `to:port` (a repeated `marker`, or random) and checks what
/// the server received is the same.
pub fn transfer(lab: &Lab, server: Child, ns: &str, to: &str, port: u16, size: usize, marker: Option<&str>) {
    let mut args = vec![
        "python3".to_owned(),
        script("tcp.py"),
        "send".into(),
        to.into(),
        port.to_string(),
        size.to_string(),
    ];
    args.extend(marker.map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sent = lab.exec(ns, &args).output().unwrap();
    assert!(sent.status.success(), "sending: {}", String::from_utf8_lossy(&sent.stderr));
    let received = server.wait_with_output().unwrap();
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
    let received = String::from_utf8_lossy(&received.stdout).lines().last().unwrap_or("").trim().to_owned();
    assert_eq!(received, sent, "bytes received differ from bytes sent");
    assert!(sent.starts_with(&size.to_string()));
}

/// Captures the underlay at host 3's port of the bridge while `during` runs; returns every frame.
pub fn capture(lab: &Lab, seconds: f32, during: impl FnOnce()) -> Vec<Vec<u8>> {
    let file = lab.work.path().join(format!("capture-{}", rand_name()));
    let mut cap = lab
        .exec(
            &lab.bridge(),
            &["python3", &script("capture.py"), "v3", &seconds.to_string(), file.to_str().unwrap()],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(cap.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    during();
    cap.wait().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        frames.push(bytes[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    frames
}

pub fn rand_name() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
}

/// Overlay datagrams in `frames` from underlay address `from` to `to`: the UDP payloads.
pub fn datagrams(frames: &[Vec<u8>], from: &str, to: &str) -> Vec<Vec<u8>> {
    let (from, to): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (from.parse().unwrap(), to.parse().unwrap());
    frames
        .iter()
        .filter_map(|f| {
            let ip = f.get(14..)?;
            if f.get(12..14)? != [0x08, 0x00] || ip[9] != 17 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let (src, dst) = (&ip[12..16], &ip[16..20]);
            let udp = ip.get(ihl..)?;
            let port = u16::from_be_bytes([udp[2], udp[3]]);
            (src == from.octets() && dst == to.octets() && port == 4800).then(|| udp[8..].to_vec())
        })
        .collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn inject(lab: &Lab, host: usize, to: &str, datagrams: &[Vec<u8>]) {
    let mut args = vec!["python3".to_owned(), script("inject.py"), to.to_owned(), "4800".into()];
    args.extend(datagrams.iter().map(|d| hex(d)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(lab.exec(&lab.host(host), &args).status().unwrap().success());
}
