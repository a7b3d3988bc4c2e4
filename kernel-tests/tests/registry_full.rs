//! A full disk under the master's registry is a moment, not an outage: on
//! a small tmpfs filled to the last byte, a SUBSCRIBE (which must be written
//! to the registry before it is acknowledged) is refused with 503 and the
//! reason while the master keeps serving; once space returns the next one
//! succeeds, with no restart (redb refuses every transaction after an I/O
//! error until the store is reopened, which the master now does itself).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

mod common;
use common::cluster::{Cluster, http_get};
use common::{fill, mount_tmpfs};

/// The status line's code and the first bytes of the answer to a SUBSCRIBE.
/// `padding` bytes in the framework's hostname make its registry record
/// large: a small one fits in pages the store already holds, full disk or not.
fn subscribe(port: u16, name: &str, padding: usize) -> (u16, String) {
    let hostname = "h".repeat(padding.max(1));
    let body = format!(
        r#"{{"type":"SUBSCRIBE","subscribe":{{"framework_info":{{"user":"root","name":"{name}","hostname":"{hostname}"}}}}}}"#
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "POST /api/v1/scheduler HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let mut read = 0;
    // Enough for the status line and an error's body; a 200 keeps streaming.
    while read < answer.len() {
        match stream.read(&mut answer[read..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
        if read > 12 && !answer[..read].starts_with(b"HTTP/1.1 200") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break;
    }
    let text = String::from_utf8_lossy(&answer[..read]).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[test]
fn a_full_registry_disk_refuses_writes_with_503_and_they_resume_when_space_returns() {
    let cluster = Cluster::start_prepared(
        "registry-full",
        15230,
        15231,
        "cpus:2;mem:1024",
        &[],
        |dir| mount_tmpfs(&dir.join("master"), "8m"),
    );
    let master_dir = cluster.dir.join("master");
    let unmount = || {
        let _ = Command::new("umount").arg("-l").arg(&master_dir).status();
    };

    let (code, _) = subscribe(cluster.master_port, "before", 0);
    assert_eq!(code, 200, "a framework subscribes while there is space");

    let filler = fill(&master_dir);
    let (code, answer) = subscribe(cluster.master_port, "while-full", 1 << 20);
    if code != 503 {
        unmount();
    }
    assert_eq!(code, 503, "refused while the disk is full:\n{answer}");
    assert!(
        answer.contains("could not persist"),
        "the answer says why:\n{answer}"
    );
    // Again: the store stays closed, the refusal stays clear.
    assert_eq!(subscribe(cluster.master_port, "still-full", 1 << 20).0, 503);
    assert!(
        http_get(cluster.master_port, "/health").is_some(),
        "the master keeps serving"
    );

    std::fs::remove_file(&filler).unwrap();
    let (code, answer) = subscribe(cluster.master_port, "after", 1 << 20);
    unmount_after(&cluster, unmount, code, &answer);
}

fn unmount_after(cluster: &Cluster, unmount: impl Fn(), code: u16, answer: &str) {
    let frameworks = http_get(cluster.master_port, "/frameworks").unwrap_or_default();
    unmount();
    assert_eq!(
        code, 200,
        "writes resume once space returns, no restart:\n{answer}"
    );
    assert!(frameworks.contains("\"after\""), "{frameworks}");
    assert!(
        !frameworks.contains("\"while-full\""),
        "the refused one was not kept: {frameworks}"
    );
}
