//! With the `cuda` feature, compile every `src/cuda/*.cu` to PTX (for CUDA_COMPUTE_CAP, default 90)
//! into OUT_DIR, where `include_str!` embeds it. Without the feature there is nothing to build.
use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=src/cuda");
    println!("cargo:rerun-if-changed=src/cudnn");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=ZOO_CUDNN_INCLUDE");
    println!("cargo::rustc-check-cfg=cfg(zoo_cudnn)");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    cudnn();
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

/// cuDNN's fused attention (src/cudnn/sdpa.cpp, `attention_cudnn`): compiled in, with
/// `cfg(zoo_cudnn)`, when ZOO_CUDNN_INCLUDE names the folders holding the cuDNN frontend's
/// headers and cuDNN's own (colon-separated; scripts/build-cuda.sh fetches both from PyPI) and
/// CUDA_HOME has the CUDA runtime's headers. Nothing is linked: the frontend opens libcudnn at run
/// time. Without them the build goes on with zoo's own attention kernels only.
fn cudnn() {
    let Ok(dirs) = env::var("ZOO_CUDNN_INCLUDE") else {
        println!("cargo:warning=zoo-kernels: ZOO_CUDNN_INCLUDE not set, cuDNN attention not compiled in");
        return;
    };
    let mut b = cc::Build::new();
    b.cpp(true).std("c++17").opt_level(2).file("src/cudnn/sdpa.cpp").define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None);
    b.flag_if_supported("-Wno-unused-parameter").flag_if_supported("-Wno-sign-compare").flag_if_supported("-Wno-unused-variable").flag_if_supported("-Wno-unused-function");
    for d in dirs.split(':').filter(|d| !d.is_empty()) {
        b.include(d);
    }
    if let Ok(cuda) = env::var("CUDA_HOME") {
        b.include(PathBuf::from(cuda).join("include"));
    }
    b.compile("zoo_cudnn");
    println!("cargo:rustc-link-lib=dl");
    println!("cargo:rustc-cfg=zoo_cudnn");
}
