//! Counts the requests an object store is sent and the bytes that cross,
//! for `/metrics` and the benchmarks. (A listing counts once, however many
//! pages it takes.)

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Requests by kind, and bytes each way.
#[derive(Debug, Default)]
pub struct Counts {
    /// Reads of objects or ranges.
    pub get: AtomicU64,
    /// Reads of an object's metadata only.
    pub head: AtomicU64,
    /// Writes (conditional or not).
    pub put: AtomicU64,
    /// Listings.
    pub list: AtomicU64,
    /// Deletions.
    pub delete: AtomicU64,
    /// Bytes read.
    pub bytes_in: AtomicU64,
    /// Bytes written.
    pub bytes_out: AtomicU64,
}

impl Counts {
    /// Every counter with its name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("get", v(&self.get)),
            ("head", v(&self.head)),
            ("put", v(&self.put)),
            ("list", v(&self.list)),
            ("delete", v(&self.delete)),
            ("bytes_in", v(&self.bytes_in)),
            ("bytes_out", v(&self.bytes_out)),
        ]
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// An object store whose traffic is counted.
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn ObjectStore>,
    counts: Arc<Counts>,
}

impl Counted {
    /// `inner`, counted in `counts`.
    pub fn new(inner: Arc<dyn ObjectStore>, counts: Arc<Counts>) -> Counted {
        Counted { inner, counts }
    }
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "counted {}", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Counted {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        add(&self.counts.put, 1);
        add(&self.counts.bytes_out, payload.content_length() as u64);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        add(&self.counts.put, 1);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if options.head {
            add(&self.counts.head, 1);
        } else {
            add(&self.counts.get, 1);
        }
        let r = self.inner.get_opts(location, options).await?;
        add(&self.counts.bytes_in, r.range.end - r.range.start);
        Ok(r)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        add(&self.counts.get, ranges.len() as u64);
        let r = self.inner.get_ranges(location, ranges).await?;
        add(&self.counts.bytes_in, r.iter().map(|b| b.len() as u64).sum());
        Ok(r)
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let counts = self.counts.clone();
        self.inner.delete_stream(locations.inspect_ok(move |_| add(&counts.delete, 1)).boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        add(&self.counts.list, 1);
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        add(&self.counts.list, 1);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        add(&self.counts.put, 1);
        self.inner.copy_opts(from, to, options).await
    }
}
