//! Batching: requests that share a model and settings run as one denoising
//! batch, and every image in it is the image its request makes alone.

use modelcache_agent::cache::{CacheConfig, DiskLoader, ModelCache};
use modelcache_agent::demo::{write_tiny, Tiny};
use modelcache_agent::pipeline::{
    self, DiffusersModel, GenerateParams, Member, PipelineError, Previews, Stage,
};
use modelcache_crds::SchedulerKind;
use std::sync::Mutex;

fn request(prompt: &str, seed: u64, n: usize, scheduler: SchedulerKind) -> GenerateParams {
    GenerateParams {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        steps: 4,
        width: 64,
        height: 64,
        seed,
        n,
        scheduler: Some(scheduler),
        ..Default::default()
    }
}

fn roomy_cache() -> ModelCache {
    ModelCache::new(
        CacheConfig::cpu(1 << 30, 1 << 30),
        Box::new(DiskLoader),
        None,
    )
}

/// Counts the denoising steps a request is told about.
struct Steps(Mutex<Vec<usize>>);

impl Steps {
    fn new() -> Self {
        Steps(Mutex::new(Vec::new()))
    }
    fn progress(&self) -> impl Fn(Stage) -> bool + Sync + '_ {
        |s| {
            if let Stage::Denoising { step, .. } = s {
                self.0.lock().unwrap().push(step);
            }
            true
        }
    }
}

/// On the diffusers fixtures (whose float32 runs stay within 1e-4 of
/// float64, so rounding is not amplified past recognition), SD 1.x and SDXL
/// (pooled embeddings and time ids batched too): a batch of three requests,
/// one of two images, with ancestral sampling (each image's own noise at
/// every step). On the CPU every image of a batch is the same bits as the
/// image run alone: each kernel computes a sample the same way whatever the
/// batch (the linear layers one product per sample, `nets::linear`).
#[test]
fn a_batched_image_is_the_image_its_request_makes_alone() {
    for fixture in ["tiny-sd1", "tiny-sdxl"] {
        let model = DiffusersModel::open(&crate::common::fixtures().join(fixture)).unwrap();
        let scheduler = SchedulerKind::EulerAncestral;
        let requests = [
            request("a red cat", 3, 1, scheduler),
            request("a blue house by the sea", 11, 2, scheduler),
            request("", 7, 1, scheduler),
        ];
        let cache = roomy_cache();
        let alone: Vec<Vec<pipeline::Image>> = requests
            .iter()
            .map(|p| pipeline::generate(&cache, &model, p, &|_| true).unwrap())
            .collect();
        let told: Vec<Steps> = requests.iter().map(|_| Steps::new()).collect();
        let progress: Vec<_> = told.iter().map(|t| t.progress()).collect();
        let members: Vec<Member> = requests
            .iter()
            .zip(&progress)
            .map(|(p, f)| Member {
                params: p,
                progress: f,
                previews: None,
            })
            .collect();
        let batched = pipeline::generate_batch(&cache, &model, &members, 8).unwrap();
        for (r, (b, a)) in batched.iter().zip(&alone).enumerate() {
            let b = b.as_ref().unwrap();
            assert_eq!(b.len(), a.len());
            for (bi, ai) in b.iter().zip(a) {
                assert!(bi.data == ai.data, "{fixture} request {r}");
            }
        }
        // One batch: each request hears the four steps once.
        for t in &told {
            assert_eq!(*t.0.lock().unwrap(), [1, 2, 3, 4]);
        }
    }
}

#[test]
fn a_batch_needing_more_room_than_the_tier_has_runs_in_smaller_batches() {
    let model_dir = crate::common::fixtures().join("tiny-sd1");
    let model = DiffusersModel::open(&model_dir).unwrap();
    let p = request("a red cat", 5, 3, SchedulerKind::Ddim);
    let alone = pipeline::generate(&roomy_cache(), &model, &p, &|_| true).unwrap();
    // A device tier with room for the UNet and half an image's activations
    // beside it: every image runs in a batch of its own.
    let unet = std::fs::metadata(model_dir.join("unet/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .len();
    let per_image = pipeline::batch::activation_bytes(&model, &p, candle_core::DType::F32);
    let budget = unet + per_image / 2;
    let tight = ModelCache::new(
        CacheConfig::cpu(1 << 30, budget),
        Box::new(DiskLoader),
        None,
    );
    let told = Steps::new();
    let images = pipeline::generate(&tight, &model, &p, &told.progress()).unwrap();
    for (a, b) in alone.iter().zip(&images) {
        assert!(a.data == b.data);
    }
    assert_eq!(
        told.0.lock().unwrap().len(),
        12,
        "three batches of four steps"
    );
    // With room for all three, one batch.
    let told = Steps::new();
    pipeline::generate(&roomy_cache(), &model, &p, &told.progress()).unwrap();
    assert_eq!(told.0.lock().unwrap().len(), 4);
    // Nothing reserved for a batch outlives it.
    assert_eq!(tight.device_headroom(0), budget);
}

#[test]
fn a_cancelled_request_leaves_the_rest_of_its_batch_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = write_tiny(dir.path(), "sd1", Tiny::Sd1).unwrap();
    let model = DiffusersModel::open(&model_dir).unwrap();
    let cache = roomy_cache();
    let keep = request("a red cat", 3, 1, SchedulerKind::Euler);
    let leave = request("a dog", 4, 1, SchedulerKind::Euler);
    let alone = pipeline::generate(&cache, &model, &keep, &|_| true).unwrap();
    let stop_at_two = |s: Stage| !matches!(s, Stage::Denoising { step: 2, .. });
    let members = [
        Member {
            params: &leave,
            progress: &stop_at_two,
            previews: None,
        },
        Member {
            params: &keep,
            progress: &|_| true,
            previews: None,
        },
    ];
    let out = pipeline::generate_batch(&cache, &model, &members, 8).unwrap();
    assert!(out[0].is_none());
    let kept = out[1].as_ref().unwrap();
    assert!(kept[0].data == alone[0].data);
    // All of them cancelled: the batch stops.
    let members = [Member {
        params: &leave,
        progress: &stop_at_two,
        previews: None,
    }];
    assert!(matches!(
        pipeline::generate_batch(&cache, &model, &members, 8),
        Err(PipelineError::Cancelled)
    ));
}

#[test]
fn requests_with_different_settings_are_refused_as_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = write_tiny(dir.path(), "sd1", Tiny::Sd1).unwrap();
    let model = DiffusersModel::open(&model_dir).unwrap();
    let a = request("a", 1, 1, SchedulerKind::Euler);
    let b = GenerateParams {
        steps: 5,
        ..a.clone()
    };
    let members = [&a, &b].map(|p| Member {
        params: p,
        progress: &|_| true,
        previews: None,
    });
    let err = pipeline::generate_batch(&roomy_cache(), &model, &members, 8).unwrap_err();
    assert!(err.to_string().contains("cannot run as one batch"), "{err}");
}

/// Records which previews it was shown.
struct Seen {
    every: usize,
    shown: Mutex<Vec<(usize, usize, Vec<usize>)>>,
}

impl Previews for Seen {
    fn wants(&self, step: usize, _steps: usize) -> bool {
        step.is_multiple_of(self.every)
    }
    fn show(&self, image: usize, step: usize, preview: pipeline::Image) {
        self.shown
            .lock()
            .unwrap()
            .push((image, step, vec![preview.width, preview.height]));
    }
}

#[test]
fn previews_are_shown_for_each_image_at_the_steps_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = write_tiny(dir.path(), "sd1", Tiny::Sd1).unwrap();
    let model = DiffusersModel::open(&model_dir).unwrap();
    let p = request("a red cat", 3, 2, SchedulerKind::Euler);
    let q = request("no previews", 4, 1, SchedulerKind::Euler);
    let seen = Seen {
        every: 2,
        shown: Mutex::new(Vec::new()),
    };
    let members = [
        Member {
            params: &p,
            progress: &|_| true,
            previews: Some(&seen),
        },
        Member {
            params: &q,
            progress: &|_| true,
            previews: None,
        },
    ];
    pipeline::generate_batch(&roomy_cache(), &model, &members, 8).unwrap();
    let shape = vec![64, 64];
    assert_eq!(
        seen.shown.into_inner().unwrap(),
        [
            (0, 2, shape.clone()),
            (1, 2, shape.clone()),
            (0, 4, shape.clone()),
            (1, 4, shape)
        ]
    );
}
