//! Deterministic OCI images on disk, for real clients to push.
//!
//! [`build_oci_layout`] writes an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/…`) holding one image: a config naming the
//! platform, and layers that are real gzip-compressed tar archives with one
//! file of seeded pseudo-random bytes each, so a docker engine could extract
//! them and the same spec always gives the same digests.
//!
//! The gzip stream uses deflate's *stored* blocks (no compression): it is a
//! valid gzip file every client reads, costs no dependency, and its size is
//! predictable. Random content would not compress anyway.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::json;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::{hex, media};

/// What image to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// `os` of the config, e.g. `linux`.
    pub os: String,
    /// `architecture` of the config, e.g. `arm64`.
    pub arch: String,
    /// `variant` of the config, e.g. `v8`.
    pub variant: Option<String>,
    /// `os.version` of the config (Windows images carry one).
    pub os_version: Option<String>,
    /// `os.features` of the config.
    pub os_features: Vec<String>,
    /// Layers, bottom first.
    pub layers: Vec<LayerSpec>,
}

/// One layer: a tar with one file of `size` bytes derived from `seed`.
#[derive(Clone, Copy, Debug)]
pub struct LayerSpec {
    /// Seeds the file content and names the file (`/layer-<seed>.bin`).
    pub seed: u64,
    /// Size of the file inside the tar, bytes.
    pub size: usize,
}

impl ImageSpec {
    /// An image for `os`/`arch` with no layers yet.
    pub fn new(os: &str, arch: &str) -> ImageSpec {
        ImageSpec {
            os: os.into(),
            arch: arch.into(),
            variant: None,
            os_version: None,
            os_features: Vec::new(),
            layers: Vec::new(),
        }
    }

    /// Sets the config's `variant`.
    pub fn variant(mut self, v: &str) -> ImageSpec {
        self.variant = Some(v.into());
        self
    }

    /// Sets the config's `os.version`.
    pub fn os_version(mut self, v: &str) -> ImageSpec {
        self.os_version = Some(v.into());
        self
    }

    /// Adds a layer holding `size` bytes derived from `seed`.
    pub fn layer(mut self, seed: u64, size: usize) -> ImageSpec {
        self.layers.push(LayerSpec { seed, size });
        self
    }
}

/// An OCI image layout directory with one image tagged `tag`. Removed on
/// drop.
pub struct OciLayout {
    /// Keeps the directory alive.
    dir: TempDir,
    /// The tag (`org.opencontainers.image.ref.name`) in `index.json`.
    pub tag: String,
    /// The image manifest bytes.
    pub manifest: Vec<u8>,
    /// Their digest.
    pub manifest_digest: String,
    /// The config blob's digest.
    pub config_digest: String,
    /// The layer blobs' digests (compressed), bottom first.
    pub layer_digests: Vec<String>,
    /// The layers' uncompressed digests (`rootfs.diff_ids`).
    pub diff_ids: Vec<String>,
}

impl OciLayout {
    /// The layout directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `oci:<dir>:<tag>`, the skopeo source reference.
    pub fn reference(&self) -> String {
        format!("oci:{}:{}", self.dir.path().display(), self.tag)
    }

    /// Where the blob with `digest` is stored.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir.path().join("blobs/sha256").join(hex)
    }

    /// Every blob digest of the image: config first, then layers.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut all = vec![self.config_digest.clone()];
        all.extend(self.layer_digests.iter().cloned());
        all
    }
}

/// Builds the OCI layout of `spec` in a new temp dir.
pub fn build_oci_layout(spec: &ImageSpec, tag: &str) -> OciLayout {
    let dir = tempfile::Builder::new()
        .prefix("archmerge-image-")
        .tempdir()
        .expect("creating the image temp dir");
    let blobs = dir.path().join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_descriptors = Vec::new();
    for l in &spec.layers {
        let tmp = blobs.join("incoming");
        let written = write_layer(&tmp, *l);
        fs::rename(&tmp, blobs.join(&written.hex)).unwrap();
        layer_descriptors.push(json!({
            "mediaType": media::OCI_LAYER_GZIP,
            "digest": format!("sha256:{}", written.hex),
            "size": written.size,
        }));
        layers.push(format!("sha256:{}", written.hex));
        diff_ids.push(format!("sha256:{}", written.diff_id_hex));
    }

    let mut config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": spec.arch,
        "os": spec.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": spec.layers.iter().map(|l| json!({
            "created": "1970-01-01T00:00:00Z",
            "created_by": format!("archmerge test layer seed={} size={}", l.seed, l.size),
        })).collect::<Vec<_>>(),
    });
    if let Some(v) = &spec.variant {
        config["variant"] = json!(v);
    }
    if let Some(v) = &spec.os_version {
        config["os.version"] = json!(v);
    }
    if !spec.os_features.is_empty() {
        config["os.features"] = json!(spec.os_features);
    }
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = store(&blobs, &config);

    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {
            "mediaType": media::OCI_CONFIG,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descriptors,
    }))
    .unwrap();
    let manifest_digest = store(&blobs, &manifest);

    let index = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [{
            "mediaType": media::OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(
        dir.path().join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    fs::write(
        dir.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    OciLayout {
        dir,
        tag: tag.into(),
        manifest,
        manifest_digest,
        config_digest,
        layer_digests: layers,
        diff_ids,
    }
}

fn store(blobs: &Path, data: &[u8]) -> String {
    let hex = hex(&Sha256::digest(data));
    fs::write(blobs.join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

// === seeded bytes ===

/// A deterministic pseudo-random byte stream (splitmix64): the same seed
/// always gives the same bytes, and different seeds unrelated ones.
pub struct Seeded {
    state: u64,
}

impl Seeded {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Seeded {
        Seeded {
            state: seed ^ 0x5EED_A5C4_0000_0000,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&v[..rest.len()]);
        }
    }

    /// `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Seeded::new(seed).fill(&mut v);
        v
    }
}

// === tar + gzip ===

struct WrittenLayer {
    hex: String,
    size: u64,
    diff_id_hex: String,
}

/// Writes the gzip'd tar of layer `l` to `path`, hashing both forms.
fn write_layer(path: &Path, l: LayerSpec) -> WrittenLayer {
    let file = BufWriter::new(File::create(path).unwrap());
    let mut gz = StoredGzip::new(Hashing::new(file));
    let mut tar_hash = Sha256::new();
    let mut emit = |bytes: &[u8], gz: &mut StoredGzip<Hashing<BufWriter<File>>>| {
        tar_hash.update(bytes);
        gz.write_data(bytes);
    };

    let name = format!("layer-{}.bin", l.seed);
    emit(&tar_header(&name, l.size as u64), &mut gz);
    let mut rng = Seeded::new(l.seed);
    let mut buf = vec![0u8; 32 * 1024];
    let mut left = l.size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        emit(&buf[..n], &mut gz);
        left -= n;
    }
    let pad = (512 - l.size % 512) % 512;
    // Padding to a 512-byte block, then the two zero blocks that end a tar.
    emit(&vec![0u8; pad + 1024], &mut gz);

    let diff_id_hex = hex(&tar_hash.finalize());
    let hashing = gz.finish();
    let (mut inner, hash, size) = hashing.into_parts();
    inner.flush().unwrap();
    WrittenLayer {
        hex: hash,
        size,
        diff_id_hex,
    }
}

/// A ustar header for a regular file `name` (≤ 100 bytes) of `size` bytes,
/// mode 0644, owned by root, mtime 0.
fn tar_header(name: &str, size: u64) -> [u8; 512] {
    assert!(name.len() < 100, "tar name too long: {name}");
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, s: &[u8]| h[at..at + s.len()].copy_from_slice(s);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        "); // checksum counts as spaces while summing
    h[156] = b'0'; // regular file
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    put(&mut h, 265, b"root");
    put(&mut h, 297, b"root");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    fn into_parts(self) -> (W, String, u64) {
        (self.inner, hex(&self.hash.finalize()), self.count)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// gzip (RFC 1952) with deflate stored blocks (RFC 1951 §3.2.4).
struct StoredGzip<W: Write> {
    out: W,
    crc: u32,
    len: u32,
}

impl<W: Write> StoredGzip<W> {
    fn new(mut out: W) -> Self {
        // magic, CM=deflate, no flags, mtime 0, XFL 0, OS unknown
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])
            .unwrap();
        StoredGzip {
            out,
            crc: !0,
            len: 0,
        }
    }

    fn write_data(&mut self, data: &[u8]) {
        let table = crc_table();
        for &b in data {
            self.crc = table[((self.crc ^ u32::from(b)) & 0xff) as usize] ^ (self.crc >> 8);
        }
        self.len = self.len.wrapping_add(data.len() as u32);
        for block in data.chunks(u16::MAX as usize) {
            let n = block.len() as u16;
            // BFINAL=0, BTYPE=00 (stored); the rest of the byte is padding.
            self.out.write_all(&[0]).unwrap();
            self.out.write_all(&n.to_le_bytes()).unwrap();
            self.out.write_all(&(!n).to_le_bytes()).unwrap();
            self.out.write_all(block).unwrap();
        }
    }

    fn finish(mut self) -> W {
        // An empty final stored block, then CRC32 and ISIZE.
        self.out.write_all(&[1, 0, 0, 0xff, 0xff]).unwrap();
        self.out.write_all(&(!self.crc).to_le_bytes()).unwrap();
        self.out.write_all(&self.len.to_le_bytes()).unwrap();
        self.out
    }
}

fn crc_table() -> &'static [u32; 256] {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    })
}
