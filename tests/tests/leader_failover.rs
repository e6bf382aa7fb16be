//! Two operator replicas and an API server that stops answering the leader
//! (a network partition, emulated by a proxy that stops forwarding): the
//! leader must stop before the standby is allowed to take over, so the two
//! never act at once.

use modelcache_tests::apiserver::ApiServer;
use modelcache_tests::free_port;
use modelcache_tests::kube::Kube;
use modelcache_tests::process::{binary, Proc};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A TCP proxy to `upstream` that, once frozen, holds every connection open
/// and forwards nothing more: requests hang, as behind a partition.
fn proxy(upstream: String, frozen: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone(), server.try_clone()),
                (server.try_clone(), client.try_clone()),
            ]
            .into_iter()
            .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
            {
                let frozen = frozen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        while frozen.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

fn operator(kubeconfig: &std::path::Path, identity: &str, dir: &std::path::Path) -> Proc {
    Proc::spawn(
        Command::new(binary("modelcache-operator"))
            .args(["run", "--namespace", "modelcache", "--leader-elect"])
            .args(["--leader-lease-seconds", "3", "--identity", identity])
            .arg(format!("--metrics-listen=127.0.0.1:{}", free_port()))
            .arg(format!("--health-listen=127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn"),
        dir.join(format!("{identity}.log")),
    )
}

fn holder(api: &ApiServer) -> String {
    api.object("leases", "modelcache", "modelcache-operator-leader")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn a_partitioned_leader_stops_before_the_standby_takes_over() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let direct = api.kubeconfig(dir.path());
    let frozen = Arc::new(AtomicBool::new(false));
    let via = proxy(api.url.trim_start_matches("http://").into(), frozen.clone());
    let proxied = dir.path().join("proxied.kubeconfig");
    let text = std::fs::read_to_string(&direct)
        .expect("kubeconfig")
        .replace(api.url.trim_start_matches("http://"), &via);
    std::fs::write(&proxied, text).expect("writing a kubeconfig");

    let mut a = operator(&proxied, "a", dir.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    while holder(&api) != "a" {
        assert!(Instant::now() < deadline, "a never led:\n{}", a.tail(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = operator(&direct, "b", dir.path());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holder(&api), "a", "b stands by while a renews");

    // The partition: a's requests hang from now on.
    let cut = Instant::now();
    frozen.store(true, Ordering::Relaxed);
    let (mut a_stopped, mut b_leads) = (None, None);
    while a_stopped.is_none() || b_leads.is_none() {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "a stopped: {a_stopped:?}, b leads: {b_leads:?}\n--- a\n{}\n--- b\n{}",
            a.tail(20),
            b.tail(20)
        );
        if a_stopped.is_none() && a.exited() {
            a_stopped = Some(cut.elapsed());
        }
        if b_leads.is_none() && holder(&api) == "b" {
            b_leads = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (a_stopped, b_leads) = (a_stopped.unwrap_or_default(), b_leads.unwrap_or_default());
    eprintln!("partitioned leader exited after {a_stopped:?}; the standby led after {b_leads:?}");
    assert!(
        a_stopped < b_leads,
        "the partitioned leader exited after {a_stopped:?}, the standby led after {b_leads:?}"
    );
    assert!(
        a.tail(5).contains("renew deadline"),
        "a says why it stopped:\n{}",
        a.tail(5)
    );
}
