//! The SD 2.x code paths (GELU text encoder, linear transformer projections,
//! per-block head counts, v-prediction) end to end on a tiny random pipeline.
//! There is no diffusers reference for SD 2.x here (it needs PyTorch), so this
//! checks behaviour, not parity: probing, determinism, valid images.

use modelcache_agent::cache::{CacheConfig, DiskLoader, ModelCache};
use modelcache_agent::demo::{write_tiny, Tiny};
use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams};
use modelcache_crds::{BaseModel, PredictionType, SchedulerKind};

#[test]
fn tiny_sd2_probes_as_sd2_and_generates_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = write_tiny(dir.path(), "sd2", Tiny::Sd2).unwrap();
    let probe = modelcache_agent::store::probe(&model_dir).unwrap();
    assert_eq!(
        (probe.base, probe.prediction_type),
        (Some(BaseModel::Sd2), Some(PredictionType::VPrediction))
    );
    assert!(
        probe.evidence.iter().any(|e| e.contains("linear proj_in")),
        "{:?}",
        probe.evidence
    );
    let config = CacheConfig::cpu(64 << 20, 64 << 20);
    let cache = ModelCache::new(config, Box::new(DiskLoader), None);
    let model = DiffusersModel::open(&model_dir).unwrap();
    for scheduler in [
        SchedulerKind::Ddim,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2M,
    ] {
        let p = GenerateParams {
            prompt: "a red cat".into(),
            steps: 3,
            width: 64,
            height: 64,
            seed: 4,
            scheduler,
            clip_skip: 1,
            ..Default::default()
        };
        let a = pipeline::generate(&cache, &model, &p, &|_, _, _| true).unwrap();
        let b = pipeline::generate(&cache, &model, &p, &|_, _, _| true).unwrap();
        assert_eq!(a, b, "{scheduler}");
        assert!(a[0]
            .data
            .iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        assert_eq!((a[0].width, a[0].height), (64, 64));
    }
}
