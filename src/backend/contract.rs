//! The contract every backend keeps (see the [module docs](super)): the [`LockBackend`] trait,
//! what its calls return, and the names and tokens they take.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::Wakeups;

/// The shortest lease a layer takes: a shorter one could not be renewed before it runs out.
pub const MIN_TTL: Duration = Duration::from_millis(10);

/// The longest lease a layer takes (365 days): every backend can keep a lease that long, and
/// deadlines that far ahead never overflow a clock. Longer TTLs are clamped to it.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The boxed future every backend operation returns. `'static` so that a release can be spawned
/// from a `Drop`.
pub type BackendFuture<T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'static>>;

/// A store of locks. See the [module docs](crate::backend) for the contract.
pub trait LockBackend: Clone + Send + Sync + 'static {
    /// Tries to take `name` for `token` for `options.ttl`, bumping the fencing counter of `name`
    /// when `options.fencing` is set. One round trip on networked backends.
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire>;

    /// Releases `name` if (and only if) it still holds `token`.
    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release>;

    /// Resets the expiry of `name` to `ttl` if (and only if) it still holds `token`.
    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend>;

    /// Cleans up after an acquire of `name` for `token` (with lease `ttl`) whose outcome is
    /// unknown — it timed out, failed, or was dropped mid-flight: deletes the lock if it holds
    /// `token`, like [`LockBackend::release`]. A backend whose late acquires could overtake this
    /// call can do more here (the built-in backends do not: on Redis the clean-up follows the
    /// acquire on the same connection, and an acquire that lands after a broken connection's
    /// clean-up holds the key for one TTL at most).
    ///
    /// The default is [`LockBackend::release`].
    fn release_abandoned(
        &self,
        name: &LockName,
        token: LockToken,
        ttl: Duration,
    ) -> BackendFuture<Release> {
        let _ = ttl;
        self.release(name, token)
    }

    /// Whether `name` is held now, and for how long its holder's lease lasts (Redis `PTTL`).
    /// Reads only; for [`Locks::inspect`](crate::Locks::inspect) and
    /// [`Locks::is_locked`](crate::Locks::is_locked).
    ///
    /// The default answers an error of kind [`BackendErrorKind::Unsupported`].
    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        let _ = name;
        unsupported("inspect")
    }

    /// Deletes the lock `name` whoever holds it (Redis `DEL` of the lock key, never of its
    /// fencing counter); `true` if a held lock was deleted. An operator's tool: the holder keeps
    /// running and learns of the loss at its next renewal at best. For
    /// [`Locks::force_unlock`](crate::Locks::force_unlock).
    ///
    /// The default answers an error of kind [`BackendErrorKind::Unsupported`].
    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        let _ = name;
        unsupported("force_release")
    }

    /// How this backend wakes the waiters of this process when a lock is released (see
    /// [`Wakeups`]): one per backend, shared by its clones. Waiting
    /// ([`Locks::lock`](crate::Locks::lock), `wait` on layers and policies) works without it, by
    /// polling bounded by the holder's remaining lease.
    ///
    /// The default is `None`: waiters poll.
    fn wakeups(&self) -> Option<Wakeups> {
        None
    }
}

fn unsupported<T: Send + 'static>(operation: &str) -> BackendFuture<T> {
    let error = BackendError::new(
        BackendErrorKind::Unsupported,
        format_args!("this lock backend does not implement `{operation}`"),
    );
    Box::pin(std::future::ready(Err(error)))
}

/// How to acquire a lock. New fields arrive with defaults, so build it with [`AcquireOptions::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcquireOptions {
    /// The lease: the lock expires this long after acquisition unless extended.
    pub ttl: Duration,
    /// Whether to hand out a fencing token (on Redis one counter key per lock key, which expires a
    /// second after the lock's TTL; see the README's "Fencing tokens").
    pub fencing: bool,
    /// Whether the caller waits for the lock if it is held (the engine sets it on the attempts
    /// of a waiting request after its first one). A backend that wakes waiters may record then
    /// that someone waits, so that only such a lock's release wakes anyone: on Redis the attempt
    /// marks the holder's lock value, and only a marked lock's release publishes. `false` (the
    /// default, and every fail-fast request) costs nothing extra.
    pub waiting: bool,
}

impl AcquireOptions {
    /// A lease of `ttl`, with fencing, not waiting.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            fencing: true,
            waiting: false,
        }
    }

    /// Whether to hand out a fencing token.
    pub fn fencing(mut self, fencing: bool) -> Self {
        self.fencing = fencing;
        self
    }

    /// Whether the caller waits for the lock if it is held (see [`AcquireOptions::waiting`]).
    pub fn waiting(mut self, waiting: bool) -> Self {
        self.waiting = waiting;
        self
    }
}

/// The outcome of [`LockBackend::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The lock is ours. `fencing_token` is larger than every token handed out before for this
    /// name (see the README's "Fencing" section for when that holds), or 0 without fencing.
    Acquired {
        /// The fencing token of this acquisition.
        fencing_token: u64,
    },
    /// Someone else holds the lock.
    Held {
        /// How long the holder's lease has left, when the backend knows (`None` for a lock stored
        /// without expiry by someone else). A hint for `Retry-After`: a backend may read it from
        /// what the holder recorded (see [`TryLockError::Held`](crate::TryLockError::Held)).
        remaining: Option<Duration>,
    },
}

/// The outcome of [`LockBackend::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Our lock was deleted.
    Released,
    /// The lock had already expired; nothing was deleted.
    Expired,
    /// The lock had expired and someone else took it; theirs was left alone.
    HeldByOther,
}

/// The outcome of [`LockBackend::inspect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inspect {
    /// Nobody holds the lock.
    Free,
    /// Someone holds the lock.
    Held {
        /// How long the holder's lease has left, when the backend knows (`None` for a lock stored
        /// without expiry by someone else).
        remaining: Option<Duration>,
    },
}

/// The outcome of [`LockBackend::extend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Our lease was extended.
    Extended,
    /// The lock is gone or held by someone else: our lease is lost.
    Lost,
}

/// The full name of a lock in a backend: namespace, hash-tagged key, and the name of its fencing
/// counter. Cheap to clone.
///
/// For key `account:42` in namespace `tower-lock:` the lock is `tower-lock:{account:42}` and its
/// fencing counter `tower-lock:{account:42}:fence`: both in the same Redis Cluster hash slot.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LockName(
    /// The fencing counter's name, whose prefix is the lock's name: one allocation per name.
    Arc<str>,
);

/// What the fencing counter's name adds to the lock's.
const FENCE_SUFFIX: &str = ":fence";

thread_local! {
    /// Where names are written before they are copied into their `Arc`, so that a name costs one
    /// allocation.
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl LockName {
    /// The name for `key` (already escaped and bounded) in `namespace`.
    pub(crate) fn new(namespace: &str, key: &str) -> Self {
        let write = |text: &mut String| {
            text.push_str(namespace);
            text.push('{');
            text.push_str(key);
            text.push('}');
            text.push_str(FENCE_SUFFIX);
        };
        let shared = SCRATCH.try_with(|scratch| {
            // Not re-entered (nothing here calls back), but a name is never worth a panic.
            let mut scratch = scratch.try_borrow_mut().ok()?;
            scratch.clear();
            write(&mut scratch);
            let name = Arc::from(scratch.as_str());
            // Keep the scratch buffer small after a huge name.
            if scratch.capacity() > 4096 {
                *scratch = String::new();
            }
            Some(name)
        });
        Self(shared.ok().flatten().unwrap_or_else(|| {
            let mut text = String::new();
            write(&mut text);
            Arc::from(text)
        }))
    }

    /// The name of the lock itself.
    pub fn lock_key(&self) -> &str {
        let end = self.0.len().saturating_sub(FENCE_SUFFIX.len());
        self.0.get(..end).unwrap_or_default()
    }

    /// The name of the lock's fencing counter.
    pub fn fence_key(&self) -> &str {
        &self.0
    }

    /// How the lock is named in traces: the full name when `log_keys`, else its fingerprint.
    /// Computed only when it is written (a trace that is off costs nothing).
    pub(crate) fn label(&self, log_keys: bool) -> Label<'_> {
        Label {
            name: self,
            log_keys,
        }
    }

    /// A short, stable fingerprint of the name, for logs that must not carry key material.
    pub fn fingerprint(&self) -> String {
        self.label(false).to_string()
    }

    /// Writes the fingerprint: the first 6 bytes of the SHA-256 of the lock key, in hex.
    fn write_fingerprint(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.lock_key().as_bytes());
        digest[..6].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// How a lock is named in traces ([`LockName::label`]): written when a trace is, never before.
#[derive(Clone, Copy)]
pub(crate) struct Label<'a> {
    name: &'a LockName,
    log_keys: bool,
}

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.log_keys {
            f.write_str(self.name.lock_key())
        } else {
            self.name.write_fingerprint(f)
        }
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LockName")
            .field(&self.fingerprint())
            .finish()
    }
}

/// 128 random bits identifying one acquisition. Only the holder of the token can release or
/// extend the lock.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken(u128);

impl LockToken {
    /// A fresh token from the thread-local CSPRNG.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The token as 32 lowercase hex digits, as stored in Redis.
    pub fn to_hex(self) -> String {
        self.hex().iter().map(|&digit| char::from(digit)).collect()
    }

    /// The token as 32 lowercase hex digits, in a buffer on the stack: what the Redis commands
    /// send, without a `String` per command.
    pub(crate) fn hex(self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = DIGITS[((self.0 >> ((31 - i) * 4)) & 0xf) as usize];
        }
        hex
    }

    /// The token written by [`LockToken::to_hex`]: exactly 32 hex digits (either case); `None`
    /// for anything else. For operators' tools that act on a lock whose token they logged or read
    /// from Redis.
    ///
    /// ```
    /// use tower_lock::backend::LockToken;
    ///
    /// let token = LockToken::random();
    /// assert_eq!(LockToken::from_hex(&token.to_hex()), Some(token));
    /// assert_eq!(LockToken::from_hex("not a token"), None);
    /// ```
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(hex, 16).ok().map(Self)
    }
}

impl fmt::Debug for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a full token: it is a capability to release someone's lock.
        write!(f, "LockToken({:08x}…)", (self.0 >> 96) as u32)
    }
}

/// A backend failure: unreachable, timed out, or an unexpected reply. Distinct from "held".
///
/// Its [`kind`](BackendError::kind) says how the operation failed, its
/// [`reason`](BackendError::reason) what happened on the way to the store (refused, timed out,
/// denied, TLS), which the default 503 tells clients without the message itself.
#[derive(Debug, Clone)]
pub struct BackendError {
    kind: BackendErrorKind,
    reason: FailureReason,
    message: Arc<str>,
    /// Known never to have reached the store (its connection was refused before the command
    /// went out): an acquire failing so took nothing, and needs no clean-up release.
    never_sent: bool,
}

/// What kind of failure a [`BackendError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The operation did not finish within its timeout.
    Timeout,
    /// The backend could not be reached or answered with an error.
    Unavailable,
    /// The backend answered something this crate does not understand.
    Protocol,
    /// The backend does not implement this operation (a provided method of [`LockBackend`]
    /// that it does not override).
    Unsupported,
}

/// What happened on the way to the store, as far as the backend can tell: for operators (and the
/// 503's `detail`) to tell a stopped Redis from a wrong password or an untrusted certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureReason {
    /// Nothing more specific is known.
    Other,
    /// The connection was refused, reset or closed: nothing listens at the address, or the
    /// server went away.
    Refused,
    /// The store did not answer in time: connecting, answering, or within the lock's own
    /// timeout.
    TimedOut,
    /// The store refused the credentials (`WRONGPASS`, `NOAUTH`) or an ACL forbids a command or
    /// key (`NOPERM`).
    Denied,
    /// The TLS handshake failed: a certificate that is not trusted, expired or for another name,
    /// or TLS spoken to a port that does not speak it.
    Tls,
}

impl BackendError {
    /// A new error of `kind`; its reason is [`FailureReason::TimedOut`] for a
    /// [`BackendErrorKind::Timeout`], else [`FailureReason::Other`] (see
    /// [`BackendError::with_reason`]).
    pub fn new(kind: BackendErrorKind, message: impl fmt::Display) -> Self {
        Self {
            kind,
            reason: match kind {
                BackendErrorKind::Timeout => FailureReason::TimedOut,
                _ => FailureReason::Other,
            },
            message: message.to_string().into(),
            never_sent: false,
        }
    }

    /// The same error, known never to have reached the store (see [`never_sent`](Self::never_sent)).
    pub(crate) fn unsent(mut self) -> Self {
        self.never_sent = true;
        self
    }

    /// The same error, which may have reached the store (a call that a client may have sent
    /// before a later attempt was refused).
    pub(crate) fn maybe_sent(mut self) -> Self {
        self.never_sent = false;
        self
    }

    /// Whether the operation is known never to have reached the store: its connection was
    /// refused before anything was sent.
    pub(crate) fn never_sent(&self) -> bool {
        self.never_sent
    }

    /// The same error with `reason`.
    ///
    /// ```
    /// use tower_lock::backend::{BackendError, BackendErrorKind, FailureReason};
    ///
    /// let error = BackendError::new(BackendErrorKind::Unavailable, "connection refused")
    ///     .with_reason(FailureReason::Refused);
    /// assert_eq!(error.reason(), FailureReason::Refused);
    /// assert_eq!(error.kind(), BackendErrorKind::Unavailable);
    /// ```
    pub fn with_reason(mut self, reason: FailureReason) -> Self {
        self.reason = reason;
        self
    }

    pub(crate) fn timeout(what: &str, after: Duration) -> Self {
        Self::new(
            BackendErrorKind::Timeout,
            format_args!("{what} timed out after {after:?}"),
        )
    }

    /// The kind of failure.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// What happened on the way to the store.
    pub fn reason(&self) -> FailureReason {
        self.reason
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BackendError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_and_fence_share_a_hash_tag() {
        let name = LockName::new("tower-lock:", "account:42");
        assert_eq!(name.lock_key(), "tower-lock:{account:42}");
        assert_eq!(name.fence_key(), "tower-lock:{account:42}:fence");
    }

    #[test]
    fn the_lock_key_is_the_fence_keys_prefix_in_one_buffer() {
        let name = LockName::new("ns:", "k");
        assert_eq!(name.lock_key(), "ns:{k}");
        assert_eq!(name.fence_key(), "ns:{k}:fence");
        assert_eq!(name.lock_key().as_ptr(), name.fence_key().as_ptr());
        assert_eq!(name, LockName::new("ns:", "k"));
        assert_ne!(name, LockName::new("ns:", "k:fence"));
    }

    #[test]
    fn the_label_is_the_fingerprint_of_the_lock_key_or_the_key_itself() {
        let name = LockName::new("ns:", "k");
        let fingerprint = name.fingerprint();
        assert_eq!(fingerprint.len(), 12);
        assert!(fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
        // The first 6 bytes of SHA-256("ns:{k}").
        use sha2::Digest;
        let digest = sha2::Sha256::digest(b"ns:{k}");
        let expected: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fingerprint, expected);
        assert_eq!(name.label(false).to_string(), fingerprint);
        assert_eq!(name.label(true).to_string(), "ns:{k}");
        assert_eq!(format!("{name:?}"), format!("LockName({fingerprint:?})"));
    }

    #[test]
    fn tokens_are_written_as_32_lowercase_hex_digits() {
        for value in [0, 1, 0xabc, u128::MAX, u128::MAX / 3, 1 << 127] {
            let token = LockToken(value);
            assert_eq!(token.to_hex(), format!("{value:032x}"));
            assert_eq!(LockToken::from_hex(&token.to_hex()), Some(token));
        }
    }

    #[test]
    fn tokens_are_unique_and_hex() {
        let a = LockToken::random();
        let b = LockToken::random();
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 32);
        assert!(!format!("{a:?}").contains(&a.to_hex()));
    }
}
