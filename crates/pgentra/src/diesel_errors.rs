//! pgentra's errors inside diesel's `ConnectionError`, shared by the diesel and diesel-async
//! integrations.

use crate::error::Error;
use diesel::ConnectionError;

/// `error` as a diesel `ConnectionError` that keeps it as a typed source (diesel has no variant
/// for "could not get credentials"; this is the one that carries a boxed error).
pub(crate) fn typed(error: Error) -> ConnectionError {
    ConnectionError::CouldntSetupConfiguration(diesel::result::Error::QueryBuilderError(Box::new(
        error,
    )))
}

/// The pgentra error inside a diesel `ConnectionError` made by pgentra, if any.
pub fn cause(error: &ConnectionError) -> Option<&Error> {
    match error {
        ConnectionError::CouldntSetupConfiguration(diesel::result::Error::QueryBuilderError(
            source,
        )) => source.downcast_ref::<Error>(),
        _ => None,
    }
}
