//! Playing kubelet's part for volumes: a Secret volume laid out and updated as kubelet's atomic
//! writer does it (files in a timestamped directory, `..data` pointing at it, one symlink per key
//! pointing into `..data`, an update written to a new directory and swapped in by renaming a new
//! `..data` over the old one).

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// A Secret volume mounted at `dir`.
pub struct SecretVolume {
    pub dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    /// An empty volume directory (nothing projected yet).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("volume dir");
        Self {
            dir: dir.to_owned(),
            generation: 0,
        }
    }

    /// Projects `files` (key -> content) as kubelet does on a Secret update.
    pub fn apply(&mut self, files: &BTreeMap<String, Vec<u8>>) {
        self.generation += 1;
        let name = format!("..2026_12_02_08_00_00.{:09}", self.generation);
        let ts = self.dir.join(&name);
        std::fs::create_dir(&ts).expect("timestamped dir");
        for (key, content) in files {
            std::fs::write(ts.join(key), content).expect("write key");
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&name, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
        // Keys new in this version get their link after the swap; keys gone lose theirs.
        for key in files.keys() {
            let link = self.dir.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{key}"), &link).expect("key link");
            }
        }
        for entry in std::fs::read_dir(&self.dir).expect("read volume").flatten() {
            let key = entry.file_name().to_string_lossy().into_owned();
            if !key.starts_with("..") && !files.contains_key(&key) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
    }

    /// Projects a Secret manifest (`data` of base64 values, as `meshid-ca secret` prints it and
    /// `kubectl apply` would store it).
    pub fn apply_manifest(&mut self, yaml: &str) {
        use base64::Engine;
        let mut files = BTreeMap::new();
        for line in yaml.lines().skip_while(|l| *l != "data:").skip(1) {
            let (key, value) = line.trim().split_once(": ").expect("data entry");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value)
                .expect("base64");
            files.insert(key.to_owned(), bytes);
        }
        assert!(!files.is_empty(), "no data in the manifest: {yaml}");
        self.apply(&files);
    }
}
