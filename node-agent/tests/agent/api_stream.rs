//! Streamed previews (`stream: true`) through the official openai client,
//! a disconnecting client freeing its place, and requests batched by the
//! agent answering what they answer alone.

use crate::api::{decode_b64, http, run_openai_client, Agent};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const JSON: &[(&str, &str)] = &[("Content-Type", "application/json")];

#[test]
fn the_official_openai_client_streams_previews_then_the_image() {
    let agent = Agent::start(&[]);
    run_openai_client(&format!(
        r#"
import base64, openai, tempfile
client = openai.OpenAI(base_url="http://{}/v1", api_key="unused")
PNG = b"\x89PNG\r\n\x1a\n"
events = list(client.images.generate(model="tiny", prompt="a red cat", size="64x64", stream=True, partial_images=2, extra_body={{"steps": 6, "seed": 1}}))
types = [e.type for e in events]
assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], types
assert [e.partial_image_index for e in events[:2]] == [0, 1]
assert all(base64.b64decode(e.b64_json)[:8] == PNG for e in events)
assert events[-1].size == "64x64" and events[-1].output_format == "png"
# The streamed image is the image the same request gets without streaming.
plain = client.images.generate(model="tiny", prompt="a red cat", size="64x64", extra_body={{"steps": 6, "seed": 1}})
assert plain.data[0].b64_json == events[-1].b64_json
# No previews asked for: the image alone; two images: one completed event each.
events = list(client.images.generate(model="tiny", prompt="a red cat", size="64x64", n=2, stream=True, extra_body={{"steps": 2}}))
assert [e.type for e in events] == ["image_generation.completed"] * 2, events
# An edit streams image_edit events.
with tempfile.NamedTemporaryFile(suffix=".png") as f:
    f.write(base64.b64decode(plain.data[0].b64_json)); f.flush()
    events = list(client.images.edit(model="tiny", image=open(f.name, "rb"), prompt="a blue cat", stream=True, partial_images=1, extra_body={{"steps": 4, "strength": 0.75}}))
assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"], events
# Bad input is refused before the stream starts, naming the field.
try:
    client.images.generate(model="tiny", prompt="x", size="64x64", stream=True, partial_images=4)
    raise SystemExit("partial_images=4 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "partial_images", e.body
"#,
        agent.api
    ));
}

/// Opens a streamed request and returns the connection once its first
/// event has arrived.
fn stream_until_first_event(addr: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        if line.starts_with("event: image_generation.partial_image") {
            return s;
        }
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_stops_its_work_and_frees_its_place() {
    // One request at a time and none waiting: a second request is refused
    // while the first runs.
    let agent = Agent::start(&["--queue-size", "0"]);
    let long = r#"{"model": "tiny", "prompt": "a red cat", "size": "128x128", "steps": 150, "stream": true, "partial_images": 3}"#;
    let short = br#"{"model": "tiny", "prompt": "a red cat", "size": "64x64", "steps": 1}"#;
    let conn = stream_until_first_event(&agent.api, long);
    let refused = http(&agent.api, "POST", "/v1/images/generations", JSON, short);
    assert_eq!(refused.status, 429);
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http(&agent.api, "POST", "/v1/images/generations", JSON, short);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429);
        assert!(Instant::now() < deadline, "the place was never freed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = http(&agent.metrics, "GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(r#"modelcache_generation_requests_total{code="499",model="tiny"} 1"#),
        "{text}"
    );
    // Its generation was stopped, not run to the end.
    let stopped = agent.logs.lock().unwrap().iter().any(|v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("generation stopped: its client went away"))
    });
    assert!(stopped, "no log of the stopped generation");
}

/// The pixels of a PNG.
fn pixels(png: &[u8]) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn requests_arriving_together_run_as_one_batch_with_the_images_they_get_alone() {
    let agent = Agent::start(&["--batch-window-ms", "1000"]);
    let body = |prompt: &str, seed: u64| {
        format!(
            r#"{{"model": "tiny", "prompt": "{prompt}", "size": "64x64", "steps": 3, "seed": {seed}}}"#
        )
    };
    let requests = [
        body("a red cat", 1),
        body("a blue dog", 2),
        body("a house", 3),
    ];
    let together: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|b| {
                s.spawn(|| {
                    http(
                        &agent.api,
                        "POST",
                        "/v1/images/generations",
                        JSON,
                        b.as_bytes(),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200);
                decode_b64(r.json()["data"][0]["b64_json"].as_str().unwrap())
            })
            .collect()
    });
    let metrics = String::from_utf8_lossy(&http(&agent.metrics, "GET", "/metrics", &[], b"").body)
        .to_string();
    assert!(
        metrics.contains("modelcache_batch_size_sum 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelcache_batch_size_count 1\n"),
        "{metrics}"
    );
    for (b, png) in requests.iter().zip(&together) {
        let alone = http(
            &agent.api,
            "POST",
            "/v1/images/generations",
            JSON,
            b.as_bytes(),
        );
        let alone = decode_b64(alone.json()["data"][0]["b64_json"].as_str().unwrap());
        // Within one level of 255: the batched image is the same image.
        let (a, t) = (pixels(&alone), pixels(png));
        assert_eq!(a.len(), t.len());
        assert!(a.iter().zip(&t).all(|(x, y)| x.abs_diff(*y) <= 1));
    }
}
