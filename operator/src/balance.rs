//! Which agent a gateway request goes to, and in which order the others are
//! tried when it fails: pure, no I/O.
//!
//! Every candidate holds the deployment Ready. The order is:
//! 1. least expected wait: the requests already at the agent. A request with
//!    LoRA adapters instead only avoids agents over a load bound, so that it
//!    can follow its adapters (below);
//! 2. residency: an agent holding the weights in VRAM before one holding them
//!    in RAM, which must first copy them to the GPU;
//! 3. affinity: rendezvous hashing of the request's key over the agents. For a
//!    request with adapters the key is the model and its LoRA set, so the same
//!    set keeps landing on the agent that has it patched in; without adapters
//!    it is the model, so an idle cluster keeps using one warm agent.
//!
//! The bound is KubeAI's and Envoy's "consistent hashing with bounded loads":
//! an agent is eligible while its wait is at most `load_factor` times the
//! mean wait counting this request, so one popular LoRA set spreads out once
//! its agent is busier than the others by that factor.

use modelcache_crds::Tier;

/// One agent that holds the model Ready.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its node's name: the rendezvous hash's identity of the agent.
    pub node: String,
    /// Requests it is expected to work through before this one.
    pub wait: u32,
    /// Where it holds the weights.
    pub tier: Tier,
}

/// Why the first candidate came first (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The only holder.
    Only,
    /// It had the least wait.
    LeastWait,
    /// Equal wait; it holds the weights in a faster tier.
    Residency,
    /// The request's key hashes to it.
    Affinity,
}

impl Reason {
    pub fn as_label(self) -> &'static str {
        match self {
            Reason::Only => "only",
            Reason::LeastWait => "least_wait",
            Reason::Residency => "residency",
            Reason::Affinity => "affinity",
        }
    }
}

/// What the ordering keys on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Hash of the model, and of the LoRA set when there is one.
    pub key: u64,
    /// Whether the request carries adapters (and so prefers affinity to least wait).
    pub adapters: bool,
}

/// 0 for the fastest tier.
fn tier_rank(t: Tier) -> u8 {
    match t {
        Tier::Vram => 0,
        Tier::Ram => 1,
        Tier::Disk => 2,
    }
}

/// The candidates' indices in the order to try them, and why the first leads.
pub fn order(c: &[Candidate], req: Request, load_factor: f64) -> (Vec<usize>, Reason) {
    let total: u64 = c.iter().map(|x| u64::from(x.wait)).sum();
    let bound = ((total + 1) as f64 / c.len().max(1) as f64 * load_factor).ceil() as u64;
    let key = |i: usize| {
        let x = &c[i];
        // The first field is the wait for plain requests, and only "over the
        // bound or not" for requests with adapters.
        let wait = if req.adapters {
            u64::from(u64::from(x.wait) > bound)
        } else {
            u64::from(x.wait)
        };
        (
            wait,
            tier_rank(x.tier),
            std::cmp::Reverse(rendezvous(req.key, &x.node)),
        )
    };
    let mut idx: Vec<usize> = (0..c.len()).collect();
    idx.sort_by_key(|&i| key(i));
    let reason = match idx.as_slice() {
        [] | [_] => Reason::Only,
        [a, b, ..] => {
            let (ka, kb) = (key(*a), key(*b));
            if ka.0 < kb.0 && !req.adapters {
                Reason::LeastWait
            } else if ka.0 == kb.0 && ka.1 < kb.1 {
                Reason::Residency
            } else {
                Reason::Affinity
            }
        }
    };
    (idx, reason)
}

/// A stable 64-bit hash (FNV-1a, then a finaliser), the same in every gateway
/// replica and release, unlike `std`'s hasher.
pub fn hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Highest-random-weight score of `node` for `key`.
fn rendezvous(key: u64, node: &str) -> u64 {
    mix(key ^ hash(&[node]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(node: &str, wait: u32, tier: Tier) -> Candidate {
        Candidate {
            node: node.into(),
            wait,
            tier,
        }
    }

    fn plain(model: &str) -> Request {
        Request {
            key: hash(&[model]),
            adapters: false,
        }
    }

    fn with_loras(model: &str, set: &str) -> Request {
        Request {
            key: hash(&[model, set]),
            adapters: true,
        }
    }

    #[test]
    fn least_wait_comes_first_then_residency() {
        let c = [
            cand("a", 2, Tier::Vram),
            cand("b", 0, Tier::Ram),
            cand("c", 1, Tier::Vram),
        ];
        let (o, why) = order(&c, plain("m"), 1.25);
        assert_eq!(o, vec![1, 2, 0]);
        assert_eq!(why, Reason::LeastWait);

        let c = [cand("a", 1, Tier::Ram), cand("b", 1, Tier::Vram)];
        let (o, why) = order(&c, plain("m"), 1.25);
        assert_eq!(o, vec![1, 0]);
        assert_eq!(why, Reason::Residency);
    }

    #[test]
    fn one_candidate_is_the_only_choice() {
        let (o, why) = order(&[cand("a", 9, Tier::Ram)], plain("m"), 1.25);
        assert_eq!((o, why), (vec![0], Reason::Only));
        assert_eq!(order(&[], plain("m"), 1.25).0, Vec::<usize>::new());
    }

    #[test]
    fn the_same_lora_set_follows_one_agent_until_it_is_over_the_bound() {
        let nodes = ["a", "b", "c"];
        let req = with_loras("ns/m", "style.safetensors:0.8");
        // With equal waits the set always lands on one agent…
        let idle: Vec<_> = nodes.iter().map(|n| cand(n, 0, Tier::Vram)).collect();
        let (first, why) = order(&idle, req, 1.25);
        assert_eq!(why, Reason::Affinity);
        let home = first[0];
        // …and stays there while it is busier, within the bound…
        let mut c = idle.clone();
        c[home].wait = 1;
        assert_eq!(order(&c, req, 1.25).0[0], home);
        // …but not past it: 3 waiting, mean with this request (3+1)/3, bound 2.
        c[home].wait = 3;
        let (o, _) = order(&c, req, 1.25);
        assert_ne!(o[0], home);
        assert_eq!(
            *o.last().unwrap(),
            home,
            "the overloaded agent is tried last"
        );
        // Without adapters, the least wait decides at once.
        c[home].wait = 1;
        assert_ne!(order(&c, plain("ns/m"), 1.25).0[0], home);
    }

    #[test]
    fn different_lora_sets_spread_over_the_agents() {
        let c: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| cand(n, 0, Tier::Vram))
            .collect();
        let homes: std::collections::BTreeSet<usize> = (0..30)
            .map(|i| order(&c, with_loras("m", &format!("lora{i}")), 1.25).0[0])
            .collect();
        assert_eq!(homes.len(), 3, "30 LoRA sets use all three agents");
    }

    proptest! {
        /// The order tries every candidate exactly once, and a plain request's
        /// first choice has the least wait.
        #[test]
        fn order_is_a_permutation_led_by_least_wait(
            waits in proptest::collection::vec((0u32..20, 0u8..2), 1..8),
            key in any::<u64>(),
            adapters in any::<bool>(),
        ) {
            let c: Vec<_> = waits.iter().enumerate().map(|(i, (w, t))| {
                cand(&format!("n{i}"), *w, if *t == 0 { Tier::Vram } else { Tier::Ram })
            }).collect();
            let (o, _) = order(&c, Request { key, adapters }, 1.25);
            let mut sorted = o.clone();
            sorted.sort();
            prop_assert_eq!(sorted, (0..c.len()).collect::<Vec<_>>());
            let min = c.iter().map(|x| x.wait).min().unwrap();
            if !adapters {
                prop_assert_eq!(c[o[0]].wait, min);
            } else {
                // Within the bound, which the least-waiting agent always is.
                let total: u32 = c.iter().map(|x| x.wait).sum();
                let bound = ((total + 1) as f64 / c.len() as f64 * 1.25).ceil() as u32;
                prop_assert!(c[o[0]].wait <= bound);
            }
        }

        /// Removing an agent moves only the keys that lived on it (rendezvous hashing).
        #[test]
        fn removing_an_agent_moves_only_its_keys(key in any::<u64>(), gone in 0usize..4) {
            let all: Vec<_> = (0..4).map(|i| cand(&format!("n{i}"), 0, Tier::Vram)).collect();
            let req = Request { key, adapters: true };
            let before = all[order(&all, req, 1.25).0[0]].node.clone();
            let rest: Vec<_> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, c)| c.clone()).collect();
            let after = rest[order(&rest, req, 1.25).0[0]].node.clone();
            if before != all[gone].node {
                prop_assert_eq!(before, after);
            }
        }
    }
}
