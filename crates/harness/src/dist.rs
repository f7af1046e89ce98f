//! Multi-GPU data-parallel runs (`zoo launch`, torchrun's and Slurm's variables): which rank this
//! process is, its device, its communicator; and the launcher that starts one process per GPU.
//! The training side is `zoo_core::dist`.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use zoo_core::dist::{Comm, World};

/// The `--device` a rank runs on: `cuda:LOCAL_RANK` (the flag picks CUDA; the rank picks the GPU).
pub fn rank_device(device: &str, world: &World) -> Result<String> {
    if !device.starts_with("cuda") {
        bail!(
            "--device {device}: a data-parallel run (WORLD_SIZE={}) trains on CUDA GPUs, one per rank; pass --device cuda",
            world.size
        );
    }
    Ok(format!("cuda:{}", world.local_rank))
}

/// Every run's global batch must split evenly over the ranks: said before any work, naming the field.
pub fn check_batches<'a>(runs: impl Iterator<Item = &'a crate::config::PlannedRun>, world: &World) -> Result<()> {
    for r in runs {
        let b = r.config.train.batch_size;
        if b % world.size != 0 {
            bail!("run `{}`: train.batch_size = {b} does not split evenly over WORLD_SIZE = {} ranks", r.id, world.size);
        }
    }
    Ok(())
}

/// This rank's communicator: NCCL on its GPU, meeting the other ranks through `ZOO_NCCL_ID_FILE`.
pub fn communicator(world: World, device: &zoo_core::candle_core::Device) -> Result<Arc<dyn Comm>> {
    let id_file = std::env::var_os("ZOO_NCCL_ID_FILE").map(PathBuf::from).context(
        "a data-parallel run needs ZOO_NCCL_ID_FILE (a path every rank can read, where rank 0 writes NCCL's id): \
         start the ranks with `zoo launch --gpus N ...`, or set it yourself (Slurm: scripts/slurm-train.sbatch)",
    )?;
    #[cfg(feature = "cuda")]
    {
        let c = zoo_core::dist::nccl::Nccl::new(world, device, &id_file, Duration::from_secs(300))
            .with_context(|| format!("rank {} of {}", world.rank, world.size))?;
        Ok(Arc::new(c))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, id_file, Duration::ZERO);
        bail!("rank {} of {}: this zoo is built without CUDA, so without NCCL (scripts/build-cuda.sh)", world.rank, world.size)
    }
}

/// How long ranks get to finish their step and save after SIGTERM before they are killed.
const KILL_AFTER: Duration = Duration::from_secs(120);

/// `zoo launch --gpus N ARGS`: run `zoo ARGS` as N ranks on this machine (RANK, WORLD_SIZE,
/// LOCAL_RANK, ZOO_NCCL_ID_FILE set per child). SIGINT/SIGTERM are passed on to every rank (each
/// finishes its step; rank 0 saves the checkpoint); when one rank fails the others are stopped,
/// and killed if they have not exited 2 minutes later.
/// Returns the exit status: 0, or the first failing rank's.
pub fn launch(gpus: usize, global: &[String], args: &[String]) -> Result<i32> {
    if gpus == 0 {
        bail!("--gpus: must be at least 1");
    }
    if args.is_empty() {
        bail!("zoo launch: give the command to run on every rank, e.g. `zoo --device cuda launch --gpus 2 run CONFIG`");
    }
    let exe = std::env::current_exe().context("finding the zoo binary")?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let id_file = std::env::temp_dir().join(format!("zoo-nccl-{}-{nanos}.id", std::process::id()));
    let stop = crate::runner::stop_signal();
    let mut children = Vec::with_capacity(gpus);
    for rank in 0..gpus {
        let child = std::process::Command::new(&exe)
            .args(global)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", gpus.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("ZOO_NCCL_ID_FILE", &id_file)
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(Some(child));
    }
    let mut status = 0;
    let mut forwarded: Option<std::time::Instant> = None;
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                if let Some(st) = c.try_wait()? {
                    let code = st.code().unwrap_or(128 + 9);
                    if code != 0 && status == 0 {
                        status = code;
                        eprintln!("zoo launch: rank {rank} exited with {code}; stopping the others");
                    }
                    *slot = None;
                }
            }
        }
        let signal = stop.load(std::sync::atomic::Ordering::SeqCst);
        if (signal != 0 || status != 0) && forwarded.is_none() {
            for c in children.iter().flatten() {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
            forwarded = Some(std::time::Instant::now());
        }
        // A rank still there long after SIGTERM is stuck (e.g. in a collective whose peer has
        // died): kill it.
        if forwarded.is_some_and(|t| t.elapsed() > KILL_AFTER) {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(&id_file);
    Ok(status)
}
