//! openraft's own storage test suite, run unchanged against the sled store.

use kvset_storage::LogStore;
use kvset_storage::StateMachine;
use kvset_storage::Store;
use kvset_storage::StoreOptions;
use kvset_storage::TypeConfig;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::StorageError;
use tempfile::TempDir;

/// Opens a fresh store in a new temporary directory for every test of the suite.
struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir()
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let store = Store::open_dir(dir.path(), StoreOptions::default()).map_err(|e| {
            StorageError::from_io_error(
                ErrorSubject::Store,
                ErrorVerb::Read,
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok((dir, store.log, store.state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(SledBuilder).await
}
