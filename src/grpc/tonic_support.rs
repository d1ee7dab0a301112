//! tonic's traits for the lock services, and rejections as `tonic::Status` (feature `tonic`).

use tonic::server::NamedService;

use crate::response::Rejection;
use crate::routes::LockRoutesService;
use crate::service::LockService;

/// A locked tonic service keeps the name of the service it wraps, so
/// `Server::add_service(layer.layer(service))` compiles.
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl<S: NamedService, K, B> NamedService for LockService<S, K, B> {
    const NAME: &'static str = S::NAME;
}

/// A tonic service behind a route table keeps its name, so `Server::add_service` takes it.
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl<S: NamedService, B> NamedService for LockRoutesService<S, B> {
    const NAME: &'static str = S::NAME;
}

/// The status a gRPC client would get for this rejection: code, message and
/// `grpc-retry-pushback-ms` metadata, as in the [table](crate::grpc).
///
/// ```
/// use tower_lock::Rejection;
///
/// let status = tonic::Status::from(Rejection::Conflict { remaining: None, retry_after: None });
/// assert_eq!(status.code(), tonic::Code::Aborted);
/// assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl From<Rejection> for tonic::Status {
    fn from(rejection: Rejection) -> Self {
        let code = tonic::Code::from_i32(rejection.grpc_code());
        let mut status = tonic::Status::new(code, rejection.grpc_message());
        if let Some(ms) = rejection.grpc_retry_pushback_ms() {
            status
                .metadata_mut()
                .insert("grpc-retry-pushback-ms", ms.into());
        }
        status
    }
}
