//! The sharded subscriber of a [`RedisClusterBackend`](super::RedisClusterBackend): one RESP3
//! cluster client per backend (not per waiter), apart from the command connection, subscribed
//! with `SSUBSCRIBE ns{key}:wake` (routed to the primary of the lock's slot) to the wake-up
//! channel of each lock this process has waiters for, waking them when the release script
//! `SPUBLISH`es.
//!
//! A watch is confirmed only once its `SSUBSCRIBE` is answered, by this task: redis-rs's cluster
//! client also re-subscribes on its own after a reconnect or a topology change, but nothing
//! tells us when that is done, so the task subscribes again itself (a repeated `SSUBSCRIBE` is
//! harmless). Every watch becomes unconfirmed (its waiters retry, then poll) when a node's
//! connection drops (redis-rs's `Disconnection` push: we do not learn which slots it served), and
//! a watch whose node drops its subscription (a `sunsubscribe` push, which Redis sends when the
//! slot leaves the node's shard, as in resharding) becomes unconfirmed on its own; both are
//! subscribed again, with back-off, until a node of the slot's shard answers. (A replica serves
//! `SSUBSCRIBE` for its shard and receives the shard's `SPUBLISH`es: after a manual failover the
//! subscription stays, valid, on the old primary, now a replica.)

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::subscriber::{
    CHANNEL_SUFFIX, CONNECT_TIMEOUT, MAX_BACKOFF, MIN_BACKOFF, Running, channel,
};
use super::wakeups::{Hub, Interest, Wakeups};

/// Builds the cluster client the subscriber connects with (RESP3 and the push sender are added).
pub(super) type ClientBuilder = Arc<dyn Fn() -> ClusterClientBuilder + Send + Sync>;

/// Wake-ups pushed through one sharded subscriber, started when a lock is first waited for (and
/// again after it ended).
pub(super) fn pushed(builder: ClientBuilder) -> Wakeups {
    Wakeups::pushed(Arc::new(move |hub| {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (sender, interests) = mpsc::unbounded_channel();
        runtime.spawn(run(builder.clone(), hub, interests));
        Some(sender)
    }))
}

/// Connects (a cluster client that follows the cluster on its own), then subscribes and wakes
/// until the hub is gone. Waiters poll while the client cannot connect.
async fn run(builder: ClientBuilder, hub: Weak<Hub>, interests: mpsc::UnboundedReceiver<Interest>) {
    let mut running = Running {
        hub: hub.clone(),
        interests,
    };
    let interests = &mut running.interests;
    let mut backoff = MIN_BACKOFF;
    loop {
        let (push_sender, pushes) = mpsc::unbounded_channel::<PushInfo>();
        let connected = match builder()
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(push_sender)
            .build()
        {
            Ok(client) => tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
                .await
                .ok()
                .and_then(Result::ok),
            Err(error) => {
                tracing::debug!(%error, "lock wake-up subscriber: bad cluster client settings");
                None
            }
        };
        let Some(connection) = connected else {
            tracing::debug!(
                ?backoff,
                "lock wake-up subscriber cannot reach the cluster; waiters poll"
            );
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                interest = interests.recv() => if interest.is_none() { return },
            }
            backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
            continue;
        };
        listen(&hub, connection, pushes, interests).await;
        return;
    }
}

/// One `SSUBSCRIBE` (or `SUNSUBSCRIBE`) in flight: its key, the epoch it started in, and whether
/// it was answered.
type Attempt = std::pin::Pin<Box<dyn Future<Output = (Arc<str>, u64, bool)> + Send>>;

fn subscribe(connection: &ClusterConnection, key: Arc<str>, epoch: u64) -> Attempt {
    let mut connection = connection.clone();
    Box::pin(async move {
        let answered = connection.ssubscribe(channel(&key)).await.is_ok();
        (key, epoch, answered)
    })
}

fn unsubscribe(connection: &ClusterConnection, key: Arc<str>) -> Attempt {
    let mut connection = connection.clone();
    Box::pin(async move {
        // Not answered: the subscription may stay, and its messages wake nobody.
        let _ = connection.sunsubscribe(channel(&key)).await;
        (key, u64::MAX, false)
    })
}

/// The lock key of a push's channel (its first datum), if it is a wake-up channel.
fn lock_key(push: &PushInfo) -> Option<String> {
    let name = match push.data.first()? {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        _ => return None,
    };
    name.strip_suffix(CHANNEL_SUFFIX).map(str::to_owned)
}

async fn listen(
    hub: &Weak<Hub>,
    connection: ClusterConnection,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    interests: &mut mpsc::UnboundedReceiver<Interest>,
) {
    // Whatever was asked before now is in the hub's list.
    while interests.try_recv().is_ok() {}
    let Some(watched) = hub.upgrade().map(|hub| hub.watched_keys()) else {
        return;
    };
    // Bumped whenever subscriptions may have been lost: an answer to an older `SSUBSCRIBE` does
    // not confirm a watch.
    let mut epoch = 0_u64;
    let mut attempts = FuturesUnordered::<Attempt>::new();
    let mut in_flight: HashSet<Arc<str>> = HashSet::new();
    // Keys to subscribe again once `retry` fires.
    let mut pending: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = MIN_BACKOFF;
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    let mut retrying = false;
    for key in watched {
        in_flight.insert(key.clone());
        attempts.push(subscribe(&connection, key, epoch));
    }
    loop {
        tokio::select! {
            push = pushes.recv() => {
                // The client (and with it the push sender) lives as long as `connection`.
                let Some(push) = push else { return };
                let Some(hub) = hub.upgrade() else { return };
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        if let Some(key) = lock_key(&push) {
                            hub.wake(&key);
                        }
                    }
                    PushKind::Disconnection => {
                        tracing::debug!(
                            "lock wake-up subscriber lost a node; waiters poll until subscribed again"
                        );
                        epoch += 1;
                        hub.disconnected();
                        pending.extend(hub.watched_keys());
                        if !retrying {
                            retry.as_mut().reset(tokio::time::Instant::now() + MIN_BACKOFF);
                            retrying = true;
                        }
                    }
                    PushKind::SUnsubscribe => {
                        // Ours after an unwatch, or the node's (the slot moved away).
                        if let Some(key) = lock_key(&push)
                            && hub.is_watched(&key)
                        {
                            epoch += 1;
                            hub.unconfirm(&key);
                            pending.insert(key.into());
                            if !retrying {
                                retry.as_mut().reset(tokio::time::Instant::now() + MIN_BACKOFF);
                                retrying = true;
                            }
                        }
                    }
                    _ => {}
                }
            }
            interest = interests.recv() => {
                let Some(interest) = interest else { return };
                let Some(hub) = hub.upgrade() else { return };
                match interest {
                    Interest::Watch(key) => {
                        if in_flight.insert(key.clone()) {
                            attempts.push(subscribe(&connection, key, epoch));
                        }
                    }
                    Interest::Unwatch(key) => {
                        pending.remove(&key);
                        // Watched again since: keep the subscription.
                        if !hub.is_watched(&key) && !in_flight.contains(&key) {
                            attempts.push(unsubscribe(&connection, key));
                        }
                    }
                }
            }
            Some((key, started, answered)) = attempts.next(), if !attempts.is_empty() => {
                if started == u64::MAX {
                    continue;
                }
                in_flight.remove(&key);
                let Some(hub) = hub.upgrade() else { return };
                if !hub.is_watched(&key) {
                    // Unwatched while subscribing.
                    if answered {
                        attempts.push(unsubscribe(&connection, key));
                    }
                } else if answered && started == epoch {
                    hub.confirm(&key);
                    if pending.is_empty() {
                        backoff = MIN_BACKOFF;
                    }
                } else {
                    pending.insert(key);
                    if !retrying {
                        retry.as_mut().reset(tokio::time::Instant::now() + backoff);
                        retrying = true;
                        backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                    }
                }
            }
            () = &mut retry, if retrying => {
                retrying = false;
                for key in std::mem::take(&mut pending) {
                    if in_flight.insert(key.clone()) {
                        attempts.push(subscribe(&connection, key, epoch));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(kind: PushKind, data: Vec<Value>) -> PushInfo {
        PushInfo { kind, data }
    }

    #[test]
    fn the_lock_key_is_read_from_a_wake_up_channel_only() {
        let message = push(
            PushKind::SMessage,
            vec![
                Value::BulkString(b"tower-lock:{job}:wake".to_vec()),
                Value::BulkString(Vec::new()),
            ],
        );
        assert_eq!(lock_key(&message).as_deref(), Some("tower-lock:{job}"));
        let other = push(
            PushKind::SMessage,
            vec![Value::BulkString(b"news".to_vec())],
        );
        assert_eq!(lock_key(&other), None);
        assert_eq!(lock_key(&push(PushKind::Disconnection, Vec::new())), None);
        let unsubscribed = push(
            PushKind::SUnsubscribe,
            vec![Value::SimpleString("ns{k}:wake".into()), Value::Int(0)],
        );
        assert_eq!(lock_key(&unsubscribed).as_deref(), Some("ns{k}"));
    }
}
