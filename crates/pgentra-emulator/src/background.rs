//! What the emulator's servers share: a runtime on a thread of their own, so that they outlive
//! any one test's runtime, and a stop signal that ends it when the server is dropped.

use std::future::Future;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// Runs the future made by `serve` on a new two-thread runtime on a thread named `name`,
/// until the returned sender is dropped. `serve` runs on that runtime, so it may create tokio
/// listeners.
pub(crate) fn run<F, Fut>(name: &str, serve: F) -> std::io::Result<oneshot::Sender<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    spawn(name, serve).map(|(stop, _thread)| stop)
}

/// As [`run`], and also returns the thread: once the sender is dropped, joining it waits until
/// the runtime is gone, with every task it ran and every socket those tasks held.
pub(crate) fn spawn<F, Fut>(
    name: &str,
    serve: F,
) -> std::io::Result<(oneshot::Sender<()>, JoinHandle<()>)>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = serve() => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime here, on this thread, ends its tasks before the join.
            drop(runtime);
        })?;
    Ok((stop, thread))
}
