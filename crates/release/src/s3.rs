//! The origin store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage, …), for
//! clusters whose releases outgrow the control members' disks. Built with the `s3` feature.
//!
//! Same layout as [`crate::FsChunkStore`] — `chunks/<hash>` and `manifests/<id>` under an
//! optional prefix — and the same contract: a put returns once the bucket acknowledged it,
//! which S3 does only for a durable object. Members configured with one bucket share it;
//! a chunk put through one member is held for all of them.
//!
//! [`ChunkStore`] is synchronous (release creation runs on plain threads), the `object_store`
//! client is async: each call runs on the Tokio runtime the store was opened in. Call it
//! from a blocking context (`spawn_blocking`), never from a runtime worker thread.

use std::sync::Arc;
use std::time::SystemTime;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use starling_proto::{ChunkHash, ReleaseId};

use crate::store::{ChunkStore, OriginStore};
use crate::ReleaseError;

pub struct S3ChunkStore {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Handle,
    /// For messages: where this store is.
    url: String,
}

impl S3ChunkStore {
    /// Open `s3://bucket[/prefix]`. Credentials, region and endpoint come from the usual
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT` for a non-AWS service, `AWS_ALLOW_HTTP=true` for plain HTTP).
    /// Must be called inside a Tokio runtime.
    pub fn open(url: &str) -> Result<Self, ReleaseError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            ReleaseError::Backend(format!("{url:?} is not an s3://bucket[/prefix] URL"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ReleaseError::Backend(format!("{url:?} names no bucket")));
        }
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| ReleaseError::Backend(format!("{url}: {e}")))?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ReleaseError::Backend("the S3 store must be opened inside a Tokio runtime".into())
        })?;
        Ok(S3ChunkStore {
            store,
            runtime,
            url: url.to_string(),
        })
    }

    fn chunk_path(hash: &ChunkHash) -> ObjectPath {
        ObjectPath::from(format!("chunks/{hash}"))
    }

    fn manifest_path(id: &ReleaseId) -> ObjectPath {
        ObjectPath::from(format!("manifests/{id}"))
    }

    fn error(&self, at: &ObjectPath, e: object_store::Error) -> ReleaseError {
        match e {
            object_store::Error::NotFound { .. } => {
                ReleaseError::NotFound(format!("{}/{at}", self.url))
            }
            other => ReleaseError::Backend(format!("{}/{at}: {other}", self.url)),
        }
    }

    fn get(&self, at: &ObjectPath) -> Result<Vec<u8>, ReleaseError> {
        self.runtime
            .block_on(async {
                let got = self.store.get(at).await?;
                got.bytes().await
            })
            .map(|b| b.to_vec())
            .map_err(|e| self.error(at, e))
    }

    fn put(&self, at: &ObjectPath, bytes: &[u8]) -> Result<(), ReleaseError> {
        let payload = PutPayload::from(bytes.to_vec());
        self.runtime
            .block_on(self.store.put(at, payload))
            .map(drop)
            .map_err(|e| self.error(at, e))
    }

    fn delete(&self, at: &ObjectPath) -> Result<(), ReleaseError> {
        match self.runtime.block_on(self.store.delete(at)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(at, e)),
        }
    }
}

impl ChunkStore for S3ChunkStore {
    fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, ReleaseError> {
        let at = Self::chunk_path(hash);
        match self.runtime.block_on(self.store.head(&at)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(&at, e)),
        }
    }

    fn put_chunk(&self, hash: &ChunkHash, bytes: &[u8]) -> Result<(), ReleaseError> {
        self.put(&Self::chunk_path(hash), bytes)
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        self.get(&Self::chunk_path(hash))
    }

    fn put_manifest(&self, id: &ReleaseId, bytes: &[u8]) -> Result<(), ReleaseError> {
        self.put(&Self::manifest_path(id), bytes)
    }

    fn get_manifest(&self, id: &ReleaseId) -> Result<Vec<u8>, ReleaseError> {
        self.get(&Self::manifest_path(id))
    }
}

impl OriginStore for S3ChunkStore {
    fn list_chunks(&self) -> Result<Vec<(ChunkHash, SystemTime)>, ReleaseError> {
        let prefix = ObjectPath::from("chunks");
        let listed: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|e| self.error(&prefix, e))?;
        Ok(listed
            .into_iter()
            .filter_map(|o| {
                let hash = ChunkHash::parse(o.location.filename()?).ok()?;
                Some((hash, SystemTime::from(o.last_modified)))
            })
            .collect())
    }

    fn delete_chunk(&self, hash: &ChunkHash) -> Result<(), ReleaseError> {
        self.delete(&Self::chunk_path(hash))
    }

    fn delete_manifest(&self, id: &ReleaseId) -> Result<(), ReleaseError> {
        self.delete(&Self::manifest_path(id))
    }
}
