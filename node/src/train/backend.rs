//! Choosing the compute device: WebGPU through burn-wgpu, the native CPU engine
//! ([`crate::train::native`]: fused hand-written kernels, the fastest CPU path in every build),
//! burn's pure-Rust CPU backend (`flex`), or, in builds with the `torch` feature, burn's LibTorch
//! backend on the CPU (PyTorch's own kernels, at the cost of a libtorch install; README,
//! "LibTorch backend").
//!
//! `auto` uses wgpu when it finds a hardware adapter and says which; a software-only adapter
//! (Mesa's lavapipe/llvmpipe) is slower than the CPU, so `auto` then falls back to the native
//! CPU engine and logs why. `--backend wgpu` uses whatever adapter wgpu offers, software included.

use burn::prelude::Device;
use thiserror::Error;

/// What the user asked for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// wgpu on a hardware adapter if there is one, else the native CPU engine.
    Auto,
    /// WebGPU via wgpu (Vulkan, Metal, DX12 or GL underneath).
    Wgpu,
    /// burn's pure-Rust CPU backend (`flex`).
    Cpu,
    /// diloco-node's own fused CPU kernels (no autodiff graph; the fastest CPU path).
    Native,
    /// burn's CUDA backend on the first NVIDIA GPU (a build with `--features cuda`).
    Cuda,
    /// burn's LibTorch backend on the CPU (a build with `--features torch`).
    Torch,
}

/// Errors selecting a device.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// wgpu was requested but no adapter could be initialised.
    #[error("--backend wgpu: no usable WebGPU adapter ({0}); install a Vulkan/Metal driver (on Debian without a GPU: apt-get install mesa-vulkan-drivers) or use --backend native (the CPU)")]
    NoAdapter(String),
    /// CUDA was requested from a build without it, or the device could not be started.
    #[error("--backend cuda: {0}")]
    Cuda(String),
    /// LibTorch was requested from a build without it.
    #[error("--backend torch: {0}")]
    Torch(String),
    /// The CPU thread pool could not be set up (it was already started, or the OS refused).
    #[error("--threads: cannot start the CPU thread pool ({0})")]
    Threads(String),
}

/// Sizes the CPU backend's thread pool (burn-flex and its matmuls run on rayon's global pool):
/// `0` keeps rayon's default (`RAYON_NUM_THREADS` if set, else one thread per core). Call once,
/// before any tensor work; returns the thread count.
pub fn set_threads(threads: usize) -> Result<usize, BackendError> {
    let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("cpu-kernel-{i}"));
    if threads > 0 {
        pool = pool.num_threads(threads);
    }
    pool.build_global()
        .map_err(|e| BackendError::Threads(e.to_string()))?;
    #[cfg(feature = "torch")]
    {
        // LibTorch's intra-op pool, sized like rayon's (one thread per core by default).
        let n = i32::try_from(rayon::current_num_threads()).unwrap_or(i32::MAX);
        tch::set_num_threads(n);
    }
    Ok(rayon::current_num_threads())
}

/// Tells glibc's allocator to keep freed tensor buffers instead of returning them to the OS.
///
/// Every tensor op of the CPU backend allocates its output; by default glibc serves buffers over
/// 128 KiB with a fresh `mmap` and unmaps them on free, so each step pays page faults and page
/// clearing for memory it just released (a large share of a `tiny` step; BENCHMARKS.md). Raising
/// the mmap threshold to its maximum (32 MiB) and the trim threshold keeps that memory in the
/// heap for reuse; peak RSS stays the same. No effect on other platforms or allocators.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The CPU backend's thread count in use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// What a replica computes on: a burn device, or the native CPU engine.
#[derive(Debug, Clone)]
pub enum Compute {
    /// A burn device without autodiff (replicas add it to train).
    Burn(Device),
    /// The native CPU engine ([`crate::train::native`]), on the rayon pool of `--threads`.
    Native,
}

/// The selected device and a description for logs.
#[derive(Debug, Clone)]
pub struct Selected {
    /// What replicas and evaluators run on.
    pub device: Compute,
    /// `native`, `cpu`, `wgpu`, `cuda` or `torch`.
    pub kind: &'static str,
    /// Adapter name and API, or the CPU engine and its threads.
    pub description: String,
}

/// Picks the device for `choice`.
pub fn select(choice: BackendChoice) -> Result<Selected, BackendError> {
    let cpu = || Selected {
        device: Compute::Burn(Device::flex()),
        kind: "cpu",
        description: format!("flex (CPU, {} threads)", threads()),
    };
    let native = || Selected {
        device: Compute::Native,
        kind: "native",
        description: format!("native CPU kernels ({} threads)", threads()),
    };
    match choice {
        BackendChoice::Cpu => Ok(cpu()),
        BackendChoice::Native => Ok(native()),
        BackendChoice::Cuda => init_cuda().map_err(BackendError::Cuda),
        BackendChoice::Torch => init_torch().map_err(BackendError::Torch),
        BackendChoice::Wgpu => init_wgpu().map(|(s, _)| s).map_err(BackendError::NoAdapter),
        BackendChoice::Auto => match init_wgpu() {
            Ok((s, false)) => {
                tracing::info!(adapter = %s.description, "backend auto: using wgpu");
                Ok(s)
            }
            Ok((s, true)) => {
                tracing::info!(
                    adapter = %s.description,
                    "backend auto: only a software WebGPU adapter found, using the native CPU engine (pass --backend wgpu to force it)"
                );
                Ok(native())
            }
            Err(e) => {
                tracing::info!(reason = %e, "backend auto: no WebGPU adapter, using the native CPU engine");
                Ok(native())
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn init_cuda() -> Result<Selected, String> {
    // Creating the first tensor starts the CUDA context; a missing driver panics inside cubecl.
    let device = Device::cuda(0);
    let probe = std::panic::catch_unwind(|| {
        burn::tensor::Tensor::<1>::from_floats([1.0f32], &device)
            .into_data()
            .to_vec::<f32>()
            .ok()
    });
    match probe {
        Ok(Some(v)) if v == [1.0] => Ok(Selected {
            device: Compute::Burn(device),
            kind: "cuda",
            description: "CUDA device 0".into(),
        }),
        _ => {
            Err("no usable CUDA device (is the NVIDIA driver installed and a GPU visible?)".into())
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn init_cuda() -> Result<Selected, String> {
    Err("this binary was built without CUDA: rebuild with \
         `cargo build --release -p diloco-node --features cuda`, or use --backend wgpu"
        .into())
}

#[cfg(feature = "torch")]
#[allow(deprecated)] // burn marks LibTorch deprecated in favour of CubeCL's CPU backend, which
                     // needs MLIR; LibTorch is the one with PyTorch's CPU kernels.
fn init_torch() -> Result<Selected, String> {
    Ok(Selected {
        device: Compute::Burn(Device::libtorch()),
        kind: "torch",
        description: format!("libtorch (CPU, {} threads)", tch::get_num_threads()),
    })
}

#[cfg(not(feature = "torch"))]
fn init_torch() -> Result<Selected, String> {
    Err("this binary was built without LibTorch: rebuild with \
         `cargo build --release -p diloco-node --features torch` and libtorch installed \
         (README, \"LibTorch backend\"), or use --backend native"
        .into())
}

/// Initialises wgpu; returns the device and whether its adapter is a software (CPU) one.
fn init_wgpu() -> Result<(Selected, bool), String> {
    // Adapter discovery can panic inside drivers; never let that take the node down.
    let result = std::panic::catch_unwind(|| Device::wgpu_options().init_with_setup());
    match result {
        Ok(Ok((device, setup))) => {
            let info = setup.adapter.get_info();
            let software = info.device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu;
            let description = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
            Ok((
                Selected {
                    device: Compute::Burn(device),
                    kind: "wgpu",
                    description,
                },
                software,
            ))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the wgpu driver panicked during adapter discovery".into()),
    }
}
