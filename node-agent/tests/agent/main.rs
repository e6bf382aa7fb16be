//! The agent's integration tests, built as one binary: every test binary links
//! candle, so one link instead of fourteen keeps the test build small and fast.

mod common;

// The agent's allocator, so that every test here runs on it as the agent does.
#[global_allocator]
static ALLOCATOR: modelcache_agent::memory::pool::PoolAllocator =
    modelcache_agent::memory::pool::PoolAllocator;

mod api;
mod api_controlnet;
mod api_edit;
mod api_stream;
mod cache;
mod cluster;
mod fetch;
mod memory_pool;
mod memory_regression;
mod pipeline_batch;
mod pipeline_controlnet;
mod pipeline_edit;
mod pipeline_embeddings;
mod pipeline_ip_adapter;
mod pipeline_parity;
mod pipeline_refiner;
mod pipeline_schedulers;
mod pipeline_sd2;
mod pipeline_sdxl;
mod pipeline_seamless;
mod pipeline_vae;
mod store_convert;
mod store_files;
mod store_merge;
mod store_probe;
