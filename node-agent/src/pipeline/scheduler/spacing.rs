//! Where a scheduler's steps fall: the inference timesteps of each spacing
//! and the noise levels (sigmas) that go with them. Each family of diffusers'
//! schedulers spaces its steps a little differently; these functions follow
//! each, rounding as numpy does (half to even).

use super::config::ScheduleConfig;

/// σ(t) = √((1 − ᾱ_t) / ᾱ_t) at every training timestep.
pub fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// The training sigmas linearly interpolated at a timestep that may fall
/// between two (numpy's `interp`, clamped at the ends).
pub fn sigma_at(sigmas: &[f64], t: f64) -> f64 {
    let last = sigmas.len() - 1;
    if t <= 0.0 {
        return sigmas[0];
    }
    if t >= last as f64 {
        return sigmas[last];
    }
    let lo = t.floor() as usize;
    let w = t - lo as f64;
    sigmas[lo] * (1.0 - w) + sigmas[lo + 1] * w
}

/// Descending timesteps for `steps` steps of the schedulers that take one
/// step per timestep (DDIM, Euler, Heun, LMS, PNDM). `linspace` keeps its
/// fractions (Euler-family schedulers interpolate sigmas there); DDIM and PNDM
/// round them.
pub fn single_step(cfg: &ScheduleConfig, steps: usize) -> Vec<f64> {
    let train = cfg.num_train_timesteps;
    let t = train as f64;
    let n = steps.clamp(1, train);
    match cfg.timestep_spacing.as_str() {
        "linspace" => (0..n)
            .rev()
            .map(|i| {
                if n == 1 {
                    0.0
                } else {
                    i as f64 * (t - 1.0) / (n - 1) as f64
                }
            })
            .collect(),
        "trailing" => trailing(t, n),
        _ => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| ((i * ratio + cfg.steps_offset).min(train - 1)) as f64)
                .collect()
        }
    }
}

/// Descending timesteps of the multistep solvers (DPM-Solver++, UniPC), which
/// divide the schedule into `steps + 1` parts and drop the last.
pub fn multistep(cfg: &ScheduleConfig, steps: usize) -> Vec<f64> {
    let train = cfg.num_train_timesteps;
    let t = train as f64;
    let n = steps.clamp(1, train);
    match cfg.timestep_spacing.as_str() {
        "linspace" => (1..=n)
            .rev()
            .map(|i| (i as f64 * (t - 1.0) / n as f64).round_ties_even())
            .collect(),
        "trailing" => trailing(t, n),
        _ => {
            let ratio = train / (n + 1);
            (1..=n)
                .rev()
                .map(|i| ((i * ratio + cfg.steps_offset).min(train - 1)) as f64)
                .collect()
        }
    }
}

/// `arange(T, 0, -T/n).round() - 1`.
fn trailing(t: f64, n: usize) -> Vec<f64> {
    let ratio = t / n as f64;
    (0..n)
        .map(|k| (t - k as f64 * ratio).round_ties_even() - 1.0)
        .filter(|v| *v >= 0.0)
        .collect()
}

/// `steps` noise levels from the largest training sigma to the smallest,
/// evenly spaced in σ^(1/ρ) with ρ = 7: denser at low noise, where the
/// details are made ("Karras sigmas").
pub fn karras(train: &[f64], steps: usize) -> Vec<f64> {
    let (min, max) = (train[0], train[train.len() - 1]);
    let rho = 7.0;
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// The (fractional) training timestep of a noise level: interpolated in
/// log σ between the two training timesteps around it.
pub fn sigma_to_t(train: &[f64], sigma: f64) -> f64 {
    let log = sigma.max(1e-10).ln();
    let logs: Vec<f64> = train.iter().map(|s| s.ln()).collect();
    let lo = logs
        .iter()
        .rposition(|l| log - l >= 0.0)
        .unwrap_or(0)
        .min(logs.len() - 2);
    let (low, high) = (logs[lo], logs[lo + 1]);
    let w = ((low - log) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * lo as f64 + w * (lo + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd(spacing: &str) -> ScheduleConfig {
        ScheduleConfig {
            timestep_spacing: spacing.into(),
            ..ScheduleConfig::default()
        }
    }

    #[test]
    fn single_step_spacings_match_diffusers() {
        assert_eq!(single_step(&sd("leading"), 4), [751.0, 501.0, 251.0, 1.0]);
        assert_eq!(
            single_step(&sd("trailing"), 4),
            [999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(single_step(&sd("linspace"), 4), [999.0, 666.0, 333.0, 0.0]);
        // Euler keeps linspace's fractions: np.linspace(0, 999, 5)[::-1].
        assert_eq!(
            single_step(&sd("linspace"), 5),
            [999.0, 749.25, 499.5, 249.75, 0.0]
        );
    }

    #[test]
    fn multistep_spacings_match_diffusers() {
        // DPMSolverMultistepScheduler(timestep_spacing=…).set_timesteps(4).
        assert_eq!(multistep(&sd("leading"), 4), [801.0, 601.0, 401.0, 201.0]);
        assert_eq!(multistep(&sd("linspace"), 4), [999.0, 749.0, 500.0, 250.0]);
        assert_eq!(multistep(&sd("trailing"), 4), [999.0, 749.0, 499.0, 249.0]);
    }

    #[test]
    fn karras_levels_run_from_the_largest_sigma_to_the_smallest_and_map_back_to_time() {
        let train = train_sigmas(&ScheduleConfig::default().alphas_cumprod());
        let k = karras(&train, 5);
        assert!((k[0] - train[999]).abs() < 1e-9 && (k[4] - train[0]).abs() < 1e-9);
        assert!(k.windows(2).all(|w| w[0] > w[1]));
        assert!((sigma_to_t(&train, train[500]) - 500.0).abs() < 1e-9);
        assert_eq!(sigma_to_t(&train, train[999] * 2.0), 999.0);
        assert_eq!(sigma_to_t(&train, 0.0), 0.0);
        let mid = sigma_to_t(&train, (train[10] * train[11]).sqrt());
        assert!((10.0..11.0).contains(&mid), "{mid}");
    }
}
