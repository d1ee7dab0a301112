//! Redlock: one lock over N independent Redis primaries, held while a majority of them holds it.
//!
//! Every node is a [`RedisBackend`] (its scripts, its shared connection, its pre-7.0 fallback);
//! this file only adds the quorum: calls go to every node at once, each bounded by a per-node
//! timeout, and a round ends as soon as its outcome is decided.

use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::{ErrorKind, RedisError, Script};
use tokio::time::Instant;

use super::commands::{ACQUIRE, EXTEND, RELEASE, millis, unavailable, with_fence};
use super::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, FailureReason,
    Inspect, LockBackend, LockName, LockToken, MAX_TTL, RedisBackend, RedisBackendBuilder, Release,
};

/// Raises a lock's fencing counter to ARGV[2] if it is lower, only while the lock holds our
/// token (ARGV[1], the value's first 32 characters): 1 done, 0 the lock is not ours (any more).
/// A raised counter expires as one written by the acquire does (ARGV[3] is the lock's TTL in
/// ms; see `NEXT_FENCE` in `commands.rs`): no sooner than the node's own clock has passed the token,
/// so that a token drawn on this node after the counter has gone is still larger, however far
/// another node's clock is ahead.
static RAISE_FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&with_fence(
        r"
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, 32) == ARGV[1] then
  local seen = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  local wanted = tonumber(ARGV[2])
  if seen < wanted then
    redis.call('SET', KEYS[2], ARGV[2], 'PXAT',
      string.format('%d', math.floor(wanted / 1000) + ARGV[3] + FENCE_MARGIN_MS))
  end
  return 1
end
return 0
",
    ))
});

/// Locks over N independent Redis primaries (N odd, typically 3 or 5), by the Redlock
/// algorithm: a lock is held while a majority of the nodes (the quorum) holds it.
///
/// - **Acquire** goes to every node at once, each call bounded by a per-node timeout (by default
///   a fifth of the TTL, between 5 ms and 500 ms; [`RedlockBackend::node_timeout`]). The lock is
///   ours once a majority has taken it and its validity — `ttl − elapsed − drift`, drift being
///   `0.01·ttl + 2 ms` — is still positive; the round ends then, without waiting for slower
///   nodes. A node that errors or hangs (paused, partitioned) costs at most its per-node timeout
///   and never fails a round that a majority answers. A failed round releases the lock on every
///   node that did not answer "held", so it leaves no partial locks behind.
/// - **Release** and **extend** go to every node and need a majority: an extend is
///   [`Extend::Lost`] when the nodes that no longer hold our token leave no majority, so the
///   lease-lost signal fires; when unreachable nodes are why there is no majority, it is an error
///   (renewal retries while the lease's validity lasts, as on one Redis).
/// - **Held or failed**: a round refused by a majority of the nodes that answer is
///   [`Acquire::Held`] (a 409: contention, also when racers split the votes), with the holders'
///   remaining lease: when enough of their nodes will have expired for a majority of the
///   reachable nodes to be free (from the answers in when the round was decided, nodes that
///   have not answered counted as free; read without the margin below). When fewer than a
///   majority answer, it is an error (a 503).
///
/// The nodes store each lock for `ttl·100/99 + 3 ms` (rounded up), so that the Redlock validity
/// of a lock taken in `elapsed` is at least `ttl − elapsed`: the validity the engine counts
/// (and applies [`min_validity`](crate::LockLayer::min_validity) to) is never more than the
/// Redlock validity, with no change to the [`LockBackend`] contract.
///
/// **Fencing** (on by default) costs a second parallel round: each node hands out its own next
/// token as it takes the lock (`max(counter + 1, its clock in µs)`, see the README's "Fencing
/// tokens"), the token is the maximum over the majority that took it, and that maximum is then
/// written back (raised to, never lowered) on the nodes where the lock is still ours; the lock is
/// acquired only once a majority confirmed the write-back. A node keeps a counter for the lock's
/// TTL plus a second after it last wrote it, and never past the moment its own clock has passed
/// the counter's value by that much. So any two acquisitions that both succeed get different
/// tokens, and the one that took the lock later on the nodes they share gets the larger — on the
/// shared node either the counter is still there, or it has gone and that node's clock has passed
/// the earlier token — with no assumption about how far apart the nodes' clocks are, only that
/// no node's clock steps backwards. A node restarted without persistence forgets its counters:
/// tokens still grow if its clock had passed every token it had seen before it comes back
/// (tokens from a node whose clock is ahead can be larger; keep nodes down for one TTL after a
/// crash, or run them with `appendfsync always`). Like every fencing token, it protects only
/// resources that check it.
///
/// ```no_run
/// # async fn demo() -> Result<(), redis::RedisError> {
/// let backend = tower_lock::RedlockBackend::from_urls([
///     "redis://10.0.0.1:6379/",
///     "redis://10.0.0.2:6379/",
///     "redis://10.0.0.3:6379/",
/// ])?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedlockBackend {
    nodes: Arc<[RedisBackend]>,
    node_timeout: Option<Duration>,
    /// Held while a round's calls are handed to the nodes' connections, so that every node
    /// receives this client's rounds in the same order: racing requests of one process never
    /// split the votes (the first round sent wins on every node).
    order: Arc<Mutex<()>>,
}

impl std::fmt::Debug for RedlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedlockBackend")
            .field("nodes", &self.nodes.len())
            .field("quorum", &self.quorum())
            .field("node_timeout", &self.node_timeout)
            .finish()
    }
}

impl RedlockBackend {
    /// A backend over `nodes`, independent primaries (not replicas of one another). Refuses an
    /// empty or even number of nodes: an even number tolerates no more failures than one node
    /// fewer, and costs more.
    pub fn new(nodes: impl IntoIterator<Item = RedisBackend>) -> Result<Self, RedisError> {
        let nodes: Arc<[RedisBackend]> = nodes.into_iter().collect();
        if nodes.len().is_multiple_of(2) {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "Redlock needs an odd number of nodes (3 or 5, typically)",
            )));
        }
        Ok(Self {
            nodes,
            node_timeout: None,
            order: Arc::default(),
        })
    }

    /// Like [`RedlockBackend::from_urls`], but connects now and loads the scripts on every node;
    /// fails unless a majority of the nodes can be reached within 2 s (the others are retried
    /// at each call).
    ///
    /// Prefer it: a node's first call otherwise waits for its connection and its scripts to
    /// load (`NOSCRIPT`), which reorders calls among concurrent rounds of this client, so that
    /// racing requests can split the votes and all be refused.
    pub async fn connect<S: AsRef<str>>(
        urls: impl IntoIterator<Item = S>,
    ) -> Result<Self, RedisError> {
        Self::builder(urls).connect().await
    }

    /// Loads the scripts on every node: fails unless a majority answers within 2 s.
    async fn load_scripts(self) -> Result<Self, RedisError> {
        let backend = self;
        let loads = backend.nodes.iter().map(|node| {
            let mut connection = node.connection();
            async move {
                let load = async {
                    for script in [&*ACQUIRE, &*RELEASE, &*EXTEND, &*RAISE_FENCE] {
                        script.load_async(&mut connection).await?;
                    }
                    Ok::<_, RedisError>(())
                };
                tokio::time::timeout(Duration::from_secs(2), load)
                    .await
                    .unwrap_or_else(|_| {
                        Err(RedisError::from((
                            ErrorKind::Io,
                            "redlock node did not answer within 2 s",
                        )))
                    })
            }
        });
        let loaded = futures_util::future::join_all(loads).await;
        let reached = loaded.iter().filter(|loaded| loaded.is_ok()).count();
        match loaded.into_iter().find_map(Result::err) {
            Some(error) if reached < backend.quorum() => Err(error),
            Some(error) => {
                tracing::warn!(%error, reached, nodes = backend.nodes.len(), "redlock: a node is unreachable");
                Ok(backend)
            }
            None => Ok(backend),
        }
    }

    /// A backend over the primaries at `urls`, each reached as [`RedisBackend::from_url`] does:
    /// connections open lazily and reopen after failures, so this succeeds while nodes are down.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as [`RedisBackend::from_url`].
    pub fn from_urls<S: AsRef<str>>(urls: impl IntoIterator<Item = S>) -> Result<Self, RedisError> {
        Self::builder(urls).build()
    }

    /// A backend over the primaries at `urls`, with more settings than
    /// [`RedlockBackend::from_urls`] takes: a CA of your own for `rediss://` nodes, a client
    /// certificate. Each node gets the settings of
    /// [`RedisBackend::builder`](super::RedisBackend::builder) (one code path for TLS).
    ///
    /// ```no_run
    /// # #[cfg(feature = "tls-rustls")]
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = std::fs::read("/etc/redis/ca.pem")?;
    /// let backend = tower_lock::RedlockBackend::builder([
    ///     "rediss://10.0.0.1:6380/",
    ///     "rediss://10.0.0.2:6380/",
    ///     "rediss://10.0.0.3:6380/",
    /// ])
    /// .trust_ca_pem(ca)
    /// .connect()
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder<S: AsRef<str>>(urls: impl IntoIterator<Item = S>) -> RedlockBackendBuilder {
        RedlockBackendBuilder {
            nodes: urls
                .into_iter()
                .map(|url| RedisBackend::builder(url.as_ref()))
                .collect(),
        }
    }

    /// Bounds every call to one node by `timeout` instead of the default (a fifth of the TTL,
    /// between 5 ms and 500 ms: a fenced acquire's two rounds, at worst, leave 60 % of the TTL). Keep it well under the TTL: a round that waits for a slow node
    /// spends the lock's validity.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = Some(timeout.min(MAX_TTL));
        self
    }

    /// How many nodes.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// How many nodes must agree: a majority.
    pub fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    fn timeout_for(&self, ttl: Duration) -> Duration {
        self.node_timeout.unwrap_or_else(|| {
            (ttl / 5).clamp(Duration::from_millis(5), Duration::from_millis(500))
        })
    }

    /// How many nodes may refuse before a majority is out of reach.
    fn spare(&self) -> usize {
        self.nodes.len() - self.quorum()
    }

    fn all(&self) -> Vec<usize> {
        (0..self.nodes.len()).collect()
    }
}

/// How long the nodes keep a lock whose lease is `ttl`: long enough that its Redlock validity
/// after `elapsed` (`stored − elapsed − drift(stored)`) is at least `ttl − elapsed`.
fn stored_ttl(ttl: Duration) -> Duration {
    let ms = millis(ttl.min(MAX_TTL));
    Duration::from_millis((ms + 2).saturating_mul(100).div_ceil(99) + 1)
}

/// How long a holder's lease has left, as its engine counts it, when a node keeps its lock for
/// `on_node` more: without the margin [`stored_ttl`] added (within a millisecond).
fn lease_left(on_node: Duration) -> Duration {
    let ms = u64::try_from(on_node.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis((ms / 100).saturating_mul(99) + ms % 100 * 99 / 100)
        .saturating_sub(Duration::from_millis(3))
}

/// The clock drift Redlock allows for a lock stored for `ttl`: `0.01·ttl + 2 ms`.
fn drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// What one node answered: `None` when it was not asked, or had not answered when the round's
/// outcome was decided.
type Answer<T> = Option<Result<T, BackendError>>;

/// Calls `call` on the nodes numbered `targets` at once, each call bounded by `timeout`, and
/// returns the answers (indexed by node) once `decided(answers, still pending)` holds or every
/// node has answered. Calls still running then go on in the background (within their timeout),
/// so that what they sent lands or fails as it would have, and later calls on the same
/// connection follow it.
async fn gather<T: Send + 'static>(
    backend: &RedlockBackend,
    targets: &[usize],
    timeout: Duration,
    call: impl Fn(&RedisBackend) -> BackendFuture<T>,
    decided: impl Fn(&[Answer<T>], usize) -> bool,
) -> Vec<Answer<T>> {
    let nodes = &backend.nodes;
    let mut answers: Vec<Answer<T>> = nodes.iter().map(|_| None).collect();
    let mut calls: Vec<_> = targets
        .iter()
        .map(|&node| {
            let call = tokio::time::timeout(timeout, call(&nodes[node]));
            Box::pin(async move {
                let answer = call
                    .await
                    .unwrap_or_else(|_| Err(BackendError::timeout("redlock node call", timeout)));
                (node, answer)
            })
        })
        .collect();
    // The first poll of each call hands its command to the node's connection (when connected):
    // all of them under the lock, so that the nodes see this client's rounds in one order.
    std::future::poll_fn(|cx| {
        let _in_order = backend.order.lock().unwrap_or_else(PoisonError::into_inner);
        calls.retain_mut(|call| match call.as_mut().poll(cx) {
            Poll::Ready((node, answer)) => {
                answers[node] = Some(answer);
                false
            }
            Poll::Pending => true,
        });
        Poll::Ready(())
    })
    .await;
    let mut pending: FuturesUnordered<_> = calls.into_iter().collect();
    while !decided(&answers, pending.len()) {
        let Some((node, answer)) = pending.next().await else {
            break;
        };
        answers[node] = Some(answer);
    }
    if !pending.is_empty()
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        runtime.spawn(async move { while pending.next().await.is_some() {} });
    }
    answers
}

fn count<T>(answers: &[Answer<T>], what: impl Fn(&T) -> bool) -> usize {
    answers
        .iter()
        .filter(|answer| matches!(answer, Some(Ok(value)) if what(value)))
        .count()
}

fn answered<T>(answers: &[Answer<T>]) -> usize {
    count(answers, |_| true)
}

impl RedlockBackend {
    /// `call` on every node, each bounded by the longest per-node timeout; the answers, or an
    /// error when fewer than a majority of the nodes answered.
    async fn ask_every_node<T: Send + 'static>(
        &self,
        operation: &str,
        call: impl Fn(&RedisBackend) -> BackendFuture<T>,
    ) -> Result<Vec<Answer<T>>, BackendError> {
        let answers = gather(
            self,
            &self.all(),
            self.timeout_for(MAX_TTL),
            call,
            |_, _| false,
        )
        .await;
        if answered(&answers) < self.quorum() {
            return Err(no_quorum(
                operation,
                answered(&answers),
                self.nodes.len(),
                self.quorum(),
            )
            .with_reason(shared_reason(&answers)));
        }
        Ok(answers)
    }
}

/// Whether a node answered `NOSCRIPT`: it had lost the script, ran nothing, and loads it with
/// its next acquire.
fn lost_its_script<T>(answer: &Answer<T>) -> bool {
    // redis-rs writes the error's code as `NoScript` (its kind).
    matches!(answer, Some(Err(error)) if {
        let text = error.to_string();
        text.contains("NoScript") || text.contains("NOSCRIPT")
    })
}

fn no_quorum(operation: &str, answered: usize, nodes: usize, quorum: usize) -> BackendError {
    BackendError::new(
        BackendErrorKind::Unavailable,
        format_args!("redlock {operation}: {answered} of {nodes} nodes answered, {quorum} needed"),
    )
}

/// The reason every failed node gave, when they agree (all refused, say); else
/// [`FailureReason::Other`].
fn shared_reason<T>(answers: &[Answer<T>]) -> FailureReason {
    let mut reasons = answers.iter().filter_map(|answer| match answer {
        Some(Err(error)) => Some(error.reason()),
        _ => None,
    });
    let first = reasons.next().unwrap_or(FailureReason::Other);
    if reasons.all(|reason| reason == first) {
        first
    } else {
        FailureReason::Other
    }
}

/// When a lock held on the nodes whose remaining leases are `held` (`None`: no expiry) leaves
/// `spare` or fewer of them, so that a majority is free: the `held − spare`-th expiry.
fn majority_free_in(mut held: Vec<Option<Duration>>, spare: usize) -> Option<Duration> {
    held.sort_by_key(|remaining| remaining.unwrap_or(Duration::MAX));
    let nth = held.len().checked_sub(spare + 1)?;
    held[nth]
}

fn holders<T>(
    answers: &[Answer<T>],
    remaining: impl Fn(&T) -> Option<Option<Duration>>,
) -> Vec<Option<Duration>> {
    answers
        .iter()
        .filter_map(|answer| match answer {
            Some(Ok(value)) => remaining(value),
            _ => None,
        })
        .collect()
}

impl RedlockBackend {
    async fn acquire_on_majority(
        self,
        name: LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> Result<Acquire, BackendError> {
        Box::pin(self.acquire_round(name, token, options, true)).await
    }

    /// One round of [`acquire_on_majority`](Self::acquire_on_majority); `first`: a round that
    /// may be followed by one more when nodes that lost their scripts (restarted empty,
    /// `SCRIPT FLUSH`) answered `NOSCRIPT` and so left no majority. Each node's acquire is sent
    /// once (see `Commands::acquire_once`): those nodes load the script with their acquire of
    /// the next round, which follows this round's clean-up on every connection.
    async fn acquire_round(
        self,
        name: LockName,
        token: LockToken,
        options: AcquireOptions,
        first: bool,
    ) -> Result<Acquire, BackendError> {
        let started = Instant::now();
        let quorum = self.quorum();
        let timeout = self.timeout_for(options.ttl);
        let stored = stored_ttl(options.ttl);
        let on_nodes = AcquireOptions::new(stored).fencing(options.fencing);
        let is_ours = |outcome: &Acquire| matches!(outcome, Acquire::Acquired { .. });
        let answers = gather(
            &self,
            &self.all(),
            timeout,
            |node| node.acquire_once(&name, token, on_nodes),
            |answers, pending| {
                // Ours; or not ours, and known to be refused by a majority of the nodes that
                // answer (held) or to lack a majority that answers (unavailable).
                let ours = count(answers, is_ours);
                let answered = answered(answers);
                ours >= quorum
                    || (ours + pending < quorum
                        && (answered >= quorum || answered + pending < quorum))
            },
        )
        .await;
        let ours: Vec<usize> = (0..answers.len())
            .filter(|&node| matches!(&answers[node], Some(Ok(outcome)) if is_ours(outcome)))
            .collect();
        if ours.len() >= quorum {
            let fencing_token = if options.fencing {
                self.raise_fences(&name, token, &answers, &ours, timeout, stored)
                    .await
            } else {
                Some(0)
            };
            let validity = stored
                .saturating_sub(started.elapsed())
                .saturating_sub(drift(stored));
            match fencing_token {
                Some(fencing_token) if !validity.is_zero() => {
                    return Ok(Acquire::Acquired { fencing_token });
                }
                _ => {}
            }
            self.clean_up(&name, token, options.ttl, self.all(), &ours)
                .await;
            return Err(match fencing_token {
                Some(_) => BackendError::new(
                    BackendErrorKind::Timeout,
                    format_args!(
                        "redlock acquire: the lock's validity ran out in the round ({:?})",
                        started.elapsed()
                    ),
                ),
                None => BackendError::new(
                    BackendErrorKind::Unavailable,
                    "redlock acquire: fewer than a majority confirmed the fencing token",
                ),
            });
        }
        // A failed round: undo it wherever the lock may be ours (taken, or outcome unknown).
        let held = holders(&answers, |outcome| match outcome {
            Acquire::Held { remaining } => Some(remaining.map(lease_left)),
            Acquire::Acquired { .. } => None,
        });
        // A node that answered `NOSCRIPT` ran nothing: nothing to undo there.
        let maybe_ours: Vec<usize> = (0..answers.len())
            .filter(|&node| {
                !matches!(&answers[node], Some(Ok(Acquire::Held { .. })))
                    && !lost_its_script(&answers[node])
            })
            .collect();
        let answered = answered(&answers);
        // Nodes that lost their scripts left no majority: one more round, in which they load
        // the script with their acquire. Its clean-up first, on every node it went to (not in
        // the background): the next round reuses the token, so no release of this one may
        // land after that round's acquire.
        let again = first && answered < quorum && answers.iter().any(lost_its_script);
        let known = if again { maybe_ours.clone() } else { ours };
        self.clean_up(&name, token, options.ttl, maybe_ours, &known)
            .await;
        // Refused by a majority of the nodes that answered: contention (409), not an outage. A
        // node that has not answered yet counts as one that will be free.
        if answered >= quorum {
            let failed = answers.iter().filter(|a| matches!(a, Some(Err(_)))).count();
            let reachable = self.nodes.len() - failed;
            Ok(Acquire::Held {
                remaining: majority_free_in(held, reachable - quorum),
            })
        } else if again {
            Box::pin(self.acquire_round(name, token, options, false)).await
        } else {
            Err(no_quorum("acquire", answered, self.nodes.len(), quorum)
                .with_reason(shared_reason(&answers)))
        }
    }

    /// The fencing token of an acquisition that took the lock on the nodes `ours` (a majority):
    /// the maximum of their counters, raised to on those nodes while they still hold our token.
    /// `None` unless a majority confirmed it.
    async fn raise_fences(
        &self,
        name: &LockName,
        token: LockToken,
        answers: &[Answer<Acquire>],
        ours: &[usize],
        timeout: Duration,
        ttl: Duration,
    ) -> Option<u64> {
        let fencing_token = answers
            .iter()
            .filter_map(|answer| match answer {
                Some(Ok(Acquire::Acquired { fencing_token })) => Some(*fencing_token),
                _ => None,
            })
            .max()?;
        let quorum = self.quorum();
        let confirmed = gather(
            self,
            ours,
            timeout,
            |node| {
                let mut connection = node.connection();
                let mut invocation = RAISE_FENCE.key(name.lock_key());
                invocation
                    .key(name.fence_key())
                    .arg(token.to_hex())
                    .arg(fencing_token)
                    .arg(millis(ttl));
                Box::pin(async move {
                    let raised: i64 = invocation
                        .invoke_async(&mut connection)
                        .await
                        .map_err(unavailable)?;
                    Ok(raised == 1)
                })
            },
            |answers, pending| {
                let raised = count(answers, |raised| *raised);
                raised >= quorum || raised + pending < quorum
            },
        )
        .await;
        (count(&confirmed, |raised| *raised) >= quorum).then_some(fencing_token)
    }

    /// Releases what a failed round may have taken on `nodes`; waits for the nodes in `known`
    /// (they answered: the lock is there), and lets the others finish in the background.
    async fn clean_up(
        &self,
        name: &LockName,
        token: LockToken,
        ttl: Duration,
        nodes: Vec<usize>,
        known: &[usize],
    ) {
        let stored = stored_ttl(ttl);
        let answers = gather(
            self,
            &nodes,
            self.timeout_for(ttl),
            |node| node.release_abandoned(name, token, stored),
            |answers, _| known.iter().all(|&node| answers[node].is_some()),
        )
        .await;
        for error in answers.into_iter().flatten().filter_map(Result::err) {
            tracing::debug!(%error, "redlock: a node's clean-up after a failed round failed");
        }
    }

    async fn release_on_majority(
        self,
        name: LockName,
        token: LockToken,
        abandoned_ttl: Option<Duration>,
    ) -> Result<Release, BackendError> {
        let quorum = self.quorum();
        let ttl = abandoned_ttl.unwrap_or(MAX_TTL);
        let answers = gather(
            &self,
            &self.all(),
            self.timeout_for(ttl),
            |node| match abandoned_ttl {
                Some(ttl) => node.release_abandoned(&name, token, stored_ttl(ttl)),
                None => node.release(&name, token),
            },
            |answers, _| count(answers, |release| *release == Release::Released) >= quorum,
        )
        .await;
        if count(&answers, |release| *release == Release::Released) >= quorum {
            Ok(Release::Released)
        } else if answered(&answers) < quorum {
            Err(
                no_quorum("release", answered(&answers), self.nodes.len(), quorum)
                    .with_reason(shared_reason(&answers)),
            )
        } else if count(&answers, |release| *release == Release::HeldByOther) >= quorum {
            Ok(Release::HeldByOther)
        } else {
            Ok(Release::Expired)
        }
    }

    async fn extend_on_majority(
        self,
        name: LockName,
        token: LockToken,
        ttl: Duration,
    ) -> Result<Extend, BackendError> {
        let quorum = self.quorum();
        let spare = self.spare();
        let stored = stored_ttl(ttl);
        let answers = gather(
            &self,
            &self.all(),
            self.timeout_for(ttl),
            |node| node.extend(&name, token, stored),
            |answers, pending| {
                count(answers, |extend| *extend == Extend::Extended) >= quorum
                    || count(answers, |extend| *extend == Extend::Lost) > spare
                    || pending == 0
            },
        )
        .await;
        if count(&answers, |extend| *extend == Extend::Extended) >= quorum {
            Ok(Extend::Extended)
        } else if count(&answers, |extend| *extend == Extend::Lost) > spare {
            Ok(Extend::Lost)
        } else {
            Err(no_quorum(
                "extend",
                count(&answers, |extend| *extend == Extend::Extended),
                self.nodes.len(),
                quorum,
            )
            .with_reason(shared_reason(&answers)))
        }
    }
}

/// Settings for a [`RedlockBackend`] beyond its nodes' URLs: from [`RedlockBackend::builder`].
#[derive(Clone, Debug)]
pub struct RedlockBackendBuilder {
    /// One per node (never printed with their URLs: see [`RedisBackendBuilder`]'s `Debug`).
    nodes: Vec<RedisBackendBuilder>,
}

impl RedlockBackendBuilder {
    /// Trusts the CA certificates in `pem` for every `rediss://` node, instead of the
    /// platform's roots, as [`RedisBackendBuilder::trust_ca_pem`] does for one.
    #[cfg(feature = "tls-rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls-rustls")))]
    pub fn trust_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        let pem = pem.into();
        self.nodes = self
            .nodes
            .into_iter()
            .map(|node| node.trust_ca_pem(pem.clone()))
            .collect();
        self
    }

    /// Presents the client certificate chain `cert` with its private key `key` (both PEM) to
    /// every node, as [`RedisBackendBuilder::client_certificate_pem`] does for one.
    #[cfg(feature = "tls-rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls-rustls")))]
    pub fn client_certificate_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        let (cert, key) = (cert.into(), key.into());
        self.nodes = self
            .nodes
            .into_iter()
            .map(|node| node.client_certificate_pem(cert.clone(), key.clone()))
            .collect();
        self
    }

    /// The backend, connecting lazily, as [`RedlockBackend::from_urls`]. Refuses an even
    /// number of nodes, certificates for nodes that are not `rediss://`, and `rediss://` nodes
    /// without the `tls-rustls` feature.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as [`RedisBackend::from_url`].
    pub fn build(self) -> Result<RedlockBackend, RedisError> {
        let nodes = self
            .nodes
            .into_iter()
            .map(RedisBackendBuilder::build)
            .collect::<Result<Vec<_>, _>>()?;
        RedlockBackend::new(nodes)
    }

    /// The backend, connected now and its scripts loaded, as [`RedlockBackend::connect`]: fails
    /// unless a majority of the nodes accept it within 2 s (a node whose certificate is not
    /// trusted counts as unreachable).
    pub async fn connect(self) -> Result<RedlockBackend, RedisError> {
        self.build()?.load_scripts().await
    }
}

impl LockBackend for RedlockBackend {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        Box::pin(
            self.clone()
                .acquire_on_majority(name.clone(), token, options),
        )
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        Box::pin(self.clone().release_on_majority(name.clone(), token, None))
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        Box::pin(self.clone().extend_on_majority(name.clone(), token, ttl))
    }

    /// Releases on every node, as [`LockBackend::release_abandoned`] on each.
    fn release_abandoned(
        &self,
        name: &LockName,
        token: LockToken,
        ttl: Duration,
    ) -> BackendFuture<Release> {
        Box::pin(
            self.clone()
                .release_on_majority(name.clone(), token, Some(ttl)),
        )
    }

    /// Held when so many nodes hold the lock that no majority is free; its remaining lease is
    /// when enough of them will have expired.
    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        let this = self.clone();
        let name = name.clone();
        Box::pin(async move {
            let answers = this
                .ask_every_node("inspect", |node| node.inspect(&name))
                .await?;
            let held = holders(&answers, |inspect| match inspect {
                Inspect::Held { remaining } => Some(remaining.map(lease_left)),
                Inspect::Free => None,
            });
            Ok(if held.len() > this.spare() {
                Inspect::Held {
                    remaining: majority_free_in(held, this.spare()),
                }
            } else {
                Inspect::Free
            })
        })
    }

    /// Deletes the lock key on every node (never the fencing counters); `true` if it was on any.
    /// Needs a majority of the nodes to answer.
    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        let this = self.clone();
        let name = name.clone();
        Box::pin(async move {
            let answers = this
                .ask_every_node("force_release", |node| node.force_release(&name))
                .await?;
            Ok(count(&answers, |deleted| *deleted) > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_fails_for_the_reason_its_failed_nodes_agree_on() {
        let failed = |reason| {
            Some(Err(
                BackendError::new(BackendErrorKind::Unavailable, "x").with_reason(reason)
            ))
        };
        let refused: Vec<Answer<()>> = vec![
            failed(FailureReason::Refused),
            None,
            failed(FailureReason::Refused),
            Some(Ok(())),
        ];
        assert_eq!(shared_reason(&refused), FailureReason::Refused);
        let mixed: Vec<Answer<()>> =
            vec![failed(FailureReason::Refused), failed(FailureReason::Tls)];
        assert_eq!(shared_reason(&mixed), FailureReason::Other);
        assert_eq!(
            shared_reason::<()>(&[None, Some(Ok(()))]),
            FailureReason::Other
        );
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_stored_lease_covers_the_ttl_after_drift() {
        for ttl_ms in [
            10,
            11,
            99,
            100,
            1_000,
            10_000,
            123_457,
            365 * 24 * 3600 * 1000,
        ] {
            let ttl = Duration::from_millis(ttl_ms);
            let stored = stored_ttl(ttl);
            assert!(
                stored.saturating_sub(drift(stored)) >= ttl,
                "{ttl:?}: {stored:?}"
            );
            // And not much more: about 1 % and a few milliseconds.
            assert!(stored <= ttl + ttl / 99 + 5 * MS, "{ttl:?}: {stored:?}");
        }
        // Absurd TTLs are clamped first, and nothing overflows.
        assert!(stored_ttl(Duration::MAX) <= MAX_TTL + MAX_TTL / 50);
    }

    #[test]
    fn a_holders_lease_is_read_without_the_stored_margin() {
        for ttl_ms in [
            10,
            11,
            99,
            100,
            1_000,
            5_000,
            10_000,
            123_457,
            365 * 24 * 3600 * 1000,
        ] {
            let ttl = Duration::from_millis(ttl_ms);
            let left = lease_left(stored_ttl(ttl));
            assert!(left <= ttl && left + MS >= ttl, "{ttl:?}: {left:?}");
        }
        assert_eq!(lease_left(Duration::ZERO), Duration::ZERO);
        assert!(lease_left(Duration::MAX) > MAX_TTL);
    }

    #[test]
    fn a_majority_is_free_when_the_spare_count_of_holders_is_left() {
        let held = vec![Some(300 * MS), Some(100 * MS), None, Some(200 * MS)];
        // Of 5 nodes (2 spare), 4 hold it: 2 must expire, the second soonest does at 200 ms.
        assert_eq!(majority_free_in(held.clone(), 2), Some(200 * MS));
        // Of 3 nodes (1 spare)... 4 holders cannot happen, but the rule still reads: 3 expire.
        assert_eq!(majority_free_in(held, 1), Some(300 * MS));
        // A holder without expiry among those that must expire: no hint.
        assert_eq!(majority_free_in(vec![None, None, Some(MS)], 2), Some(MS));
        assert_eq!(majority_free_in(vec![None, None, Some(MS)], 1), None);
        // Not held by enough nodes to matter.
        assert_eq!(majority_free_in(vec![Some(MS)], 2), None);
    }

    #[test]
    fn the_node_timeout_is_a_fifth_of_the_ttl_within_bounds() {
        let backend = RedlockBackend {
            nodes: Arc::from(Vec::new()),
            node_timeout: None,
            order: Arc::default(),
        };
        assert_eq!(backend.timeout_for(Duration::from_secs(1)), 200 * MS);
        assert_eq!(backend.timeout_for(Duration::from_secs(10)), 500 * MS);
        assert_eq!(backend.timeout_for(10 * MS), 5 * MS);
        let fixed = backend.node_timeout(Duration::from_millis(42));
        assert_eq!(fixed.timeout_for(Duration::from_secs(10)), 42 * MS);
    }
}
