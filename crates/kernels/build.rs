//! With the `cuda` feature, compile every `src/cuda/*.cu` to PTX (for CUDA_COMPUTE_CAP, default 90)
//! into OUT_DIR, where `include_str!` embeds it. Without the feature there is nothing to build.
use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=src/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for entry in std::fs::read_dir("src/cuda").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            let ptx = out.join(format!("{stem}.ptx"));
            let status = Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
                .arg(&ptx)
                .arg(&path)
                .status()
                .unwrap_or_else(|e| panic!("zoo-kernels: cannot run `{nvcc}` ({e}); put nvcc on PATH (scripts/build-cuda.sh)"));
            assert!(status.success(), "zoo-kernels: nvcc failed on {}", path.display());
        }
    }
}
