// Record the candle version (from Cargo.lock) and rustc version for result JSON provenance.
fn main() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock")).unwrap_or_default();
    let mut candle = "unknown".to_string();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l == "name = \"candle-core\"" {
            if let Some(v) = lines.next() {
                candle = v.trim_start_matches("version = ").trim_matches('"').to_string();
            }
        }
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rv = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ZOO_CANDLE_VERSION={candle}");
    println!("cargo:rustc-env=ZOO_RUSTC_VERSION={rv}");
    println!("cargo:rerun-if-changed=../../Cargo.lock");
    // The commit the binary is built from (for results produced outside a checkout).
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(sha) = git(&["rev-parse", "HEAD"]) {
        println!("cargo:rustc-env=ZOO_BUILD_GIT_SHA={sha}");
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        println!("cargo:rustc-env=ZOO_BUILD_GIT_DIRTY={dirty}");
    }
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/index");
}
