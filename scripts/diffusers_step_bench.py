#!/usr/bin/env python3
"""diffusers' side of the pipeline benchmark (node-agent/benches/agent.rs runs it
when MODELCACHE_DIFFUSERS_PYTHON names a Python with torch and diffusers; see
scripts/diffusers-venv.sh). Measures exactly what the Rust side measures and
prints one JSON object.

  python diffusers_step_bench.py tiny FIXTURE_DIR   -> {"step_s": ...}  (tiny-sd1, 64x64, CFG)
  python diffusers_step_bench.py sd15               -> {"step_s": ...}  (SD 1.5 UNet, 512x512, batch 2)
  python diffusers_step_bench.py controlnet FIXTURE_DIR CONTROLNET_DIR CONTROL_PNG
      -> {"step_s": ..., "controlled_step_s": ...}  (tiny-sd1 at 64x64 without and with one ControlNet)
  python diffusers_step_bench.py controlnet-sd15
      -> {"step_s": ..., "controlled_step_s": ...}  (SD 1.5 UNet alone, and with an SD 1.5 ControlNet)
"""
import json, statistics, sys, time
import torch
from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)

torch.manual_seed(0)
what = sys.argv[1]
if what == "tiny":
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[2])
    pipe.set_progress_bar_config(disable=True)

    def run(steps):
        t = time.perf_counter()
        with torch.no_grad():
            pipe("a red cat", height=64, width=64, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
        return time.perf_counter() - t

    run(2)
    a = statistics.median(run(2) for _ in range(5))
    b = statistics.median(run(22) for _ in range(5))
    print(json.dumps({"step_s": (b - a) / 20}))
elif what == "controlnet":
    from PIL import Image
    plain = StableDiffusionPipeline.from_pretrained(sys.argv[2], safety_checker=None, requires_safety_checker=False)
    controlled = StableDiffusionControlNetPipeline.from_pretrained(
        sys.argv[2], controlnet=ControlNetModel.from_pretrained(sys.argv[3]), safety_checker=None,
        requires_safety_checker=False)
    image = Image.open(sys.argv[4]).convert("RGB")
    for p in (plain, controlled):
        p.set_progress_bar_config(disable=True)

    def per_step(pipe, **extra):
        def run(steps):
            t = time.perf_counter()
            with torch.no_grad():
                pipe("a red cat", height=64, width=64, num_inference_steps=steps, guidance_scale=7.5,
                     output_type="np", **extra)
            return time.perf_counter() - t
        run(2)
        a = statistics.median(run(2) for _ in range(5))
        b = statistics.median(run(22) for _ in range(5))
        return (b - a) / 20

    print(json.dumps({"step_s": per_step(plain), "controlled_step_s": per_step(controlled, image=image)}))
elif what == "controlnet-sd15":
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, cross_attention_dim=768, layers_per_block=2,
    ).eval()
    net = ControlNetModel.from_unet(unet).eval()
    x = torch.zeros(2, 4, 64, 64)
    ctx = torch.zeros(2, 77, 768)
    cond = torch.zeros(2, 3, 512, 512)
    def controlled_step():
        down, mid = net(x, 500, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        unet(x, 500, encoder_hidden_states=ctx, down_block_additional_residuals=down,
             mid_block_additional_residual=mid)

    with torch.no_grad():
        # One of each first: the first call of a module pays for its allocations.
        unet(x, 500, encoder_hidden_states=ctx)
        controlled_step()
        t = time.perf_counter()
        unet(x, 500, encoder_hidden_states=ctx)
        alone = time.perf_counter() - t
        t = time.perf_counter()
        controlled_step()
        controlled = time.perf_counter() - t
    print(json.dumps({"step_s": alone, "controlled_step_s": controlled}))
elif what == "sd15":
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, cross_attention_dim=768, layers_per_block=2,
    ).eval()
    x = torch.zeros(2, 4, 64, 64)
    ctx = torch.zeros(2, 77, 768)
    t = time.perf_counter()
    with torch.no_grad():
        unet(x, 500, encoder_hidden_states=ctx)
    print(json.dumps({"step_s": time.perf_counter() - t}))
