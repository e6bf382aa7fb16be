//! Leader election through a `coordination.k8s.io/v1` Lease, with client-go's
//! rules, so that two operator replicas can run and never both act.
//!
//! - Timing ([`Timing`]): lease duration, a shorter renew deadline and a retry
//!   period, in client-go's proportions (15 s, 10 s, 2 s by default).
//! - The leader renews every retry period. If it has not renewed within the
//!   renew deadline it stops at once; the deadline counts from the start of its
//!   last successful renewal, which is no later than the write a standby saw.
//! - A standby judges expiry on its own clock: the Lease has expired when the
//!   record has not changed for a lease duration since this replica first saw
//!   it. The holder's timestamps are never compared with local time, so clock
//!   skew between nodes cannot make two replicas act at once.
//! - Every API call runs under a timeout (kube's client has no read timeout), so
//!   an API server that stops answering cannot stall a renewal past its deadline.
//! - Every write is a replace carrying the read `resourceVersion`, so two
//!   candidates racing for an expired Lease cannot both win (409 Conflict).
//!
//! Since the renew deadline is shorter than the lease duration, a leader that
//! cannot reach the API server has stopped before any standby may take over.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Lease duration, renew deadline and retry period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// How long a standby waits, after the record last changed, to take over.
    pub lease: Duration,
    /// How long the leader keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby looks.
    pub retry: Duration,
}

impl Timing {
    /// client-go's proportions (lease 15 s, renew deadline 10 s, retry 2 s)
    /// scaled to `lease`.
    pub fn from_lease(lease: Duration) -> Timing {
        Timing {
            lease,
            renew_deadline: lease * 2 / 3,
            retry: lease * 2 / 15,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

/// The Lease record as last seen, and when this replica first saw it so.
#[derive(Debug)]
struct Observed {
    record: LeaseSpec,
    since: Instant,
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Mutex<Option<Observed>>,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        LeaderElector {
            api,
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: Mutex::default(),
        }
    }

    /// `f` under `limit`: the API server not answering is an error, not a hang.
    async fn call<T>(
        limit: Duration,
        f: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ElectionError> {
        tokio::time::timeout(limit, f)
            .await
            .map_err(|_| ElectionError::Timeout(limit))?
            .map_err(ElectionError::from)
    }

    /// One attempt to acquire or renew, each API call within `limit`:
    /// `Ok(true)` while we hold the Lease.
    pub async fn try_acquire_or_renew(&self, limit: Duration) -> Result<bool, ElectionError> {
        let now = Timestamp::now();
        let secs = self.timing.lease.as_secs().clamp(1, i32::MAX as u64) as i32;
        let Some(mut lease) = Self::call(limit, self.api.get_opt(&self.name)).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, secs, 0, None)),
            };
            return match Self::call(limit, self.api.create(&PostParams::default(), &lease)).await {
                Ok(_) => Ok(true),
                Err(ElectionError::Api(kube::Error::Api(s))) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !self.expired(&spec) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(now, secs, transitions, acquired));
        match Self::call(
            limit,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => Ok(true),
            Err(ElectionError::Api(kube::Error::Api(s))) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the record has stayed the same for its lease duration since this
    /// replica first saw it (on this replica's clock).
    fn expired(&self, record: &LeaseSpec) -> bool {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let since = match observed.as_ref() {
            Some(o) if o.record == *record => o.since,
            _ => {
                *observed = Some(Observed {
                    record: record.clone(),
                    since: now,
                });
                now
            }
        };
        let duration = record
            .lease_duration_seconds
            .map_or(self.timing.lease, |s| Duration::from_secs(s.max(0) as u64));
        now.duration_since(since) >= duration
    }

    fn spec(
        &self,
        now: Timestamp,
        secs: i32,
        transitions: i32,
        acquired: Option<MicroTime>,
    ) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Waits until this replica holds the Lease; returns when the successful
    /// attempt started, from which the renew deadline counts.
    pub async fn acquire(&self) -> Instant {
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew(self.timing.renew_deadline).await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return started;
                }
                Ok(false) => {
                    tracing::debug!(lease = %self.name, "another replica leads; standing by")
                }
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews every retry period; returns, and the caller must stop acting at
    /// once, when the Lease is lost or could not be renewed within the renew
    /// deadline counted from `renewed` (when the last success started).
    pub async fn hold(&self, mut renewed: Instant) {
        loop {
            // Never sleep past the deadline.
            let deadline = renewed + self.timing.renew_deadline;
            tokio::time::sleep(
                self.timing
                    .retry
                    .min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
            let started = Instant::now();
            let Some(left) = deadline
                .checked_duration_since(started)
                .filter(|d| !d.is_zero())
            else {
                tracing::error!(lease = %self.name, deadline = ?self.timing.renew_deadline, "could not renew the leader lease within the renew deadline");
                return;
            };
            match self.try_acquire_or_renew(left).await {
                Ok(true) => renewed = started,
                Ok(false) => {
                    tracing::error!(lease = %self.name, "leadership taken by another replica");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing leader lease"),
            }
        }
    }

    /// Gives the Lease up on shutdown so the standby takes over at once
    /// (client-go's ReleaseOnCancel).
    pub async fn release(&self) {
        let limit = self.timing.renew_deadline;
        let Ok(Some(mut lease)) = Self::call(limit, self.api.get_opt(&self.name)).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = Self::call(
            limit,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        {
            tracing::warn!(error = %e, "releasing leader lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_renew_deadline_ends_before_a_standby_may_take_over() {
        let t = Timing::from_lease(Duration::from_secs(15));
        assert_eq!(
            (t.lease, t.renew_deadline, t.retry),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            ),
            "client-go's defaults"
        );
        for secs in 3..120 {
            let t = Timing::from_lease(Duration::from_secs(secs));
            assert!(
                t.retry < t.renew_deadline && t.renew_deadline < t.lease,
                "{t:?}"
            );
        }
    }
}
