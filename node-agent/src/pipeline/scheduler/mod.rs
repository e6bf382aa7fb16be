//! Denoising schedulers, configured from the model's `scheduler_config.json`
//! and following diffusers' formulas: DDIM, Euler, Euler ancestral, Heun,
//! LMS, PNDM (PLMS), DPM-Solver++ 2M (with or without Karras sigmas) and
//! UniPC. A scheduler is built for one image; the denoising loop asks it for
//! its timesteps, then calls [`Scheduler::step`] once per UNet evaluation.
//! Sampling noise comes from the caller's seeded generator.

pub mod config;
pub mod spacing;

pub use config::ScheduleConfig;

use super::rng::Noise;
use candle_core::{Result, Tensor};
use modelcache_crds::{PredictionType, SchedulerKind};

/// What a multistep scheduler remembers between steps.
#[derive(Default)]
struct History {
    /// DPM-Solver++ and UniPC: previous x0 predictions; PNDM: previous
    /// noise predictions; LMS: previous derivatives (newest last).
    outputs: Vec<Tensor>,
    /// Heun: the first-order derivative, its step size and the sample it
    /// started from, until the second evaluation of the step.
    heun: Option<(Tensor, f64, Tensor)>,
    /// PNDM: evaluations so far, and the sample its first step started from.
    counter: usize,
    pndm_sample: Option<Tensor>,
    /// UniPC: the sample before the last predictor step and that step's order.
    last_sample: Option<Tensor>,
    order: usize,
}

/// A scheduler for one generation.
pub struct Scheduler {
    kind: SchedulerKind,
    cfg: ScheduleConfig,
    ac: Vec<f64>,
    /// The steps asked for (a Heun step takes two evaluations, PNDM one more).
    steps: usize,
    /// The timestep of each UNet evaluation.
    timesteps: Vec<f64>,
    /// The noise level of each evaluation and a final one (0).
    sigmas: Vec<f64>,
    history: History,
}

impl Scheduler {
    pub fn new(kind: SchedulerKind, cfg: ScheduleConfig, steps: usize) -> Self {
        use SchedulerKind::*;
        let ac = cfg.alphas_cumprod();
        let train = spacing::train_sigmas(&ac);
        let (timesteps, mut sigmas): (Vec<f64>, Vec<f64>) = match kind {
            DpmPlusPlus2MKarras => {
                let sigmas = spacing::karras(&train, steps.max(1));
                let t = sigmas
                    .iter()
                    .map(|s| spacing::sigma_to_t(&train, *s).round_ties_even())
                    .collect();
                (t, sigmas)
            }
            DpmPlusPlus2M | UniPc => {
                let t = spacing::multistep(&cfg, steps);
                let s = t.iter().map(|t| spacing::sigma_at(&train, *t)).collect();
                (t, s)
            }
            Ddim | Pndm => {
                let mut t: Vec<f64> = spacing::single_step(&cfg, steps)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                if kind == Pndm && t.len() > 1 {
                    // PLMS evaluates its second timestep twice.
                    t.insert(1, t[1]);
                }
                let s = t.iter().map(|t| spacing::sigma_at(&train, *t)).collect();
                (t, s)
            }
            Euler | EulerAncestral | Heun | Lms => {
                let t = spacing::single_step(&cfg, steps);
                let s = t.iter().map(|t| spacing::sigma_at(&train, *t)).collect();
                (t, s)
            }
        };
        sigmas.push(0.0);
        let (timesteps, sigmas) = if kind == Heun {
            // Every step but the first is evaluated twice: the Euler step and its correction.
            let t = std::iter::once(timesteps[0])
                .chain(timesteps[1..].iter().flat_map(|t| [*t, *t]))
                .collect();
            let last = sigmas.len() - 1;
            let s = std::iter::once(sigmas[0])
                .chain(sigmas[1..last].iter().flat_map(|s| [*s, *s]))
                .chain([0.0])
                .collect();
            (t, s)
        } else {
            (timesteps, sigmas)
        };
        Scheduler {
            kind,
            cfg,
            ac,
            steps: steps.max(1),
            timesteps,
            sigmas,
            history: History::default(),
        }
    }

    /// The timestep the UNet sees at each evaluation.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// UNet evaluations per step (Heun: 2), to start an edit part-way.
    pub fn order(&self) -> usize {
        if self.kind == SchedulerKind::Heun {
            2
        } else {
            1
        }
    }

    /// Schedulers that work on `x0 + σ·noise` rather than the variance-preserving
    /// `√ᾱ·x0 + √(1−ᾱ)·noise`: their input is scaled, their noise is σ-sized.
    fn sigma_space(&self) -> bool {
        use SchedulerKind::*;
        matches!(self.kind, Euler | EulerAncestral | Heun | Lms)
    }

    /// Factor for the initial noise.
    pub fn init_noise_sigma(&self) -> f64 {
        if !self.sigma_space() {
            return 1.0;
        }
        let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
        if matches!(self.cfg.timestep_spacing.as_str(), "linspace" | "trailing") {
            max
        } else {
            (max * max + 1.0).sqrt()
        }
    }

    /// Scales the UNet input at evaluation `i`.
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        if self.sigma_space() {
            x / (self.sigmas[i].powi(2) + 1.0).sqrt()
        } else {
            Ok(x.clone())
        }
    }

    /// `x0` noised to the level of evaluation `i` (diffusers' `add_noise`):
    /// how an edit's image enters the schedule, and how inpainting re-noises
    /// the part it keeps.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        if self.sigma_space() {
            return x0 + (noise * sigma)?;
        }
        let (alpha, sigma_t) = match self.kind {
            SchedulerKind::Ddim | SchedulerKind::Pndm => {
                let a = self.ac[self.timesteps[i] as usize];
                (a.sqrt(), (1.0 - a).sqrt())
            }
            _ => alpha_sigma(sigma),
        };
        (x0 * alpha)? + (noise * sigma_t)?
    }

    /// One evaluation's update, from evaluation `i`.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut dyn Noise,
    ) -> Result<Tensor> {
        use SchedulerKind::*;
        match self.kind {
            Ddim => self.ddim(model_output, i, sample),
            Euler => self.euler(model_output, i, sample),
            EulerAncestral => self.euler_ancestral(model_output, i, sample, rng),
            Heun => self.heun(model_output, i, sample),
            Lms => self.lms(model_output, i, sample),
            Pndm => self.pndm(model_output, i, sample),
            DpmPlusPlus2M | DpmPlusPlus2MKarras => self.dpmpp_2m(model_output, i, sample),
            UniPc => self.unipc(model_output, i, sample),
        }
    }

    /// The clean latents the model predicts from `model_output` at
    /// evaluation `i` (diffusers' `pred_original_sample`): what a preview
    /// shows, since the sample itself is still mostly noise early on.
    pub fn denoised(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        use SchedulerKind::*;
        match self.kind {
            Euler | EulerAncestral | Heun | Lms => {
                self.x0_sigma(model_output, sample, self.sigmas[i])
            }
            Ddim | Pndm => Ok(self
                .predictions(model_output, self.timesteps[i] as usize, sample)?
                .0),
            DpmPlusPlus2M | DpmPlusPlus2MKarras | UniPc => {
                self.x0_vp(model_output, sample, self.sigmas[i])
            }
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

    /// The x0 prediction of a σ-space scheduler at noise level `sigma`.
    fn x0_sigma(&self, out: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        match self.cfg.prediction_type {
            PredictionType::Epsilon => sample - (out * sigma)?,
            PredictionType::VPrediction => {
                (out * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (sample / (sigma * sigma + 1.0))?
            }
            PredictionType::Sample => Ok(out.clone()),
        }
    }

    /// The x0 prediction of a variance-preserving multistep solver at noise level `sigma`.
    fn x0_vp(&self, out: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha, sigma_t) = alpha_sigma(sigma);
        match self.cfg.prediction_type {
            PredictionType::Epsilon => (sample - (out * sigma_t)?)? / alpha,
            PredictionType::VPrediction => (sample * alpha)? - (out * sigma_t)?,
            PredictionType::Sample => Ok(out.clone()),
        }
    }

    fn ddim(&self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let step = self.cfg.num_train_timesteps / self.steps;
        let a_prev = match t.checked_sub(step) {
            Some(p) => self.ac[p],
            None => self.final_alpha(),
        };
        let (x0, eps) = self.predictions(out, t, sample)?;
        // eta = 0: deterministic.
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }

    /// ᾱ after the last step.
    fn final_alpha(&self) -> f64 {
        if self.cfg.set_alpha_to_one {
            1.0
        } else {
            self.ac[0]
        }
    }

    fn euler(&self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = self.x0_sigma(out, sample, s)?;
        let derivative = ((sample - &x0)? / s)?;
        sample + (derivative * (s_next - s))?
    }

    fn euler_ancestral(
        &self,
        out: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut dyn Noise,
    ) -> Result<Tensor> {
        let (s_from, s_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = self.x0_sigma(out, sample, s_from)?;
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

    /// Heun: an Euler step, then (at the next evaluation, at the noise level
    /// it reached) the average of both slopes from the same start.
    fn heun(&mut self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        match self.history.heun.take() {
            None => {
                let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.x0_sigma(out, sample, s)?;
                let derivative = ((sample - &x0)? / s)?;
                let dt = s_next - s;
                let prev = (sample + (&derivative * dt)?)?;
                self.history.heun = Some((derivative, dt, sample.clone()));
                Ok(prev)
            }
            Some((first, dt, start)) => {
                let s = self.sigmas[i];
                let x0 = self.x0_sigma(out, sample, s)?;
                let second = ((sample - &x0)? / s)?;
                let derivative = ((first + second)? / 2.0)?;
                start + (derivative * dt)?
            }
        }
    }

    /// Linear multistep of order 4: the last derivatives weighted by the
    /// integrals of their Lagrange polynomials over the step.
    fn lms(&mut self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        const ORDER: usize = 4;
        let s = self.sigmas[i];
        let x0 = self.x0_sigma(out, sample, s)?;
        let d = &mut self.history.outputs;
        d.push(((sample - &x0)? / s)?);
        if d.len() > ORDER {
            d.remove(0);
        }
        let order = (i + 1).min(ORDER);
        let mut prev = sample.clone();
        for (k, derivative) in (0..order).zip(d.iter().rev()) {
            prev = (prev + (derivative * lms_coefficient(&self.sigmas, order, i, k))?)?;
        }
        Ok(prev)
    }

    /// PNDM's pseudo linear multistep (PLMS): Adams–Bashforth on the noise
    /// predictions, the first step taken twice to start it.
    fn pndm(&mut self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let ratio = (self.cfg.num_train_timesteps / self.steps) as i64;
        let last_t = self.cfg.num_train_timesteps as i64 - 1;
        let t = self.timesteps[i] as i64;
        let h = &mut self.history;
        let (t, prev_t) = if h.counter == 1 {
            ((t + ratio).min(last_t), t)
        } else {
            (t, t - ratio)
        };
        if h.counter != 1 {
            if h.outputs.len() > 3 {
                h.outputs.remove(0);
            }
            h.outputs.push(out.clone());
        }
        let e = &h.outputs;
        let n = e.len();
        let mut sample = sample.clone();
        // Combined model outputs; a v-prediction becomes noise only after.
        let combined = match (n, h.counter) {
            (1, 0) => {
                h.pndm_sample = Some(sample.clone());
                out.clone()
            }
            (1, 1) => {
                if let Some(start) = h.pndm_sample.take() {
                    sample = start;
                }
                ((out + &e[0])? / 2.0)?
            }
            (2, _) => (((&e[1] * 3.0)? - &e[0])? / 2.0)?,
            (3, _) => ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?,
            _ => {
                let sum = ((((&e[n - 1] * 55.0)? - (&e[n - 2] * 59.0)?)? + (&e[n - 3] * 37.0)?)?
                    - (&e[n - 4] * 9.0)?)?;
                (sum / 24.0)?
            }
        };
        h.counter += 1;
        let (_, eps) = self.predictions(&combined, t as usize, &sample)?;
        let a = self.ac[t as usize];
        let a_prev = if prev_t >= 0 {
            self.ac[prev_t as usize]
        } else {
            self.final_alpha()
        };
        let sample_coeff = (a_prev / a).sqrt();
        let denom = a * (1.0 - a_prev).sqrt() + (a * (1.0 - a) * a_prev).sqrt();
        (sample * sample_coeff)? - (eps * ((a_prev - a) / denom))?
    }

    fn dpmpp_2m(&mut self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (s_cur, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = self.x0_vp(out, sample, s_cur)?;
        let (alpha_t, sigma_t) = alpha_sigma(s_next);
        let (alpha_s, sigma_s) = alpha_sigma(s_cur);
        let lambda_s = lambda(alpha_s, sigma_s);
        let prev = self.history.outputs.last();
        // First order on the first step, and on the last (which ends at σ = 0).
        let result = if s_next == 0.0 {
            x0.clone()
        } else {
            let h = lambda(alpha_t, sigma_t) - lambda_s;
            let base = ((sample * (sigma_t / sigma_s))? - (&x0 * (alpha_t * ((-h).exp() - 1.0)))?)?;
            match prev {
                Some(prev) => {
                    let (ap, sp) = alpha_sigma(self.sigmas[i - 1]);
                    let r0 = (lambda_s - lambda(ap, sp)) / h;
                    let d1 = ((&x0 - prev)? * (1.0 / r0))?;
                    (base - (d1 * (0.5 * alpha_t * ((-h).exp() - 1.0)))?)?
                }
                None => base,
            }
        };
        self.history.outputs = vec![x0];
        Ok(result)
    }

    /// UniPC (order 2, B(h) = e^h − 1, predicting x0): the corrector refines
    /// the sample the last predictor made, using this evaluation's output,
    /// then the predictor steps on.
    fn unipc(&mut self, out: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let m_t = self.x0_vp(out, sample, self.sigmas[i])?;
        let mut sample = sample.clone();
        if let Some(last) = self.history.last_sample.take() {
            let h = &self.history;
            let m0 = &h.outputs[h.outputs.len() - 1];
            let older =
                (h.order == 2 && h.outputs.len() >= 2).then(|| &h.outputs[h.outputs.len() - 2]);
            let u = UniCoefficients::new(&self.sigmas, i, i - 1, h.order, older.map(|_| i - 2));
            let x_t_ = ((&last * u.sample)? - (m0 * u.model)?)?;
            let mut corr = ((&m_t - m0)? * u.rho_last)?;
            if let (Some(mi), Some((rk, rho))) = (older, u.rho_first) {
                corr = (corr + (((mi - m0)? / rk)? * rho)?)?;
            }
            sample = (x_t_ - (corr * u.scale)?)?;
        }
        let h = &mut self.history;
        h.outputs.push(m_t);
        if h.outputs.len() > 2 {
            h.outputs.remove(0);
        }
        let remaining = self.timesteps.len() - i;
        h.order = 2.min(remaining).min(h.outputs.len());
        h.last_sample = Some(sample.clone());
        let m0 = &h.outputs[h.outputs.len() - 1];
        let older = (h.order == 2).then(|| &h.outputs[0]);
        let u = UniCoefficients::new(&self.sigmas, i + 1, i, h.order, older.map(|_| i - 1));
        let x_t_ = ((&sample * u.sample)? - (m0 * u.model)?)?;
        match older {
            Some(mi) => {
                let (rk, _) = u.rho_first.unwrap_or((1.0, 0.0));
                let d1 = ((mi - m0)? / rk)?;
                // The predictor of order 2 weighs its one difference by ½.
                x_t_ - (d1 * (0.5 * u.scale))?
            }
            None => Ok(x_t_),
        }
    }
}

/// α_t and σ_t of a variance-preserving process at noise level σ.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

/// ∫ over [σ_i, σ_{i+1}] of the Lagrange basis polynomial of derivative `k`
/// (of `order`), exactly: 4-point Gauss–Legendre integrates polynomials up to
/// degree 7, and these have degree `order − 1 ≤ 3`.
fn lms_coefficient(sigmas: &[f64], order: usize, i: usize, k: usize) -> f64 {
    const NODES: [(f64, f64); 4] = [
        (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
        (-0.339_981_043_584_856_3, 0.652_145_154_862_546_2),
        (0.339_981_043_584_856_3, 0.652_145_154_862_546_2),
        (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
    ];
    let basis = |tau: f64| {
        (0..order)
            .filter(|&j| j != k)
            .map(|j| (tau - sigmas[i - j]) / (sigmas[i - k] - sigmas[i - j]))
            .product::<f64>()
    };
    let (a, b) = (sigmas[i], sigmas[i + 1]);
    let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
    NODES
        .iter()
        .map(|(x, w)| w * basis(mid + half * x))
        .sum::<f64>()
        * half
}

/// The scalars of one UniPC update from noise level `s0` to `t` (diffusers'
/// `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` with bh2).
struct UniCoefficients {
    /// σ_t / σ_s0, the sample's factor.
    sample: f64,
    /// α_t (e^{−h} − 1)… as `x_t = sample·x − model·m0 − scale·(…)`.
    model: f64,
    scale: f64,
    /// With an older output (order 2): r_k and the corrector's weight of its difference.
    rho_first: Option<(f64, f64)>,
    /// The corrector's weight of this evaluation's difference.
    rho_last: f64,
}

impl UniCoefficients {
    fn new(sigmas: &[f64], t: usize, s0: usize, order: usize, older: Option<usize>) -> Self {
        let (alpha_t, sigma_t) = alpha_sigma(sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(sigmas[s0]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        // b_k = h·φ_k(h)·k! / B(h), for k = 1, 2.
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut b = [0.0; 2];
        for (k, slot) in b.iter_mut().enumerate() {
            *slot = h_phi_k * factorial / b_h;
            factorial *= (k + 2) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let (rho_first, rho_last) = match (order, older) {
            (2, Some(si)) => {
                let (a_si, s_si) = alpha_sigma(sigmas[si]);
                let rk = (lambda(a_si, s_si) - lambda_s0) / h;
                // Solve [[1, 1], [rk, 1]] · ρ = b.
                let rho0 = (b[0] - b[1]) / (1.0 - rk);
                (Some((rk, rho0)), b[0] - rho0)
            }
            _ => (None, 0.5),
        };
        UniCoefficients {
            sample: sigma_t / sigma_s0,
            model: alpha_t * h_phi_1,
            scale: alpha_t * b_h,
            rho_first,
            rho_last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::rng::NormalRng;
    use candle_core::Device;

    fn sd() -> ScheduleConfig {
        ScheduleConfig::default()
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
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0]);
        let ac = sd().alphas_cumprod();
        let x = Tensor::new(&[1.5f32], &dev).unwrap();
        let eps = Tensor::new(&[0.3f32], &dev).unwrap();
        let got = s
            .step(&eps, 0, &x, &mut NormalRng::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let (a_s, a_t) = (ac[801], ac[601]);
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
        let x0_last = (1.5 - (1.0 - ac[201]).sqrt() * 0.3) / ac[201].sqrt();
        assert!(
            (end - x0_last).abs() < 1e-4,
            "final step returns x0: {end} vs {x0_last}"
        );
    }

    #[test]
    fn heun_evaluates_every_step_but_the_first_twice_and_pndm_its_second() {
        let heun = Scheduler::new(SchedulerKind::Heun, sd(), 4);
        assert_eq!(
            heun.timesteps(),
            &[751.0, 501.0, 501.0, 251.0, 251.0, 1.0, 1.0]
        );
        assert_eq!(heun.order(), 2);
        let pndm = Scheduler::new(SchedulerKind::Pndm, sd(), 4);
        assert_eq!(pndm.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
    }

    #[test]
    fn lms_of_order_one_is_euler_and_its_weights_sum_to_the_step() {
        let sigmas = [14.6, 4.1, 1.2, 0.3, 0.0];
        assert!((lms_coefficient(&sigmas, 1, 0, 0) - (4.1 - 14.6)).abs() < 1e-12);
        // The Lagrange basis sums to 1, so the weights sum to σ_{i+1} − σ_i.
        let sum: f64 = (0..4).map(|k| lms_coefficient(&sigmas, 4, 3, k)).sum();
        assert!((sum - (0.0 - 0.3)).abs() < 1e-12, "{sum}");
    }

    #[test]
    fn every_scheduler_denoises_a_perfect_prediction_to_the_image() {
        // A sample that is x0 plus a fixed noise, at any level, and a UNet
        // that predicts exactly that noise: every scheduler must end at x0.
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -0.25, 1.0], &dev).unwrap();
        let noise = Tensor::new(&[1.0f32, -1.0, 0.5], &dev).unwrap();
        let cfg = ScheduleConfig {
            set_alpha_to_one: true,
            ..sd()
        };
        for &kind in SchedulerKind::ALL {
            if kind == SchedulerKind::EulerAncestral {
                continue; // adds fresh noise on purpose
            }
            for steps in [1, 4, 7] {
                let mut s = Scheduler::new(kind, cfg.clone(), steps);
                let mut rng = NormalRng::new(1);
                let mut x = s.add_noise(&x0, &noise, 0).unwrap();
                for i in 0..s.timesteps().len() {
                    // What a preview shows is x0 at every evaluation.
                    let seen = s.denoised(&noise, i, &x).unwrap().to_vec1::<f32>().unwrap();
                    for (g, w) in seen.iter().zip(x0.to_vec1::<f32>().unwrap()) {
                        assert!((g - w).abs() < 1e-3, "{kind}, evaluation {i}: {seen:?}");
                    }
                    x = s.step(&noise, i, &x, &mut rng).unwrap();
                }
                let got = x.to_vec1::<f32>().unwrap();
                let want = x0.to_vec1::<f32>().unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "{kind}, {steps} steps: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }
}
