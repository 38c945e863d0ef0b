//! What the two-process tests share.

use std::path::{Path, PathBuf};

/// The `handoff-node` example (a node wired as `cellgate run` is), built
/// next to the test binaries by `cargo test`.
pub fn node_binary() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/handoff-node
    let exe = std::env::current_exe().expect("test binary");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/handoff-node");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test -p cellgate-handoff` builds it (or `cargo build -p cellgate-handoff --example handoff-node`)",
        bin.display()
    );
    bin
}
