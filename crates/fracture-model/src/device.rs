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

/// Which device to compute on, as `--device` names it: `auto`, `cpu`, `cuda`, `cuda:N`, `metal`,
/// `metal:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU of the backend this binary was built with, else the CPU (see [`device`]).
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA GPU with this index (needs the `cuda` feature).
    Cuda(usize),
    /// The Metal GPU with this index (needs the `metal` feature).
    Metal(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let index = |rest: &str| -> std::result::Result<usize, String> {
            match rest {
                "" => Ok(0),
                r => r.strip_prefix(':').and_then(|n| n.parse().ok()).ok_or_else(|| {
                    format!("`{s}`: the device index after `:` must be a number, e.g. cuda:1")
                }),
            }
        };
        match s.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            _ if s.starts_with("cuda") => Ok(DeviceChoice::Cuda(index(&s[4..])?)),
            _ if s.starts_with("metal") => Ok(DeviceChoice::Metal(index(&s[5..])?)),
            _ => Err(format!("`{s}` is not a device: auto, cpu, cuda[:N] or metal[:N]")),
        }
    }
}

impl DeviceChoice {
    /// Opens the device: [`crate::Error::DeviceNotBuilt`] when this binary lacks the backend's
    /// feature, [`crate::Error::DeviceUnavailable`] when the backend cannot open it (no such GPU, no
    /// driver).
    pub fn open(self) -> crate::Result<Device> {
        let unavailable = |name: String, e: candle_core::Error| crate::Error::DeviceUnavailable {
            device: name,
            reason: e.to_string(),
        };
        match self {
            DeviceChoice::Auto => device(false).map_err(|e| unavailable("the default GPU".into(), e)),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    return Err(crate::Error::DeviceNotBuilt { backend: "cuda" });
                }
                Device::new_cuda(i).map_err(|e| unavailable(format!("cuda:{i}"), e))
            }
            DeviceChoice::Metal(i) => {
                if !cfg!(feature = "metal") {
                    return Err(crate::Error::DeviceNotBuilt { backend: "metal" });
                }
                Device::new_metal(i).map_err(|e| unavailable(format!("metal:{i}"), e))
            }
        }
    }
}

/// A short description of a device for logs: `cpu`, `cuda:0` or `metal:0`.
pub fn describe_device(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// What `--precision bf16` means on `device`: `None` on the CPU (where the BF16 kernels run), else a
/// sentence saying that the products there are candle's, in FP32.
pub fn bf16_device_note(device: &Device) -> Option<String> {
    (!device.is_cpu()).then(|| {
        format!(
            "precision bf16: the BF16 products are CPU kernels; on {} the matrix products are candle's, in FP32",
            describe_device(device)
        )
    })
}

/// The precision `--precision auto` stands for on `device`, with one sentence saying why: FP32 off
/// the CPU (the BF16 products are CPU kernels), else [`fracture_kernels::auto_precision`] (BF16 on
/// AMX, or on AVX-512 BF16 measured faster than FP32; FP32 elsewhere).
pub fn auto_precision(device: &Device) -> (crate::Precision, String) {
    if device.is_cpu() {
        let auto = fracture_kernels::auto_precision();
        (auto.precision, auto.reason.clone())
    } else {
        (
            crate::Precision::Fp32,
            format!(
                "on {} the matrix products are candle's, in FP32",
                describe_device(device)
            ),
        )
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
    fn device_names_parse_and_bad_ones_are_explained() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!("metal:1".parse(), Ok(DeviceChoice::Metal(1)));
        assert!(
            "cuda:x"
                .parse::<DeviceChoice>()
                .unwrap_err()
                .contains("must be a number")
        );
        assert!(
            "tpu"
                .parse::<DeviceChoice>()
                .unwrap_err()
                .contains("auto, cpu, cuda[:N] or metal[:N]")
        );
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn a_backend_this_build_lacks_is_named() {
        if !cfg!(feature = "cuda") {
            let e = DeviceChoice::Cuda(0).open().unwrap_err();
            assert!(
                matches!(e, crate::Error::DeviceNotBuilt { backend: "cuda" }),
                "{e}"
            );
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "metal") {
            let e = DeviceChoice::Metal(0).open().unwrap_err();
            assert!(
                matches!(e, crate::Error::DeviceNotBuilt { backend: "metal" }),
                "{e}"
            );
        }
    }

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
