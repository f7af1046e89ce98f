//! Where a result came from: device, dtype, git state, versions; and atomic file writes.

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;
use zoo_core::candle_core::{DType, Device};

/// The compute device and activation dtype chosen on the command line.
#[derive(Clone)]
pub struct Env {
    pub device: Device,
    pub dtype: DType,
    /// Memory a run may plan for (`--max-memory`); default: the device's total memory.
    pub max_memory: Option<u64>,
}

impl Env {
    pub fn parse(device: &str, dtype: &str) -> Result<Self> {
        let device = match device {
            "cpu" => Device::Cpu,
            d if d.starts_with("cuda") => {
                let idx: usize =
                    d.strip_prefix("cuda:").map_or(Ok(0), |i| i.parse()).context("--device: expected cuda:N")?;
                let dev = Device::new_cuda(idx).with_context(|| {
                    format!(
                        "--device {d}: CUDA is unavailable (build with `--features cuda`, see scripts/build-cuda.sh)"
                    )
                })?;
                single_stream(&dev);
                dev
            }
            other => bail!("--device: unknown device `{other}` (cpu, cuda:N)"),
        };
        let dtype = match dtype {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => bail!("--dtype: unknown dtype `{other}` (f32, bf16, f16)"),
        };
        if dtype != DType::F32 && device.is_cpu() {
            bail!("--dtype {dtype:?}: reduced precision is for CUDA; use f32 on CPU");
        }
        Ok(Self { device, dtype, max_memory: None })
    }

    /// Bytes a run may plan for: `--max-memory` if given, else the device's total memory (CPU:
    /// MemTotal of /proc/meminfo; CUDA: the GPU's total memory), else unlimited.
    pub fn memory_limit(&self) -> f64 {
        if let Some(m) = self.max_memory {
            return m as f64;
        }
        let total = if self.device.is_cpu() { cpu_mem_total() } else { cuda_mem_total() };
        total.map_or(f64::INFINITY, |b| b as f64)
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F64 => "f64",
            _ => "f32",
        }
    }

    /// Block until queued device work is done (for honest timings).
    pub fn sync(&self) -> Result<()> {
        self.device.synchronize()?;
        Ok(())
    }

    /// What a result JSON records of where and how it was made: device, dtype, git state, versions.
    pub fn record(&self) -> serde_json::Value {
        json!({ "device": self.describe(), "dtype": self.dtype_name(), "git": git_state(), "versions": versions() })
    }

    pub fn describe(&self) -> serde_json::Value {
        let threads = zoo_core::candle_core::utils::get_num_threads();
        let cpu = cpu_model();
        let mut d = if self.device.is_cuda() {
            json!({ "kind": "cuda", "name": gpu_name(), "cpu": cpu, "threads": threads,
                    "cuda_event_tracking": cuda_event_tracking() })
        } else {
            json!({ "kind": "cpu", "name": cpu, "threads": threads })
        };
        // Runs sharing the device (scripts/device-pool.sh sets this): their tokens/s are not
        // throughput measurements, and the report says so.
        if let Some(n) = concurrent_runs() {
            d["concurrent_runs"] = json!(n);
        }
        // Which implementation the ops with a fused kernel used (`ZOO_KERNELS`): on the CPU it
        // picks the ops' CPU forms (attention, norms, RoPE, SwiGLU, the loss, the scans, the conv)
        // or the candle compositions.
        d["kernels"] = json!(zoo_kernels::mode().name());
        if self.device.is_cpu() {
            // How much of the fused loss's softmax − one-hot the CPU keeps for the backward
            // instead of recomputing the logits (`ZOO_CE_KEEP_BYTES`).
            d["ce_keep_bytes"] = json!(zoo_kernels::cross_entropy::linear_nll_keep_bytes());
        }
        if self.device.is_cuda() {
            d["flash_kernels"] = json!(zoo_kernels::attention::flash_kernel_set());
            d["flash_decode"] = json!(zoo_kernels::attention::decode_kernel());
            // The split-KV kernel's rows per block: fitted to a kv head's rows (the default), or 8 (ZOO_FLASH_DEC_ROWS=8).
            d["flash_decode_rows"] = json!(if zoo_kernels::attention::decode_rows_fit() { "fit" } else { "8" });
            // How grouped MoE dispatch moves its rows (the gather kernels unless ZOO_MOE_DISPATCH_KERNELS=0).
            d["moe_dispatch"] = json!(if zoo_kernels::moe_dispatch::enabled() { "kernels" } else { "composition" });
            if zoo_kernels::attention::flash_kernel_set() == "cudnn" {
                // cuDNN's version, or why it could not be opened (then zoo's kernels ran).
                d["cudnn"] = match zoo_kernels::attention_cudnn::available() {
                    Ok(v) => json!(v),
                    Err(why) => json!({ "error": why }),
                };
            }
            // How the embedding's gradient is summed: sorted by id (deterministic, the default) or
            // atomic (ZOO_EMBEDDING_BWD=atomic); and whether cuDNN's attention backward runs its
            // deterministic algorithm (ZOO_DETERMINISTIC=1).
            d["embedding_bwd"] = json!(if zoo_kernels::embedding::atomic_backward() { "atomic" } else { "sorted" });
            d["deterministic"] = json!(zoo_kernels::deterministic());
            // The linear mixers' training recurrence: the fused scan, or the chunked composition
            // (ZOO_LINEAR_SCAN=chunked).
            d["linear_scan"] = json!(if zoo_linear_attention::chunked_forced() { "chunked" } else { "scan" });
            // Training steps replayed from a CUDA graph where they can be (ZOO_CUDA_GRAPH=1).
            d["cuda_graph"] = json!(zoo_core::graph::enabled());
        }
        d
    }
}

/// `ZOO_CONCURRENT_RUNS`: how many runs share this device, when more than one.
pub fn concurrent_runs() -> Option<u64> {
    std::env::var("ZOO_CONCURRENT_RUNS").ok()?.parse().ok().filter(|&n| n > 1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i", "0"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown CUDA device".into())
}

/// git sha of the checkout and whether tracked files differ from it. Where the working directory
/// is no git checkout (a copy on a GPU machine), the sha the binary was built from is reported,
/// with `"source": "build"`.
pub fn git_state() -> serde_json::Value {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // The commit the binary was built from is recorded too: a checkout copied to another machine
    // can carry a stale .git (the device copies do), so the two can differ.
    let build = json!({
        "sha": option_env!("ZOO_BUILD_GIT_SHA"),
        "dirty": option_env!("ZOO_BUILD_GIT_DIRTY").map(|d| d == "true"),
    });
    match run(&["rev-parse", "HEAD"]) {
        // A checkout at another commit than the binary's (a stale .git in a device copy): its
        // dirty flag says nothing about the code that ran, so the build's record is the top level.
        Some(sha) if option_env!("ZOO_BUILD_GIT_SHA").is_some_and(|b| b != sha) => json!({
            "sha": option_env!("ZOO_BUILD_GIT_SHA"),
            "dirty": option_env!("ZOO_BUILD_GIT_DIRTY").map(|d| d == "true"),
            "source": "build",
            "checkout": sha,
        }),
        Some(sha) => {
            // Results are outputs: a script writing several of them must not mark its later runs
            // dirty, so changes under results/ do not count.
            let dirty = run(&["status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)results"])
                .is_some_and(|s| !s.is_empty());
            json!({ "sha": sha, "dirty": dirty, "build": build })
        }
        None => json!({
            "sha": option_env!("ZOO_BUILD_GIT_SHA"),
            "dirty": option_env!("ZOO_BUILD_GIT_DIRTY").map(|d| d == "true"),
            "source": "build",
        }),
    }
}

pub fn versions() -> serde_json::Value {
    json!({
        "zoo": env!("CARGO_PKG_VERSION"),
        "candle": env!("ZOO_CANDLE_VERSION"),
        "rustc": env!("ZOO_RUSTC_VERSION"),
    })
}

/// Write via a temp file in the same folder, then rename: readers never see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// The current UTC time as RFC 3339 with whole seconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    // Whole seconds, UTC ("2026-12-01T23:55:01Z"), as results have always carried.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn timestamps_are_rfc3339_whole_seconds_utc() {
        let t = super::now_rfc3339();
        let b = t.as_bytes();
        assert_eq!(b.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && b[10] == b'T' && b[4] == b'-' && b[13] == b':', "{t}");
    }
}

fn cpu_mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Whether cudarc's per-buffer event tracking is on (`ZOO_CUDA_EVENT_TRACKING=1`); off by default.
pub fn cuda_event_tracking() -> bool {
    std::env::var("ZOO_CUDA_EVENT_TRACKING").is_ok_and(|v| v == "1")
}

/// candle gives each CUDA device its own stream, which puts cudarc in multi-stream mode: every
/// buffer then gets two CUDA events (created at allocation, destroyed at free) and every kernel
/// launch waits on and records them (a driver call each per kernel argument). zoo runs all work
/// of a device on that one stream, where stream order alone keeps reads and writes in sequence,
/// so the events buy nothing. Turned off here, before the first tensor exists (buffers made
/// earlier keep their events). Measured on an H200 (a probe, not a bench): 1.15× on a batch-64
/// GLA MQAR step, nothing at batch 256, where the GPU is the bottleneck.
/// `ZOO_CUDA_EVENT_TRACKING=1` keeps them, for a side-by-side measurement.
#[cfg(feature = "cuda")]
fn single_stream(dev: &Device) {
    if let (Device::Cuda(d), false) = (dev, cuda_event_tracking()) {
        // SAFETY: every op of this device is issued on its single stream (candle's), so stream
        // order serialises all accesses; no second stream exists in this process.
        unsafe { d.disable_event_tracking() }
    }
}

#[cfg(not(feature = "cuda"))]
fn single_stream(_dev: &Device) {}

#[cfg(feature = "cuda")]
fn cuda_mem_total() -> Option<u64> {
    zoo_core::candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok().map(|(_, total)| total as u64)
}

#[cfg(not(feature = "cuda"))]
fn cuda_mem_total() -> Option<u64> {
    None
}

/// Parse a memory size: bytes, or a number with KB/MB/GB (10^3) or KiB/MiB/GiB (2^10) suffix.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.trim().parse().map_err(|_| anyhow::anyhow!("--max-memory: {s:?} is not a size like 24GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => anyhow::bail!("--max-memory: unknown unit {u:?} (use B, KB, MB, GB, KiB, MiB or GiB)"),
    };
    anyhow::ensure!(x.is_finite() && x > 0.0, "--max-memory: {s:?} must be positive");
    Ok((x * mult) as u64)
}
