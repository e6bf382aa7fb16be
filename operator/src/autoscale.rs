//! How many replicas an autoscaled deployment should have: pure arithmetic
//! and stabilisation, no I/O.
//!
//! The recommendation is `ceil(load / targetInFlight)` clamped to
//! `[minReplicas, maxReplicas]`, where load is the requests in flight or
//! queued at the deployment's agents. Up is at once. Down follows the highest
//! recommendation of the last `scaleDownDelaySeconds` (the HPA's downscale
//! stabilisation window), so a dip between bursts does not unload a model
//! that the next burst needs again. A replica count that rose by anyone else
//! (the gateway scaling from zero, a person) counts as a recommendation when
//! it is seen, and so is held for the delay too; so is the count found at a
//! leader's first look, since its predecessor's history is gone.

use modelcache_crds::AutoscalingSpec;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// `ceil(load / target)` clamped to the spec's bounds.
pub fn recommend(spec: &AutoscalingSpec, load: f64) -> i32 {
    let target = f64::from(spec.target_in_flight.max(1));
    let raw = (load.max(0.0) / target).ceil();
    let raw = if raw > f64::from(i32::MAX) {
        i32::MAX
    } else {
        raw as i32
    };
    raw.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas))
}

#[derive(Debug, Default)]
struct History {
    /// Recommendations in the window, oldest first.
    recent: VecDeque<(Instant, i32)>,
    /// The replica count last seen.
    seen: Option<i32>,
}

/// The recommendations of the last window, per deployment.
#[derive(Debug, Default)]
pub struct Autoscaler {
    history: HashMap<String, History>,
}

/// One deployment's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What the load alone asks for now.
    pub recommended: i32,
    /// What `replicas` should be set to (equal to the current count: leave it).
    pub desired: i32,
}

impl Autoscaler {
    /// The decision for deployment `key` with `current` replicas and `load`
    /// requests in flight or queued.
    pub fn decide(
        &mut self,
        key: &str,
        spec: &AutoscalingSpec,
        load: f64,
        current: i32,
        now: Instant,
    ) -> Decision {
        let recommended = recommend(spec, load);
        let window = Duration::from_secs(u64::try_from(spec.scale_down_delay_seconds).unwrap_or(0));
        let h = self.history.entry(key.to_string()).or_default();
        if h.seen.is_none_or(|seen| current > seen) {
            h.recent.push_back((now, current));
        }
        h.seen = Some(current);
        h.recent.push_back((now, recommended));
        while h
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > window)
        {
            h.recent.pop_front();
        }
        let stabilised = h
            .recent
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommended);
        let desired = recommended
            .max(current.min(stabilised))
            .clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
        // The count this decision writes is what the next look should compare
        // with: a rise from it by anyone else is then held like the others.
        h.seen = Some(desired);
        Decision {
            recommended,
            desired,
        }
    }

    /// Forgets deployments that are gone or no longer autoscaled.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.history.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(min: i32, max: i32, target: i32, delay: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            enabled: true,
            min_replicas: min,
            max_replicas: max,
            target_in_flight: target,
            scale_down_delay_seconds: delay,
        }
    }

    #[test]
    fn the_recommendation_is_load_over_target_rounded_up_and_clamped() {
        let s = spec(0, 5, 2, 60);
        assert_eq!(recommend(&s, 0.0), 0);
        assert_eq!(recommend(&s, 1.0), 1);
        assert_eq!(recommend(&s, 4.0), 2);
        assert_eq!(recommend(&s, 5.0), 3);
        assert_eq!(recommend(&s, 1e12), 5);
        assert_eq!(recommend(&spec(2, 5, 2, 60), 0.0), 2);
        assert_eq!(recommend(&s, -1.0), 0);
    }

    #[test]
    fn up_is_at_once_and_down_only_after_the_delay_without_a_higher_recommendation() {
        let s = spec(0, 4, 1, 60);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // First look at 1 replica with no load: held for the delay.
        assert_eq!(a.decide("d", &s, 0.0, 1, at(0)).desired, 1);
        // A burst: up at once.
        assert_eq!(a.decide("d", &s, 3.0, 1, at(10)).desired, 3);
        // Quiet, but within 60 s of the burst's recommendation: stay.
        assert_eq!(a.decide("d", &s, 0.0, 3, at(20)).desired, 3);
        assert_eq!(a.decide("d", &s, 1.0, 3, at(69)).desired, 3);
        // 60 s after the burst the highest recent recommendation is 1.
        let d = a.decide("d", &s, 0.0, 3, at(71));
        assert_eq!(
            d,
            Decision {
                recommended: 0,
                desired: 1
            }
        );
        // And 60 s after that, zero.
        assert_eq!(a.decide("d", &s, 0.0, 1, at(130)).desired, 0);
    }

    #[test]
    fn a_scale_up_by_someone_else_is_held_for_the_delay() {
        let s = spec(0, 4, 2, 30);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        assert_eq!(a.decide("d", &s, 0.0, 0, t0).desired, 0);
        // The gateway raised replicas to 1 for a request at zero.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(a.decide("d", &s, 0.0, 1, later).desired, 1);
        assert_eq!(
            a.decide("d", &s, 0.0, 1, later + Duration::from_secs(29))
                .desired,
            1
        );
        assert_eq!(
            a.decide("d", &s, 0.0, 1, later + Duration::from_secs(31))
                .desired,
            0
        );
    }

    #[test]
    fn a_rise_by_someone_else_right_after_a_scale_down_is_held_too() {
        let s = spec(0, 4, 1, 10);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(a.decide("d", &s, 0.0, 1, at(0)).desired, 1);
        assert_eq!(a.decide("d", &s, 0.0, 1, at(11)).desired, 0);
        // The gateway raised it from the 0 just written to 1 for a new request.
        assert_eq!(a.decide("d", &s, 0.0, 1, at(12)).desired, 1);
        assert_eq!(a.decide("d", &s, 0.0, 1, at(21)).desired, 1);
    }

    #[test]
    fn counts_outside_the_bounds_are_brought_inside_at_once() {
        let s = spec(2, 3, 1, 600);
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        assert_eq!(a.decide("d", &s, 0.0, 0, t0).desired, 2);
        assert_eq!(a.decide("e", &s, 0.0, 9, t0).desired, 3);
    }

    proptest! {
        /// Whatever the load sequence, the decision stays within the bounds,
        /// never falls below the recommendation, and never goes down while a
        /// recommendation at least as high as the current count is in the window.
        #[test]
        fn decisions_stay_in_bounds_and_never_undercut_the_window(
            loads in proptest::collection::vec(0u32..40, 1..60),
            min in 0i32..3, extra in 0i32..5, target in 1i32..5, delay in 0i32..30,
        ) {
            let s = spec(min, min + extra.max(1), target, delay);
            let mut a = Autoscaler::default();
            let t0 = Instant::now();
            let mut current = min;
            let mut recs: Vec<(u64, i32)> = vec![(0, current)];
            for (i, load) in loads.iter().enumerate() {
                let now = t0 + Duration::from_secs(i as u64 * 5);
                let d = a.decide("d", &s, f64::from(*load), current, now);
                prop_assert!(d.desired >= s.min_replicas && d.desired <= s.max_replicas);
                prop_assert!(d.desired >= d.recommended);
                recs.push((i as u64 * 5, d.recommended));
                let in_window = recs.iter().filter(|(t, _)| i as u64 * 5 - t <= delay as u64).map(|(_, r)| *r).max().unwrap();
                if d.desired < current {
                    prop_assert!(in_window < current);
                }
                if d.desired > current { recs.push((i as u64 * 5, d.desired)); }
                current = d.desired;
            }
        }
    }
}
