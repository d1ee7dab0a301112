//! Where locks live: the [`LockBackend`] trait and its implementations.
//!
//! - [`RedisBackend`]: one Redis primary, one shared multiplexed connection, one round trip per
//!   acquire and per release.
//! - [`RedisClusterBackend`]: a Redis Cluster, one round trip per call to the primary of the
//!   lock's hash slot.
//! - [`RedlockBackend`]: N independent Redis primaries, a lock held while a majority holds it.
//! - `RedisSentinelBackend` (feature `sentinel`): the primary of a replication group that Redis
//!   Sentinel manages, found through the sentinels and followed across a failover.
//! - [`MemoryBackend`]: in-process, same semantics; for single-instance apps, demos and tests.
//!
//! Every backend implements the same contract:
//!
//! - `acquire(name, token, ttl)` stores `token` under `name` only if nobody holds it, with expiry
//!   `ttl`, and bumps the fencing counter of `name`; if someone holds it, it reports for how long.
//! - `release(name, token)` deletes the lock only if it still holds `token` (compare-and-delete).
//! - `extend(name, token, ttl)` resets the expiry only if it still holds `token`
//!   (compare-and-expire).
//! - `inspect(name)` reads whether `name` is held and for how long; `force_release(name)` deletes
//!   it whoever holds it (an operator's tool). Both are provided methods that answer
//!   [`BackendErrorKind::Unsupported`] unless a backend overrides them; the built-in backends do.
//!
//! A backend failure is an `Err(BackendError)`, never confused with "held by someone else".
//!
//! - `wakeups()` tells the engine how this backend wakes waiters when a lock is released
//!   ([`Wakeups`]); the default, `None`, makes waiters poll (bounded by the holder's lease).
//!
//! The trait is designed to grow without breaking implementations: multi-key and counted
//! (semaphore) locks will arrive as provided methods.

mod cluster;
mod cluster_subscriber;
mod commands;
mod contract;
mod failure;
mod memory;
mod redis;
mod redlock;
#[cfg(feature = "sentinel")]
mod sentinel;
mod subscriber;
mod tls;
mod wakeups;

pub use self::cluster::{RedisClusterBackend, RedisClusterBackendBuilder};
pub(crate) use self::contract::Label;
pub use self::contract::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, FailureReason,
    Inspect, LockBackend, LockName, LockToken, MAX_TTL, MIN_TTL, Release,
};
pub use self::memory::MemoryBackend;
pub use self::redis::{RedisBackend, RedisBackendBuilder};
pub use self::redlock::{RedlockBackend, RedlockBackendBuilder};
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub use self::sentinel::{RedisSentinelBackend, RedisSentinelBackendBuilder};
#[cfg(feature = "tls-rustls")]
pub use self::tls::install_crypto_provider;
pub use self::wakeups::Wakeups;
pub(crate) use self::wakeups::Watch;
