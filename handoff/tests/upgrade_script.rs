//! `dist/cellgate-upgrade --pid` end to end: two real processes (the
//! `handoff-node` example, wired as `cellgate run` should be), the real
//! script, SIGQUIT, a client connecting in a loop throughout.

mod support;

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rustix::process::{kill_process, Pid, Signal};
use support::node_binary;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/cellgate-upgrade")
}

struct Node {
    child: Child,
    http: SocketAddr,
    dns: SocketAddr,
}

/// Stops the node this test started if the test ends early.
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the old node and waits for its `serving` line.
fn start_node(bin: &Path, config: &Path, socket: &Path) -> Node {
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("CELLGATE_UPGRADE_SOCKET", socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("node started");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("serving line");
    let field = |k: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
    };
    Node {
        http: field("http="),
        dns: field("dns-udp="),
        child,
    }
}

fn ask(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    out.strip_suffix('\n')
        .map(str::to_string)
        .ok_or_else(|| format!("incomplete answer {out:?}"))
}

/// Connects in a loop (bounded: 20 000 times or 60 s) until `stop`.
fn client(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut answers, mut errors) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && answers.len() + errors.len() < 20_000 && start.elapsed().as_secs() < 60 {
            match ask(addr) {
                Ok(a) => answers.push(a),
                Err(e) => errors.push(e),
            }
        }
        (answers, errors)
    })
}

fn upgrade(pid: u32, bin: &Path, config: &Path, socket: &Path, log: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(script())
        .args(["--pid", &pid.to_string(), "--timeout", "30", "--config"])
        .arg(config)
        .arg("--binary")
        .arg(bin)
        .arg("--socket")
        .arg(socket)
        .arg("--log")
        .arg(log)
        .output()
        .expect("script ran")
}

fn stop(pid: u32) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = kill_process(pid, Signal::TERM);
    }
}

#[test]
fn the_upgrade_script_moves_every_socket_without_a_refused_connection() {
    let bin = node_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("node.conf");
    std::fs::write(&config, "http 127.0.0.1:0\ndns-udp 127.0.0.1:0\ngrace 500\n").expect("config");
    let socket = dir.path().join("upgrade.sock");
    let mut old = start_node(&bin, &config, &socket);
    let old_pid = old.child.id();

    let done = Arc::new(AtomicBool::new(false));
    let load = client(old.http, done.clone());
    let out = upgrade(old_pid, &bin, &config, &socket, &dir.path().join("new.log"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.path().join("new.log")).unwrap_or_default();
    assert!(out.status.success(), "script failed: {stderr}\nnew process log:\n{log}");
    let new_pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the script prints the new pid");
    assert!(old.child.wait().expect("old exited").success(), "old exits cleanly");

    // Keep connecting a while against the new process alone.
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, Ordering::Relaxed);
    let (answers, errors) = load.join().expect("client thread");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    udp.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    udp.send_to(b"query", old.dns).expect("send");
    let mut buf = [0u8; 64];
    let got = udp.recv(&mut buf).map(|n| buf[..n].to_vec());
    stop(new_pid);

    assert!(errors.is_empty(), "refused or failed connections: {errors:?}\n{stderr}");
    let (from_old, from_new) = (format!("pid {old_pid}"), format!("pid {new_pid}"));
    assert!(answers.contains(&from_old), "the old process answered first");
    assert_eq!(answers.last(), Some(&from_new), "the new process answers at the end");
    assert!(
        answers.iter().all(|a| *a == from_old || *a == from_new),
        "only the two processes answered"
    );
    assert_eq!(
        got.expect("a DNS answer from the new process"),
        format!("pid {new_pid}: query").into_bytes()
    );
    assert!(log.contains(&format!("took over from {old_pid}")), "{log}");
}

#[test]
fn a_config_the_new_process_refuses_changes_nothing() {
    let bin = node_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("node.conf");
    std::fs::write(&config, "http 127.0.0.1:0\n").expect("config");
    let socket = dir.path().join("upgrade.sock");
    let mut old = start_node(&bin, &config, &socket);
    std::fs::write(&config, "invalid\n").expect("broken config");
    let out = upgrade(old.child.id(), &bin, &config, &socket, &dir.path().join("new.log"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing changed"), "{stderr}");
    assert_eq!(ask(old.http), Ok(format!("pid {}", old.child.id())));
    stop(old.child.id());
    assert!(old.child.wait().expect("old exited").success());
}
