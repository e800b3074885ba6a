//! Choosing the compute device. The only module with backend `#[cfg(feature = ...)]` code.

use candle_core::Device;

/// The device to compute on: the first CUDA GPU in a `cuda` build, the first Metal GPU in a `metal`
/// build, otherwise (or with `force_cpu`) the CPU.
///
/// Availability is decided at compile time, so a `cuda` build on a machine without a usable GPU
/// returns candle's error here; callers show it and suggest the CPU override.
pub fn device(force_cpu: bool) -> candle_core::Result<Device> {
    if force_cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        return Device::new_cuda(0);
    }
    #[cfg(all(feature = "metal", not(feature = "cuda")))]
    {
        return Device::new_metal(0);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// A short description of a device for logs: `cpu`, `cuda:0` or `metal:0`.
pub fn describe_device(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The GPU backends compiled into this build, e.g. `["cuda"]`; empty for a CPU-only build.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut out = Vec::new();
    if cfg!(feature = "cuda") {
        out.push("cuda");
    }
    if cfg!(feature = "cudnn") {
        out.push("cudnn");
    }
    if cfg!(feature = "metal") {
        out.push("metal");
    }
    if cfg!(feature = "mkl") {
        out.push("mkl");
    }
    if cfg!(feature = "accelerate") {
        out.push("accelerate");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_cpu_is_cpu() {
        let dev = device(true).unwrap();
        assert!(dev.is_cpu());
        assert_eq!(describe_device(&dev), "cpu");
    }

    #[test]
    fn default_build_computes_on_the_cpu() {
        if compiled_backends().iter().any(|b| *b == "cuda" || *b == "metal") {
            return;
        }
        assert!(device(false).unwrap().is_cpu());
    }
}
