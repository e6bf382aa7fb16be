//! The compute device: the CPU, or in builds with the `cuda` feature
//! (`scripts/build-cuda.sh`) an NVIDIA GPU, whose name and memory come from
//! the driver. The device tier of the cache lives on it.

use candle_core::{DType, Device};
use modelcache_crds::Precision;

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

fn dtype_of(p: Precision) -> DType {
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

/// Opens `spec`: `cpu`, `cuda:N`, or `auto` (the first GPU when the build has
/// CUDA and a GPU answers, else the CPU).
pub fn open(spec: &str, precision: Precision) -> Result<ComputeDevice, String> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(cpu());
    }
    let ordinal = match spec.as_str() {
        "auto" => None,
        s => Some(
            s.strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| format!("device {s:?} must be auto, cpu or cuda:N"))?,
        ),
    };
    open_cuda(ordinal, precision)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: Option<usize>, precision: Precision) -> Result<ComputeDevice, String> {
    match Device::new_cuda(ordinal.unwrap_or(0)) {
        Ok(device) => {
            let n = ordinal.unwrap_or(0);
            let name = match &device {
                Device::Cuda(d) => d.cuda_stream().context().name().unwrap_or_default(),
                _ => String::new(),
            };
            Ok(ComputeDevice {
                device,
                dtype: dtype_of(precision),
                id: format!("cuda:{n}"),
                name,
            })
        }
        Err(_) if ordinal.is_none() => {
            tracing::warn!("no usable CUDA device; computing on the CPU");
            Ok(cpu())
        }
        Err(e) => Err(format!(
            "cuda:{}: {}",
            ordinal.unwrap_or(0),
            crate::store::error::candle_message(&e)
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: Option<usize>, _precision: Precision) -> Result<ComputeDevice, String> {
    let _ = dtype_of;
    match ordinal {
        None => Ok(cpu()),
        Some(n) => Err(format!(
            "cuda:{n}: this agent was built without CUDA; build it with scripts/build-cuda.sh"
        )),
    }
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
    fn specs() {
        let d = open("cpu", Precision::F16).unwrap();
        assert_eq!(
            (d.id.as_str(), d.dtype),
            ("cpu", DType::F32),
            "the CPU computes in F32"
        );
        assert!(open("tpu", Precision::F16)
            .unwrap_err()
            .contains("auto, cpu or cuda:N"));
        assert_eq!(d.budget(Some(5)), 5);
        #[cfg(not(feature = "cuda"))]
        {
            assert!(open("cuda:0", Precision::F16)
                .unwrap_err()
                .contains("scripts/build-cuda.sh"));
            assert_eq!(open("auto", Precision::F16).unwrap().id, "cpu");
            assert_eq!(d.budget(None), 4 << 30);
        }
    }
}
