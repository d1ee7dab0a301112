//! The shared subscriber connection of a [`RedisBackend`](super::RedisBackend): one pub/sub
//! connection per backend (not per waiter), subscribed to the wake-up channel of each lock this
//! process has waiters for, waking them when the release script publishes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;

use super::wakeups::{Hub, Interest, Wakeups};

/// What the wake-up channel of a lock adds to its key: `ns{key}:wake`, in the lock's hash slot.
/// The release script builds the same name (`KEYS[1] .. ':wake'`).
pub(super) const CHANNEL_SUFFIX: &str = ":wake";

/// How long connecting the subscriber may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The first and the longest pause between reconnection attempts.
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(10);
pub(super) const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Wake-ups pushed through one subscriber connection to `client`'s server, opened when a lock
/// is first waited for (and again after it is lost).
pub(super) fn pushed(client: redis::Client) -> Wakeups {
    Wakeups::pushed(Arc::new(move |hub| {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (sender, interests) = mpsc::unbounded_channel();
        runtime.spawn(run(client.clone(), hub, interests));
        Some(sender)
    }))
}

pub(super) fn channel(lock_key: &str) -> String {
    format!("{lock_key}{CHANNEL_SUFFIX}")
}

/// Connects, subscribes to every watched lock, and wakes their waiters until the hub is gone;
/// reconnects (with back-off) whenever the connection is lost. Waiters poll meanwhile.
async fn run(client: redis::Client, hub: Weak<Hub>, interests: mpsc::UnboundedReceiver<Interest>) {
    let mut running = Running {
        hub: hub.clone(),
        interests,
    };
    let interests = &mut running.interests;
    let mut backoff = MIN_BACKOFF;
    loop {
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await;
        let Ok(Ok(pubsub)) = connected else {
            tracing::debug!(
                ?backoff,
                "lock wake-up subscriber cannot connect; waiters poll"
            );
            // Interests meanwhile are in the hub; the next connection subscribes to them all.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                interest = interests.recv() => if interest.is_none() { return },
            }
            backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
            continue;
        };
        let (mut sink, mut stream) = pubsub.split();
        match listen(&hub, &mut sink, &mut stream, interests, &mut backoff).await {
            Ended::HubGone => return,
            Ended::Disconnected => {
                tracing::debug!(
                    "lock wake-up subscriber disconnected; waiters poll until it is back"
                );
                let Some(hub) = hub.upgrade() else { return };
                hub.disconnected();
            }
        }
    }
}

/// The subscriber task, seen from its hub: dropped when the task ends, also when its runtime
/// shuts down mid-task (a backend shared by several runtimes). Then nothing reads the
/// subscription any more: the hub forgets this subscriber (the next watch starts another) and
/// every watch becomes unconfirmed, so its waiters retry at once and then poll.
pub(super) struct Running {
    pub(super) hub: Weak<Hub>,
    pub(super) interests: mpsc::UnboundedReceiver<Interest>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Closed first, so that the hub tells this subscriber's sender from a newer one's.
        self.interests.close();
        if let Some(hub) = self.hub.upgrade() {
            hub.subscriber_ended();
        }
    }
}

enum Ended {
    HubGone,
    Disconnected,
}

async fn listen(
    hub: &Weak<Hub>,
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    interests: &mut mpsc::UnboundedReceiver<Interest>,
    backoff: &mut Duration,
) -> Ended {
    // Whatever was asked before now is in the hub's list.
    while interests.try_recv().is_ok() {}
    let Some(watched) = hub.upgrade().map(|hub| hub.watched_keys()) else {
        return Ended::HubGone;
    };
    if !watched.is_empty() {
        let channels: Vec<String> = watched.iter().map(|key| channel(key)).collect();
        if sink.subscribe(&channels).await.is_err() {
            return Ended::Disconnected;
        }
        let Some(hub) = hub.upgrade() else {
            return Ended::HubGone;
        };
        for key in &watched {
            hub.confirm(key);
        }
    }
    *backoff = MIN_BACKOFF;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return Ended::Disconnected };
                let Some(hub) = hub.upgrade() else { return Ended::HubGone };
                let name = message.get_channel_name();
                if let Some(lock_key) = name.strip_suffix(CHANNEL_SUFFIX) {
                    hub.wake(lock_key);
                }
            }
            interest = interests.recv() => {
                let Some(interest) = interest else { return Ended::HubGone };
                match interest {
                    Interest::Watch(key) => {
                        if sink.subscribe(channel(&key)).await.is_err() {
                            return Ended::Disconnected;
                        }
                        let Some(hub) = hub.upgrade() else { return Ended::HubGone };
                        hub.confirm(&key);
                    }
                    Interest::Unwatch(key) => {
                        let Some(watched) = hub.upgrade().map(|hub| hub.is_watched(&key)) else {
                            return Ended::HubGone;
                        };
                        // Watched again since: keep the subscription.
                        if !watched && sink.unsubscribe(channel(&key)).await.is_err() {
                            return Ended::Disconnected;
                        }
                    }
                }
            }
        }
    }
}
