//! Task helpers.

/// Aborts the task when dropped, so a helper task never outlives the future that started it (also when
/// that future is itself aborted).
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
