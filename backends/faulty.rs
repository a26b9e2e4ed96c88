//! [`FaultyLeaser`]: a wrapper that makes any leaser's store look unreachable or
//! slow, for tests of what a node does when its lease store misbehaves (in the style
//! of object_store's `ThrottledStore` and neon's `UnreliableWrapper`).
//!
//! Test infrastructure; nothing in the node builds it from config.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::lease::{Lease, LeaseError, Leaser, PrimaryInfo};

/// What the wrapper does to every call that reaches the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaserFault {
    /// Pass calls through.
    #[default]
    None,
    /// Fail every call with [`LeaseError::Unavailable`] without reaching the store.
    Unavailable,
    /// Delay every call by this long, then pass it through.
    Delay(Duration),
}

/// The switch shared by a [`FaultyLeaser`] and the leases it hands out.
#[derive(Debug, Default)]
struct Switch {
    fault: LeaserFault,
    /// Fail exactly the call with this number (counting from 1), once.
    fail_call: Option<u64>,
    calls: u64,
}

/// Wraps a leaser; [`FaultyLeaser::set_fault`] changes its behaviour at once for
/// the leaser and every lease it handed out.
#[derive(Debug)]
pub struct FaultyLeaser<L> {
    inner: L,
    switch: Arc<Mutex<Switch>>,
}

impl<L: Leaser> FaultyLeaser<L> {
    /// Wraps `inner`, passing calls through until told otherwise.
    pub fn new(inner: L) -> Self {
        FaultyLeaser {
            inner,
            switch: Arc::new(Mutex::new(Switch::default())),
        }
    }

    /// Sets the fault for every later call.
    pub fn set_fault(&self, fault: LeaserFault) {
        self.switch.lock().unwrap_or_else(|p| p.into_inner()).fault = fault;
    }

    /// Makes the `n`th call from now (1 = the next) fail with
    /// [`LeaseError::Unavailable`], once.
    pub fn fail_nth_call(&self, n: u64) {
        let mut s = self.switch.lock().unwrap_or_else(|p| p.into_inner());
        s.fail_call = Some(s.calls + n);
    }

    /// Calls that went through the wrapper so far (failed ones included).
    pub fn calls(&self) -> u64 {
        self.switch.lock().unwrap_or_else(|p| p.into_inner()).calls
    }

    /// The wrapped leaser.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

/// Applies the switch to one call: `Err` to fail it, after any delay.
async fn gate(switch: &Mutex<Switch>, backend: &'static str, op: &str) -> Result<(), LeaseError> {
    let (fault, fail_now) = {
        let mut s = switch.lock().unwrap_or_else(|p| p.into_inner());
        s.calls += 1;
        let fail_now = s.fail_call == Some(s.calls);
        (s.fault, fail_now)
    };
    let unavailable = || LeaseError::Unavailable {
        backend,
        source: format!("injected fault: {op} did not reach the store").into(),
    };
    if fail_now {
        return Err(unavailable());
    }
    match fault {
        LeaserFault::None => Ok(()),
        LeaserFault::Unavailable => Err(unavailable()),
        LeaserFault::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
    }
}

#[async_trait]
impl<L: Leaser> Leaser for FaultyLeaser<L> {
    fn type_name(&self) -> &'static str {
        self.inner.type_name()
    }

    fn node_info(&self) -> &PrimaryInfo {
        self.inner.node_info()
    }

    fn candidate(&self) -> bool {
        self.inner.candidate()
    }

    async fn primary_info(&self) -> Result<Option<PrimaryInfo>, LeaseError> {
        gate(&self.switch, self.type_name(), "primary_info").await?;
        self.inner.primary_info().await
    }

    async fn watch_primary(
        &self,
        after: u64,
        wait: Duration,
    ) -> Result<(Option<PrimaryInfo>, u64), LeaseError> {
        gate(&self.switch, self.type_name(), "watch_primary").await?;
        self.inner.watch_primary(after, wait).await
    }

    async fn acquire(&self) -> Result<Box<dyn Lease>, LeaseError> {
        gate(&self.switch, self.type_name(), "acquire").await?;
        let lease = self.inner.acquire().await?;
        Ok(Box::new(FaultyLease {
            inner: lease,
            switch: Arc::clone(&self.switch),
            backend: self.type_name(),
        }))
    }

    async fn cluster_id(&self) -> Result<Option<String>, LeaseError> {
        gate(&self.switch, self.type_name(), "cluster_id").await?;
        self.inner.cluster_id().await
    }

    async fn set_cluster_id_if_absent(&self, id: &str) -> Result<String, LeaseError> {
        gate(&self.switch, self.type_name(), "set_cluster_id_if_absent").await?;
        self.inner.set_cluster_id_if_absent(id).await
    }

    async fn acquire_existing(&self, lease_id: &str) -> Result<Box<dyn Lease>, LeaseError> {
        gate(&self.switch, self.type_name(), "acquire_existing").await?;
        let lease = self.inner.acquire_existing(lease_id).await?;
        Ok(Box::new(FaultyLease {
            inner: lease,
            switch: Arc::clone(&self.switch),
            backend: self.type_name(),
        }))
    }
}

/// A lease from a [`FaultyLeaser`]: its renew and release obey the same switch.
#[derive(Debug)]
pub struct FaultyLease {
    inner: Box<dyn Lease>,
    switch: Arc<Mutex<Switch>>,
    backend: &'static str,
}

#[async_trait]
impl Lease for FaultyLease {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn ttl(&self) -> Option<Duration> {
        self.inner.ttl()
    }

    fn expires_at(&self) -> Option<Instant> {
        self.inner.expires_at()
    }

    async fn renew(&self) -> Result<(), LeaseError> {
        gate(&self.switch, self.backend, "renew").await?;
        self.inner.renew().await
    }

    async fn release(&self) -> Result<(), LeaseError> {
        gate(&self.switch, self.backend, "release").await?;
        self.inner.release().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::StaticLeaser;

    fn leaser() -> FaultyLeaser<StaticLeaser> {
        FaultyLeaser::new(StaticLeaser::new(
            PrimaryInfo {
                hostname: "p".into(),
                advertise_url: "http://p:20202".into(),
            },
            true,
        ))
    }

    #[tokio::test]
    async fn unavailable_reaches_leases_already_handed_out() {
        let l = leaser();
        let lease = l.acquire().await.unwrap();
        lease.renew().await.unwrap();
        l.set_fault(LeaserFault::Unavailable);
        let err = lease.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Unavailable { .. }));
        assert!(err.is_retryable());
        assert!(l.primary_info().await.is_err());
        l.set_fault(LeaserFault::None);
        lease.renew().await.unwrap();
        assert_eq!(l.calls(), 5);
    }

    #[tokio::test]
    async fn nth_call_fails_once_and_delay_delays() {
        let l = leaser();
        l.fail_nth_call(2);
        assert!(l.primary_info().await.is_ok());
        assert!(l.primary_info().await.is_err());
        assert!(l.primary_info().await.is_ok());

        l.set_fault(LeaserFault::Delay(Duration::from_millis(100)));
        let started = Instant::now();
        l.primary_info().await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
