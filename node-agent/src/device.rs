//! The compute device: the CPU, or in builds with the `cuda` feature
//! (`scripts/build-cuda.sh`) an NVIDIA GPU, whose name and memory come from
//! the driver. The device tier of the cache lives on it.

use candle_core::{DType, Device};
use modelcache_crds::Precision;

/// Why a `--device` value cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?} must be auto, cpu, cuda:N or a list of cuda:N")]
    Spec(String),
    #[error("cuda:{0} is listed twice")]
    Twice(usize),
    #[error("cuda:{0}: this agent was built without CUDA; build it with scripts/build-cuda.sh")]
    NoCuda(usize),
    #[error("cuda:{ordinal}: {message}")]
    Cuda { ordinal: usize, message: String },
}

/// The device the agent computes on.
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    pub device: Device,
    /// Compute dtype: the requested precision on a GPU, F32 on the CPU.
    pub dtype: DType,
    /// `cpu` or `cuda:N`, as ModelNode status reports it.
    pub id: String,
    pub name: String,
}

/// The candle dtype of a precision.
pub fn dtype_of(p: Precision) -> DType {
    match p {
        Precision::F16 => DType::F16,
        Precision::BF16 => DType::BF16,
        Precision::F32 => DType::F32,
    }
}

fn cpu() -> ComputeDevice {
    ComputeDevice {
        device: Device::Cpu,
        dtype: DType::F32,
        id: "cpu".into(),
        name: "CPU".into(),
    }
}

/// Opens the devices `spec` names: `cpu`, `cuda:N`, a comma-separated list
/// of `cuda:N`, or `auto` (every GPU when the build has CUDA and the driver
/// reports any, else the CPU). Each device gets its own cache tier.
pub fn open(spec: &str, precision: Precision) -> Result<Vec<ComputeDevice>, DeviceError> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(vec![cpu()]),
        "auto" => match gpu_count() {
            0 => Ok(vec![cpu()]),
            n => (0..n).map(|i| open_cuda(i, precision)).collect(),
        },
        list => {
            let mut ordinals: Vec<usize> = Vec::new();
            for s in list.split(',').map(str::trim) {
                let n = s
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| DeviceError::Spec(s.to_string()))?;
                if ordinals.contains(&n) {
                    return Err(DeviceError::Twice(n));
                }
                ordinals.push(n);
            }
            ordinals
                .into_iter()
                .map(|n| open_cuda(n, precision))
                .collect()
        }
    }
}

/// GPUs the driver reports; 0 without CUDA, a driver or a GPU.
#[cfg(feature = "cuda")]
fn gpu_count() -> usize {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => {
            tracing::warn!(error = %e, "no usable CUDA driver; computing on the CPU");
            0
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_count() -> usize {
    0
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, precision: Precision) -> Result<ComputeDevice, DeviceError> {
    let device = Device::new_cuda(n).map_err(|e| DeviceError::Cuda {
        ordinal: n,
        message: crate::store::error::candle_message(&e),
    })?;
    Ok(ComputeDevice {
        name: name(&device),
        device,
        dtype: dtype_of(precision),
        id: format!("cuda:{n}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize, _precision: Precision) -> Result<ComputeDevice, DeviceError> {
    let _ = dtype_of;
    Err(DeviceError::NoCuda(n))
}

/// (free, total) bytes of a GPU's memory from the driver; `None` on the CPU.
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// (free, total) bytes of a device's memory: a GPU's from its driver, the
/// CPU's from /proc/meminfo (MemAvailable, MemTotal; 0 when unreadable).
pub fn memory_or_host(device: &Device) -> (u64, u64) {
    memory(device).unwrap_or_else(|| {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        (field("MemAvailable:"), field("MemTotal:"))
    })
}

/// The one-way bandwidth (bytes/s) of the PCIe link a GPU sits on, from the
/// link speed and width the device reports in sysfs; `None` on the CPU or
/// where sysfs does not show the device.
pub fn pcie_bandwidth(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
        let stream = d.cuda_stream();
        let attr = |a| stream.context().attribute(a).ok();
        let address = format!(
            "{:04x}:{:02x}:{:02x}.0",
            attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
            attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
            attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
        );
        let dir = std::path::Path::new("/sys/bus/pci/devices").join(address);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        return link_bandwidth(&read("current_link_speed")?, &read("current_link_width")?);
    }
    let _ = device;
    None
}

/// A PCIe link's one-way bandwidth in bytes/s from sysfs's `current_link_speed`
/// (`16.0 GT/s PCIe`) and `current_link_width` (`16`), after line encoding:
/// 8b/10b up to 5 GT/s (PCIe 1–2), 128b/130b up to 32 GT/s (PCIe 3–5), and
/// PCIe 6's FLIT mode (242 of 256 bytes) above.
pub fn link_bandwidth(speed: &str, width: &str) -> Option<f64> {
    let gts: f64 = speed.split_whitespace().next()?.parse().ok()?;
    let lanes: f64 = width.trim().parse().ok()?;
    let efficiency = if gts <= 5.0 {
        0.8
    } else if gts <= 32.0 {
        128.0 / 130.0
    } else {
        242.0 / 256.0
    };
    (gts > 0.0 && lanes > 0.0).then(|| gts * 1e9 * efficiency * lanes / 8.0)
}

/// The GPU's name from its driver (`NVIDIA H200`), or `CPU`.
pub fn name(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| id(device));
    }
    match device {
        Device::Cpu => "CPU".into(),
        other => id(other),
    }
}

/// `cpu` or `cuda:N`.
pub fn id(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        candle_core::DeviceLocation::Cpu => "cpu".into(),
    }
}

impl ComputeDevice {
    /// (free, total) bytes of the GPU's memory from the driver; `None` on the CPU.
    pub fn memory(&self) -> Option<(u64, u64)> {
        memory(&self.device)
    }

    /// The device tier's budget: `configured`, or on a GPU 90% of the memory
    /// free when the agent starts (the rest is left for activations), or 4 GiB
    /// on the CPU (a second copy in RAM).
    pub fn budget(&self, configured: Option<u64>) -> u64 {
        configured.unwrap_or_else(|| match self.memory() {
            Some((free, _)) => free / 10 * 9,
            None => 4 << 30,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcie_links() {
        let gb = |s, w| link_bandwidth(s, w).map(|b| (b / 1e8).round() / 10.0);
        assert_eq!(gb("16.0 GT/s PCIe\n", "16\n"), Some(31.5), "Gen4 x16");
        assert_eq!(gb("32.0 GT/s PCIe", "16"), Some(63.0), "Gen5 x16");
        assert_eq!(gb("8.0 GT/s PCIe", "8"), Some(7.9), "Gen3 x8");
        assert_eq!(gb("2.5 GT/s", "1"), Some(0.3), "Gen1 x1");
        assert_eq!(gb("Unknown", "16"), None);
        assert_eq!(gb("16.0 GT/s PCIe", "0"), None);
        assert_eq!(pcie_bandwidth(&Device::Cpu), None);
    }

    #[test]
    fn specs() {
        let d = open("cpu", Precision::F16).unwrap().remove(0);
        assert_eq!(
            (d.id.as_str(), d.dtype),
            ("cpu", DType::F32),
            "the CPU computes in F32"
        );
        assert!(open("tpu", Precision::F16)
            .unwrap_err()
            .to_string()
            .contains("auto, cpu, cuda:N"));
        assert_eq!(
            open("cuda:0,cuda:0", Precision::F16).unwrap_err(),
            DeviceError::Twice(0)
        );
        assert_eq!(d.budget(Some(5)), 5);
        #[cfg(not(feature = "cuda"))]
        {
            assert!(open("cuda:0", Precision::F16)
                .unwrap_err()
                .to_string()
                .contains("scripts/build-cuda.sh"));
            assert_eq!(
                open("cuda:0,cuda:1", Precision::F16).unwrap_err(),
                DeviceError::NoCuda(0)
            );
            let auto = open("auto", Precision::F16).unwrap();
            assert_eq!((auto.len(), auto[0].id.as_str()), (1, "cpu"));
            assert_eq!(d.budget(None), 4 << 30);
        }
    }
}
