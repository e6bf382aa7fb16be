//! A model's `scheduler_config.json`: the training noise schedule, how
//! inference steps are spaced, and the scheduler the model names as its own.

use crate::pipeline::nets::ConfigError;
use modelcache_crds::{PredictionType, SchedulerKind};
use serde_json::Value;

/// The training noise schedule and how inference timesteps are spaced.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `scaled_linear` or `linear`.
    pub beta_schedule: String,
    pub prediction_type: PredictionType,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    /// The scheduler the model was made with (`_class_name`), used when a
    /// request names none.
    pub default_kind: SchedulerKind,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: "leading".into(),
            steps_offset: 1,
            set_alpha_to_one: false,
            default_kind: SchedulerKind::Ddim,
        }
    }
}

/// The scheduler a diffusers `_class_name` names; classes this agent does
/// not implement (DDPM, LCM…) run as DDIM on the same schedule.
pub fn kind_of_class(config: &Value) -> SchedulerKind {
    use SchedulerKind::*;
    match config["_class_name"].as_str().unwrap_or_default() {
        "EulerDiscreteScheduler" => Euler,
        "EulerAncestralDiscreteScheduler" => EulerAncestral,
        "HeunDiscreteScheduler" => Heun,
        "LMSDiscreteScheduler" => Lms,
        "PNDMScheduler" => Pndm,
        "DPMSolverMultistepScheduler" if config["use_karras_sigmas"] == true => DpmPlusPlus2MKarras,
        "DPMSolverMultistepScheduler" => DpmPlusPlus2M,
        "UniPCMultistepScheduler" => UniPc,
        _ => Ddim,
    }
}

impl ScheduleConfig {
    /// Reads a diffusers `scheduler_config.json`; missing keys keep SD
    /// defaults, and values no schedule can have are refused.
    pub fn from_json(v: &Value) -> std::result::Result<Self, ConfigError> {
        let d = ScheduleConfig::default();
        let c = ScheduleConfig {
            num_train_timesteps: v["num_train_timesteps"]
                .as_u64()
                .map_or(d.num_train_timesteps, |x| x as usize),
            beta_start: v["beta_start"].as_f64().unwrap_or(d.beta_start),
            beta_end: v["beta_end"].as_f64().unwrap_or(d.beta_end),
            beta_schedule: v["beta_schedule"]
                .as_str()
                .unwrap_or(&d.beta_schedule)
                .to_string(),
            prediction_type: match v["prediction_type"].as_str() {
                Some("v_prediction") => PredictionType::VPrediction,
                Some("sample") => PredictionType::Sample,
                _ => PredictionType::Epsilon,
            },
            timestep_spacing: v["timestep_spacing"]
                .as_str()
                .unwrap_or(&d.timestep_spacing)
                .to_string(),
            steps_offset: v["steps_offset"]
                .as_u64()
                .map_or(d.steps_offset, |x| x as usize),
            set_alpha_to_one: v["set_alpha_to_one"]
                .as_bool()
                .unwrap_or(d.set_alpha_to_one),
            default_kind: kind_of_class(v),
        };
        c.check()?;
        Ok(c)
    }

    /// The schedule is one diffusers defines: 1 to 100,000 training steps
    /// (each costs a float here), betas with 0 < start ≤ end < 1, a known beta
    /// schedule and timestep spacing, and an offset inside the schedule.
    fn check(&self) -> std::result::Result<(), ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            network: "scheduler",
            problem,
        };
        if !(1..=100_000).contains(&self.num_train_timesteps) {
            return Err(invalid(format!(
                "num_train_timesteps {} must be from 1 to 100000",
                self.num_train_timesteps
            )));
        }
        let (a, b) = (self.beta_start, self.beta_end);
        if !(a.is_finite() && b.is_finite() && 0.0 < a && a <= b && b < 1.0) {
            return Err(invalid(format!(
                "beta_start {a} and beta_end {b} must satisfy 0 < beta_start <= beta_end < 1"
            )));
        }
        if !matches!(self.beta_schedule.as_str(), "linear" | "scaled_linear") {
            return Err(ConfigError::Unsupported {
                network: "scheduler",
                feature: format!(
                    "beta_schedule {:?} (linear and scaled_linear are)",
                    self.beta_schedule
                ),
            });
        }
        if !matches!(
            self.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            return Err(ConfigError::Unsupported {
                network: "scheduler",
                feature: format!(
                    "timestep_spacing {:?} (leading, trailing and linspace are)",
                    self.timestep_spacing
                ),
            });
        }
        if self.steps_offset >= self.num_train_timesteps {
            return Err(invalid(format!(
                "steps_offset {} is outside the {} training steps",
                self.steps_offset, self.num_train_timesteps
            )));
        }
        Ok(())
    }

    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let lin = |a: f64, b: f64, i: usize| {
            if n == 1 {
                a
            } else {
                a + (b - a) * i as f64 / (n - 1) as f64
            }
        };
        let betas: Vec<f64> = match self.beta_schedule.as_str() {
            "linear" => (0..n)
                .map(|i| lin(self.beta_start, self.beta_end, i))
                .collect(),
            _ => (0..n)
                .map(|i| lin(self.beta_start.sqrt(), self.beta_end.sqrt(), i).powi(2))
                .collect(),
        };
        let mut acc = 1.0;
        betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> ScheduleConfig {
        ScheduleConfig::default()
    }

    #[test]
    fn impossible_schedules_are_refused_naming_the_field() {
        let parse = |v: serde_json::Value| ScheduleConfig::from_json(&v);
        assert_eq!(parse(serde_json::json!({})).unwrap(), sd());
        for (bad, field) in [
            (
                serde_json::json!({"num_train_timesteps": 0}),
                "num_train_timesteps",
            ),
            (
                serde_json::json!({"num_train_timesteps": 1u64 << 40}),
                "num_train_timesteps",
            ),
            (serde_json::json!({"beta_start": 0.0}), "beta_start"),
            (serde_json::json!({"beta_end": 1.5}), "beta_end"),
            (
                serde_json::json!({"beta_start": 0.5, "beta_end": 0.1}),
                "beta_start",
            ),
            (
                serde_json::json!({"beta_schedule": "squaredcos_cap_v2"}),
                "beta_schedule",
            ),
            (
                serde_json::json!({"timestep_spacing": "sideways"}),
                "timestep_spacing",
            ),
            (
                serde_json::json!({"num_train_timesteps": 10, "steps_offset": 10}),
                "steps_offset",
            ),
        ] {
            let e = parse(bad.clone()).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn scaled_linear_alphas() {
        // Independently (Python, plain floats): alpha_bar_0 = 1 - 0.00085 = 0.99915 and
        // alpha_bar_999 = 0.0046601 for the scaled-linear 0.00085..0.012 schedule.
        let ac = sd().alphas_cumprod();
        assert!((ac[0] - 0.99915).abs() < 1e-12);
        assert!((ac[999] - 0.0046601).abs() < 1e-6, "{}", ac[999]);
    }

    #[test]
    fn the_class_name_picks_the_default_scheduler() {
        let kind = |v: serde_json::Value| ScheduleConfig::from_json(&v).unwrap().default_kind;
        assert_eq!(kind(serde_json::json!({})), SchedulerKind::Ddim);
        assert_eq!(
            kind(serde_json::json!({"_class_name": "PNDMScheduler", "skip_prk_steps": true})),
            SchedulerKind::Pndm
        );
        assert_eq!(
            kind(serde_json::json!({"_class_name": "EulerDiscreteScheduler"})),
            SchedulerKind::Euler
        );
        assert_eq!(
            kind(
                serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true})
            ),
            SchedulerKind::DpmPlusPlus2MKarras
        );
        assert_eq!(
            kind(serde_json::json!({"_class_name": "UniPCMultistepScheduler"})),
            SchedulerKind::UniPc
        );
        assert_eq!(
            kind(serde_json::json!({"_class_name": "LCMScheduler"})),
            SchedulerKind::Ddim,
            "classes without an implementation run as DDIM"
        );
    }
}
