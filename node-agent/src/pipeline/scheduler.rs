//! Denoising schedulers, configured from the model's `scheduler_config.json`,
//! following diffusers' formulas (DDIM, Euler ancestral, DPM-Solver++ 2M).
//! Sampling noise comes from the caller's seeded generator.

use super::nets::ConfigError;
use super::rng::NormalRng;
use candle_core::{Result, Tensor};
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
        }
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

    /// Inference timesteps, highest first.
    pub fn timesteps(&self, steps: usize) -> Vec<usize> {
        let t = self.num_train_timesteps;
        let steps = steps.clamp(1, t);
        match self.timestep_spacing.as_str() {
            "trailing" => {
                let ratio = t as f64 / steps as f64;
                (0..steps)
                    .map(|i| ((t as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                    .collect()
            }
            "linspace" => (0..steps)
                .map(|i| {
                    if steps == 1 {
                        0.0
                    } else {
                        i as f64 * (t - 1) as f64 / (steps - 1) as f64
                    }
                })
                .map(|x| x.round() as usize)
                .rev()
                .collect(),
            _ => {
                let ratio = t / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset).min(t - 1))
                    .collect()
            }
        }
    }
}

/// A scheduler for one generation.
pub struct Scheduler {
    kind: SchedulerKind,
    cfg: ScheduleConfig,
    ac: Vec<f64>,
    timesteps: Vec<usize>,
    /// Euler/DPM: sigma per step plus a final 0.
    sigmas: Vec<f64>,
    /// DPM++ 2M: the previous step's x0 prediction.
    prev_x0: Option<Tensor>,
}

impl Scheduler {
    pub fn new(kind: SchedulerKind, cfg: ScheduleConfig, steps: usize) -> Self {
        let ac = cfg.alphas_cumprod();
        let mut cfg = cfg;
        if kind == SchedulerKind::DpmPlusPlus2M && cfg.timestep_spacing == "leading" {
            // diffusers' DPMSolverMultistepScheduler defaults to linspace spacing.
            cfg.timestep_spacing = "linspace".into();
        }
        let timesteps = cfg.timesteps(steps);
        let sigma = |t: usize| ((1.0 - ac[t]) / ac[t]).sqrt();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| sigma(t)).collect();
        sigmas.push(0.0);
        Scheduler {
            kind,
            cfg,
            ac,
            timesteps,
            sigmas,
            prev_x0: None,
        }
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Factor for the initial noise.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            SchedulerKind::EulerAncestral => {
                let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
                if matches!(self.cfg.timestep_spacing.as_str(), "linspace" | "trailing") {
                    max
                } else {
                    (max * max + 1.0).sqrt()
                }
            }
            _ => 1.0,
        }
    }

    /// `x0` noised to the level of step `i` (diffusers' `add_noise`): how
    /// an edit's image enters the schedule, and how inpainting re-noises the
    /// part it keeps.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            SchedulerKind::EulerAncestral => x0 + (noise * self.sigmas[i])?,
            _ => {
                let a = self.ac[self.timesteps[i]];
                (x0 * a.sqrt())? + (noise * (1.0 - a).sqrt())?
            }
        }
    }

    /// Scales the UNet input at step `i`.
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            SchedulerKind::EulerAncestral => x / (self.sigmas[i].powi(2) + 1.0).sqrt(),
            _ => Ok(x.clone()),
        }
    }

    /// One denoising step from step index `i`.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut NormalRng,
    ) -> Result<Tensor> {
        match self.kind {
            SchedulerKind::Ddim => self.ddim(model_output, i, sample),
            SchedulerKind::EulerAncestral => self.euler_ancestral(model_output, i, sample, rng),
            SchedulerKind::DpmPlusPlus2M => self.dpmpp_2m(model_output, i, sample),
        }
    }

    /// x0 and epsilon predictions at training timestep `t`.
    fn predictions(&self, out: &Tensor, t: usize, sample: &Tensor) -> Result<(Tensor, Tensor)> {
        let a = self.ac[t];
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        Ok(match self.cfg.prediction_type {
            PredictionType::Epsilon => (((sample - (out * sb)?)? / sa)?, out.clone()),
            PredictionType::VPrediction => (
                ((sample * sa)? - (out * sb)?)?,
                ((out * sa)? + (sample * sb)?)?,
            ),
            PredictionType::Sample => (out.clone(), ((sample - (out * sa)?)? / sb)?),
        })
    }

    fn ddim(&self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[i];
        let step = self.cfg.num_train_timesteps / self.timesteps.len();
        let a_prev = match t.checked_sub(step) {
            Some(p) => self.ac[p],
            None if self.cfg.set_alpha_to_one => 1.0,
            None => self.ac[0],
        };
        let (x0, eps) = self.predictions(out, t, sample)?;
        // eta = 0: deterministic.
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }

    fn euler_ancestral(
        &self,
        out: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut NormalRng,
    ) -> Result<Tensor> {
        let (s_from, s_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = match self.cfg.prediction_type {
            PredictionType::Epsilon => (sample - (out * s_from)?)?,
            PredictionType::VPrediction => {
                ((out * (-s_from / (s_from * s_from + 1.0).sqrt()))?
                    + (sample / (s_from * s_from + 1.0))?)?
            }
            PredictionType::Sample => out.clone(),
        };
        let s_up = (s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
            .max(0.0)
            .sqrt();
        let s_down = (s_to * s_to - s_up * s_up).max(0.0).sqrt();
        let derivative = ((sample - &x0)? / s_from)?;
        let prev = (sample + (derivative * (s_down - s_from))?)?;
        let noise = rng
            .tensor(sample.dims(), sample.device())?
            .to_dtype(sample.dtype())?;
        prev + (noise * s_up)?
    }

    fn dpmpp_2m(&mut self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[i];
        let (x0, _) = self.predictions(out, t, sample)?;
        let alpha_sigma = |s: f64| {
            let alpha = 1.0 / (s * s + 1.0).sqrt();
            (alpha, s * alpha)
        };
        let (s_cur, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (alpha_t, sigma_t) = alpha_sigma(s_next);
        let (alpha_s, sigma_s) = alpha_sigma(s_cur);
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let lambda_s = lambda(alpha_s, sigma_s);
        let n = self.timesteps.len();
        let last = i + 1 == n;
        // Lower-order final step (diffusers' lower_order_final for < 15 steps), and the first step.
        let first_order = self.prev_x0.is_none() || (last && n < 15);
        let result = if s_next == 0.0 {
            x0.clone()
        } else {
            let h = lambda(alpha_t, sigma_t) - lambda_s;
            let base = ((sample * (sigma_t / sigma_s))? - (&x0 * (alpha_t * ((-h).exp() - 1.0)))?)?;
            match (&self.prev_x0, first_order) {
                (Some(prev), false) => {
                    let s_prev = self.sigmas[i - 1];
                    let (ap, sp) = alpha_sigma(s_prev);
                    let h0 = lambda_s - lambda(ap, sp);
                    let r0 = h0 / h;
                    let d1 = ((&x0 - prev)? * (1.0 / r0))?;
                    (base - (d1 * (0.5 * alpha_t * ((-h).exp() - 1.0)))?)?
                }
                _ => base,
            }
        };
        self.prev_x0 = Some(x0);
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
    fn leading_timesteps_with_offset() {
        assert_eq!(sd().timesteps(4), vec![751, 501, 251, 1]);
        let mut c = sd();
        c.timestep_spacing = "trailing".into();
        assert_eq!(c.timesteps(4), vec![999, 749, 499, 249]);
        c.timestep_spacing = "linspace".into();
        assert_eq!(c.timesteps(4), vec![999, 666, 333, 0]);
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
    fn ddim_step_matches_the_formula() {
        let dev = Device::Cpu;
        let mut s = Scheduler::new(SchedulerKind::Ddim, sd(), 4);
        let ac = sd().alphas_cumprod();
        let x = Tensor::new(&[1.0f32, -2.0], &dev).unwrap();
        let eps = Tensor::new(&[0.5f32, 0.25], &dev).unwrap();
        let out = s
            .step(&eps, 0, &x, &mut NormalRng::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (a, ap) = (ac[751], ac[501]);
        for (k, (xv, ev)) in [(1.0f64, 0.5f64), (-2.0, 0.25)].iter().enumerate() {
            let x0 = (xv - (1.0 - a).sqrt() * ev) / a.sqrt();
            let want = ap.sqrt() * x0 + (1.0 - ap).sqrt() * ev;
            assert!((out[k] as f64 - want).abs() < 1e-5, "{} vs {want}", out[k]);
        }
        // The last step goes to alpha_bar_0 (set_alpha_to_one = false).
        let last = s
            .step(&eps, 3, &x, &mut NormalRng::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (a, ap) = (ac[1], ac[0]);
        let x0 = (1.0 - (1.0 - a).sqrt() * 0.5) / a.sqrt();
        assert!((last[0] as f64 - (ap.sqrt() * x0 + (1.0 - ap).sqrt() * 0.5)).abs() < 1e-5);
    }

    #[test]
    fn euler_ancestral_is_seeded_and_scales_input() {
        let dev = Device::Cpu;
        let s = Scheduler::new(SchedulerKind::EulerAncestral, sd(), 4);
        let ac = sd().alphas_cumprod();
        let sigma0 = ((1.0 - ac[751]) / ac[751]).sqrt();
        assert!((s.init_noise_sigma() - (sigma0 * sigma0 + 1.0).sqrt()).abs() < 1e-9);
        let x = Tensor::new(&[2.0f32], &dev).unwrap();
        let scaled = s
            .scale_model_input(&x, 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        assert!((scaled - 2.0 / (sigma0 * sigma0 + 1.0).sqrt()).abs() < 1e-5);
        let run = || {
            let mut s = Scheduler::new(SchedulerKind::EulerAncestral, sd(), 4);
            s.step(&x, 0, &x, &mut NormalRng::new(7))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn dpmpp_2m_first_step_is_the_first_order_update_and_ends_at_x0() {
        let dev = Device::Cpu;
        let mut s = Scheduler::new(SchedulerKind::DpmPlusPlus2M, sd(), 4);
        assert_eq!(s.timesteps(), &[999, 666, 333, 0]);
        let ac = sd().alphas_cumprod();
        let x = Tensor::new(&[1.5f32], &dev).unwrap();
        let eps = Tensor::new(&[0.3f32], &dev).unwrap();
        let got = s
            .step(&eps, 0, &x, &mut NormalRng::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let (a_s, a_t) = (ac[999], ac[666]);
        let x0 = (1.5 - (1.0 - a_s).sqrt() * 0.3) / a_s.sqrt();
        let lam = |a: f64| 0.5 * (a / (1.0 - a)).ln();
        let h = lam(a_t) - lam(a_s);
        let want = ((1.0 - a_t) / (1.0 - a_s)).sqrt() * 1.5 - a_t.sqrt() * ((-h).exp() - 1.0) * x0;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        s.step(&eps, 1, &x, &mut NormalRng::new(0)).unwrap();
        s.step(&eps, 2, &x, &mut NormalRng::new(0)).unwrap();
        let end = s
            .step(&eps, 3, &x, &mut NormalRng::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let x0_last = (1.5 - (1.0 - ac[0]).sqrt() * 0.3) / ac[0].sqrt();
        assert!(
            (end - x0_last).abs() < 1e-4,
            "final step returns x0: {end} vs {x0_last}"
        );
    }
}
