//! Choosing the compute device: WebGPU through burn-wgpu, or burn's pure-Rust CPU backend
//! (`flex`).
//!
//! `auto` uses wgpu when it finds a hardware adapter and says which; a software-only adapter
//! (Mesa's lavapipe/llvmpipe) is slower than the CPU backend, so `auto` then falls back to
//! `cpu` and logs why. `--backend wgpu` uses whatever adapter wgpu offers, software included.

use burn::prelude::Device;
use thiserror::Error;

/// What the user asked for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// wgpu on a hardware adapter if there is one, else the CPU backend.
    Auto,
    /// WebGPU via wgpu (Vulkan, Metal, DX12 or GL underneath).
    Wgpu,
    /// burn's pure-Rust CPU backend (`flex`).
    Cpu,
}

/// Errors selecting a device.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// wgpu was requested but no adapter could be initialised.
    #[error("--backend wgpu: no usable WebGPU adapter ({0}); install a Vulkan/Metal driver (on Debian without a GPU: apt-get install mesa-vulkan-drivers) or use --backend cpu")]
    NoAdapter(String),
}

/// The selected device and a description for logs.
#[derive(Debug, Clone)]
pub struct Selected {
    /// Device without autodiff (wrap with `.autodiff()` to train).
    pub device: Device,
    /// `cpu` or `wgpu`.
    pub kind: &'static str,
    /// Adapter name and API, or "flex (CPU)".
    pub description: String,
}

/// Picks the device for `choice`.
pub fn select(choice: BackendChoice) -> Result<Selected, BackendError> {
    let cpu = || Selected {
        device: Device::flex(),
        kind: "cpu",
        description: "flex (CPU)".into(),
    };
    match choice {
        BackendChoice::Cpu => Ok(cpu()),
        BackendChoice::Wgpu => init_wgpu().map(|(s, _)| s).map_err(BackendError::NoAdapter),
        BackendChoice::Auto => match init_wgpu() {
            Ok((s, false)) => {
                tracing::info!(adapter = %s.description, "backend auto: using wgpu");
                Ok(s)
            }
            Ok((s, true)) => {
                tracing::info!(
                    adapter = %s.description,
                    "backend auto: only a software WebGPU adapter found, using the CPU backend (pass --backend wgpu to force it)"
                );
                Ok(cpu())
            }
            Err(e) => {
                tracing::info!(reason = %e, "backend auto: no WebGPU adapter, using the CPU backend");
                Ok(cpu())
            }
        },
    }
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
                    device,
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
