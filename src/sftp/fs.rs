//! What one logged-in user sees: their home in the landing bucket and, for egress users, `/upload`
//! (the home) and `/download` (their egress area, read-only); for every user, `/.receipts` (receipts
//! of their uploads, read-only, left out of the root's listing).
//!
//! Owns the permission rules (upload-only home, read-only download and receipts, nothing outside)
//! and the mapping from a normalised [`VirtualPath`] to a storage key. Folders are kept in the state
//! database since object stores have none. It never decides where a file is delivered, and never
//! parses raw peer paths: it only takes what `paths::normalise` produced.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt};
use russh_sftp::protocol::{File, FileAttributes, OpenFlags, StatusCode};

use super::partial::{LandingUpload, Target, discard_partial};
use super::paths::{PathError, VirtualPath};
use super::receipts::{self, RECEIPTS_DIR};
use crate::config::User;
use crate::state::{Held, Job, Partial, PathBusy, State, StateError};
use crate::storage::{Bucket, Download};

/// Most entries one directory listing may return.
pub const MAX_LISTING: usize = 100_000;

const UPLOAD_DIR: &str = "upload";
const DOWNLOAD_DIR: &str = "download";

/// An SFTP status with the message the client is shown.
#[derive(Debug, Clone, PartialEq)]
pub struct SftpError {
    pub code: StatusCode,
    pub message: String,
}

impl SftpError {
    pub fn new(code: StatusCode, message: impl Into<String>) -> SftpError {
        SftpError {
            code,
            message: message.into(),
        }
    }

    pub fn denied(message: impl Into<String>) -> SftpError {
        SftpError::new(StatusCode::PermissionDenied, message)
    }

    pub fn not_found(path: &VirtualPath) -> SftpError {
        SftpError::new(
            StatusCode::NoSuchFile,
            format!("{path}: no such file or folder"),
        )
    }

    pub fn failure(message: impl Into<String>) -> SftpError {
        SftpError::new(StatusCode::Failure, message)
    }
}

impl From<PathError> for SftpError {
    fn from(error: PathError) -> SftpError {
        match error {
            PathError::Escapes => SftpError::denied(error.to_string()),
            PathError::ControlCharacter | PathError::TooLong => {
                SftpError::failure(error.to_string())
            }
        }
    }
}

impl From<StateError> for SftpError {
    fn from(error: StateError) -> SftpError {
        tracing::error!(%error, "state database error during an SFTP request");
        SftpError::failure("the server could not record this; try again later")
    }
}

impl From<object_store::Error> for SftpError {
    fn from(error: object_store::Error) -> SftpError {
        tracing::error!(%error, "storage error during an SFTP request");
        SftpError::failure("the storage is unavailable; try again later")
    }
}

/// Where a path of the user's view lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Area {
    /// The virtual root of an egress user, holding `/upload` and `/download`.
    Root,
    /// A path inside the home (landing), relative to the home.
    Home(VirtualPath),
    /// A path inside the egress area, relative to it.
    Download(VirtualPath),
    /// A path inside `/.receipts`, relative to it (the same as the home's path it tells about).
    Receipts(VirtualPath),
}

/// What a path inside `/.receipts` is.
enum Receipt {
    /// The folder itself, or a folder of the home holding uploads with receipts.
    Folder,
    /// The receipt of an upload: its latest job.
    Of(Box<Job>),
}

/// A file or folder found by `stat`.
#[derive(Debug, Clone)]
pub enum Entry {
    Folder,
    File { size: u64, modified: u32 },
}

/// An opened file.
pub enum Opened {
    Upload {
        upload: Box<LandingUpload>,
        /// Bytes of an interrupted upload of the path thrown away by this one (opened with TRUNC).
        replaced_partial: Option<u64>,
    },
    Download(Download),
    /// A receipt: its text, made when it was opened.
    Receipt(bytes::Bytes),
}

/// How long the SFTP side may hold a path's jobs while it changes the file.
pub const HOLD: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a rename or remove waits for the pipeline to let go of a path.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What one upload, and one user's uploads together, may take.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// Bytes in one file, across resumes.
    pub max_file_size: u64,
    /// Interrupted uploads left behind (see `partial::LEFT_BEHIND_AFTER`) at which a new upload
    /// is refused; resuming one stays allowed.
    pub max_partials: usize,
}

/// One user's view of the buckets.
pub struct UserView {
    user: Arc<User>,
    landing: Bucket,
    egress: Option<Bucket>,
    state: State,
    limits: UploadLimits,
    /// Lease owner name for this session's holds on paths.
    holder: String,
    temporary_names: Arc<crate::config::TemporaryNames>,
    receipts: crate::config::Receipts,
}

impl UserView {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        user: Arc<User>,
        landing: Bucket,
        egress: Option<Bucket>,
        state: State,
        limits: UploadLimits,
        session: &str,
        temporary_names: Arc<crate::config::TemporaryNames>,
        receipts: crate::config::Receipts,
    ) -> UserView {
        UserView {
            user,
            landing,
            egress,
            state,
            limits,
            // One holder per SFTP channel: channels of one connection must not release each other's holds.
            holder: format!(
                "sftp:{session}:{}",
                crate::storage::hex(&rand::random::<[u8; 4]>())
            ),
            temporary_names,
            receipts,
        }
    }

    pub fn username(&self) -> &str {
        &self.user.username
    }

    pub fn user(&self) -> &User {
        &self.user
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether a home path has a temporary upload name (held until renamed).
    pub fn is_temporary(&self, relative: &str) -> bool {
        self.temporary_names.matches(relative)
    }

    /// Holds the jobs of a home path so that the pipeline leaves them alone (see `State::hold_path`).
    async fn hold(&self, relative: &str) -> Result<Result<Held, PathBusy>, StateError> {
        self.state
            .hold_path(&self.user.username, relative, &self.holder, HOLD)
            .await
    }

    /// Holds a home path's jobs, waiting up to `wait` while the pipeline has them (a retry against an
    /// unreachable scanner takes a path only briefly). The one place that waits for a hold.
    pub async fn hold_waiting(
        &self,
        relative: &str,
        wait: std::time::Duration,
    ) -> Result<Result<Held, PathBusy>, StateError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.hold(relative).await? {
                Err(PathBusy) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                outcome => return Ok(outcome),
            }
        }
    }

    /// Holds a path for a change, refusing it if it stays busy.
    async fn hold_or_refuse(
        &self,
        home: &VirtualPath,
        shown: &VirtualPath,
    ) -> Result<(), SftpError> {
        self.hold_waiting(&home.relative(), BUSY_WAIT)
            .await?
            // These changes are rare: their callers release whether or not anything was held.
            .map(|_held| ())
            .map_err(|PathBusy| {
                SftpError::failure(format!(
                    "{shown} is being scanned and delivered and can no longer be changed"
                ))
            })
    }

    /// Releases this session's holds on a home path (and below it).
    pub async fn release(&self, relative: &str) {
        if let Err(error) = self
            .state
            .release_path(&self.user.username, relative, &self.holder)
            .await
        {
            tracing::warn!(%error, "cannot release a hold on a path; it expires by itself");
        }
    }

    fn area(&self, path: &VirtualPath) -> Result<Area, SftpError> {
        if let Some(rest) = path.strip_prefix(RECEIPTS_DIR) {
            return Ok(Area::Receipts(rest));
        }
        if self.egress.is_none() {
            return Ok(Area::Home(path.clone()));
        }
        if path.is_root() {
            return Ok(Area::Root);
        }
        if let Some(rest) = path.strip_prefix(UPLOAD_DIR) {
            return Ok(Area::Home(rest));
        }
        if let Some(rest) = path.strip_prefix(DOWNLOAD_DIR) {
            return Ok(Area::Download(rest));
        }
        Err(SftpError::new(
            StatusCode::NoSuchFile,
            format!("{path}: only /upload and /download exist here"),
        ))
    }

    /// The home path of a path that must be writable, or why not.
    fn writable(&self, path: &VirtualPath) -> Result<VirtualPath, SftpError> {
        match self.area(path)? {
            Area::Home(home) if !home.is_root() => Ok(home),
            Area::Home(_) | Area::Root => Err(SftpError::denied(format!(
                "{path} cannot be changed; work inside your home{}",
                if self.egress.is_some() {
                    " (/upload)"
                } else {
                    ""
                }
            ))),
            Area::Download(_) => Err(SftpError::denied(format!(
                "{path}: /download is read-only; upload into /upload"
            ))),
            Area::Receipts(_) => Err(SftpError::denied(receipts::READ_ONLY)),
        }
    }

    /// Why a file opened for reading cannot be written to.
    pub fn read_only(&self, path: &VirtualPath) -> SftpError {
        self.writable(path)
            .err()
            .unwrap_or_else(|| SftpError::denied(format!("{path} is open for reading only")))
    }

    /// Setting times or modes is accepted and ignored (see `session`), except in `/.receipts`, where
    /// every change is refused.
    pub fn check_setstat(&self, path: &VirtualPath) -> Result<(), SftpError> {
        match self.area(path)? {
            Area::Receipts(_) => Err(SftpError::denied(receipts::READ_ONLY)),
            Area::Root | Area::Home(_) | Area::Download(_) => Ok(()),
        }
    }

    fn home_key(&self, home: &VirtualPath) -> ObjectPath {
        let parts: Vec<&str> = std::iter::once(self.user.username.as_str())
            .chain(home.parts().iter().map(String::as_str))
            .collect();
        self.landing.key(&parts)
    }

    fn download_bucket(&self) -> Result<&Bucket, SftpError> {
        self.egress
            .as_ref()
            .ok_or_else(|| SftpError::denied("no download area is configured for you"))
    }

    /// Folder row key: (parent relative path, name).
    fn folder_row(home: &VirtualPath) -> (String, String) {
        (
            home.parent().relative(),
            home.name().unwrap_or_default().to_string(),
        )
    }

    pub async fn stat(&self, path: &VirtualPath) -> Result<Entry, SftpError> {
        match self.area(path)? {
            Area::Root => Ok(Entry::Folder),
            Area::Home(home) => {
                self.stat_in(&self.landing, self.home_key(&home), Some(&home), path)
                    .await
            }
            Area::Download(rest) => {
                let bucket = self.download_bucket()?;
                self.stat_in(bucket, bucket.key(rest.parts()), None, path)
                    .await
            }
            Area::Receipts(rest) => match self.receipt(&rest, path).await? {
                Receipt::Folder => Ok(Entry::Folder),
                Receipt::Of(job) => Ok(self.receipt_entry(&job)),
            },
        }
    }

    /// What a path inside `/.receipts` is. A name that is both a folder of receipts and the
    /// receipt of an upload (`a.txt/…` and `a`) is the folder, here and in listings.
    async fn receipt(&self, rest: &VirtualPath, shown: &VirtualPath) -> Result<Receipt, SftpError> {
        let username = &self.user.username;
        if rest.is_root()
            || self
                .state
                .has_receipts_below(username, &rest.relative())
                .await?
        {
            return Ok(Receipt::Folder);
        }
        if let Some(upload) = rest.name().and_then(receipts::upload_name) {
            let path = rest.parent().join(upload).relative();
            if let Some(job) = self.state.receipt_job(username, &path).await? {
                return Ok(Receipt::Of(Box::new(job)));
            }
        }
        Err(SftpError::not_found(shown))
    }

    /// The text of a job's receipt.
    fn receipt_text(&self, job: &Job) -> String {
        let shown = if self.egress.is_some() {
            format!("/{UPLOAD_DIR}/{}", job.path)
        } else {
            format!("/{}", job.path)
        };
        receipts::render(job, &shown, self.receipts.show_signature)
    }

    /// A receipt as a file: its size is its text's, to the byte, since clients read up to it.
    fn receipt_entry(&self, job: &Job) -> Entry {
        Entry::File {
            size: self.receipt_text(job).len() as u64,
            modified: receipts::modified(job),
        }
    }

    async fn stat_in(
        &self,
        bucket: &Bucket,
        key: ObjectPath,
        home: Option<&VirtualPath>,
        shown: &VirtualPath,
    ) -> Result<Entry, SftpError> {
        if home.is_some_and(VirtualPath::is_root)
            || (home.is_none() && key_is_bucket_root(bucket, &key))
        {
            return Ok(Entry::Folder);
        }
        if let Some(home) = home {
            if self.is_made_folder(home).await? {
                return Ok(Entry::Folder);
            }
            if let Some(partial) = self.partial(home).await? {
                return Ok(partial_entry(&partial));
            }
        }
        Self::stored_entry(bucket, key, shown).await
    }

    /// Whether a home path is a folder made with `mkdir`.
    async fn is_made_folder(&self, home: &VirtualPath) -> Result<bool, StateError> {
        let (parent, name) = Self::folder_row(home);
        self.state
            .folder_exists(&self.user.username, &parent, &name)
            .await
    }

    /// What a key of a bucket is: an object, or a folder because objects are stored below it.
    async fn stored_entry(
        bucket: &Bucket,
        key: ObjectPath,
        shown: &VirtualPath,
    ) -> Result<Entry, SftpError> {
        match bucket.store().head(&key).await {
            Ok(meta) => return Ok(file_entry(&meta)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        let listing = match bucket.store().list_with_delimiter(Some(&key)).await {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Err(SftpError::not_found(shown)),
            Err(error) => return Err(error.into()),
        };
        if listing.objects.is_empty() && listing.common_prefixes.is_empty() {
            Err(SftpError::not_found(shown))
        } else {
            Ok(Entry::Folder)
        }
    }

    /// The interrupted upload of a home path, if there is one.
    async fn partial(&self, home: &VirtualPath) -> Result<Option<Partial>, StateError> {
        self.state
            .partial(&self.user.username, &home.relative())
            .await
    }

    async fn require_folder(&self, path: &VirtualPath) -> Result<(), SftpError> {
        match self.stat(path).await {
            Ok(Entry::Folder) => Ok(()),
            Ok(Entry::File { .. }) => Err(SftpError::failure(format!(
                "{path} is a file, not a folder"
            ))),
            Err(error) if error.code == StatusCode::NoSuchFile => Err(SftpError::new(
                StatusCode::NoSuchFile,
                format!("the folder {path} does not exist; create it first (mkdir)"),
            )),
            Err(error) => Err(error),
        }
    }

    /// Lists a folder: files and folders directly inside it.
    pub async fn list(&self, path: &VirtualPath) -> Result<Vec<File>, SftpError> {
        let area = self.area(path)?;
        let writable = !matches!(area, Area::Download(_) | Area::Receipts(_));
        let mut files = vec![
            File::new(".", folder_attrs(writable)),
            File::new("..", folder_attrs(true)),
        ];
        match area {
            Area::Root => {
                files.push(File::new(UPLOAD_DIR, folder_attrs(true)));
                files.push(File::new(DOWNLOAD_DIR, folder_attrs(false)));
            }
            Area::Home(home) => {
                self.require_folder(path).await?;
                let mut names = std::collections::BTreeSet::new();
                if path.is_root() {
                    // Hidden: `/.receipts` is the receipts', whatever the home holds by that name.
                    names.insert(RECEIPTS_DIR.to_string());
                }
                for name in self
                    .state
                    .child_folders(&self.user.username, &home.relative())
                    .await?
                {
                    if names.insert(name.clone()) {
                        files.push(File::new(name, folder_attrs(true)));
                    }
                }
                // Interrupted uploads show with the size to resume from, in place of older files.
                for (name, partial) in self
                    .state
                    .partials_in(&self.user.username, &home.relative())
                    .await?
                {
                    if names.insert(name.clone()) {
                        files.push(File::new(name, file_attrs(&partial_entry(&partial), true)));
                    }
                }
                self.list_in(
                    &self.landing,
                    self.home_key(&home),
                    true,
                    &mut names,
                    &mut files,
                )
                .await?;
            }
            Area::Download(rest) => {
                self.require_folder(path).await?;
                let bucket = self.download_bucket()?;
                let mut names = std::collections::BTreeSet::new();
                self.list_in(
                    bucket,
                    bucket.key(rest.parts()),
                    false,
                    &mut names,
                    &mut files,
                )
                .await?;
            }
            Area::Receipts(rest) => {
                if let Receipt::Of(_) = self.receipt(&rest, path).await? {
                    return Err(SftpError::failure(format!(
                        "{path} is a file, not a folder"
                    )));
                }
                self.list_receipts(&rest, &mut files).await?;
            }
        }
        if files.len() > MAX_LISTING {
            return Err(SftpError::failure(format!(
                "{path} holds more than {MAX_LISTING} entries, too many to list; use sub-folders"
            )));
        }
        Ok(files)
    }

    /// The receipts and folders of receipts directly inside a folder of `/.receipts`; each query
    /// stops at one more than a listing may hold, so that an over-full folder is told.
    async fn list_receipts(
        &self,
        rest: &VirtualPath,
        files: &mut Vec<File>,
    ) -> Result<(), SftpError> {
        let username = &self.user.username;
        let folder = rest.relative();
        let mut names = std::collections::BTreeSet::new();
        for name in self
            .state
            .receipt_folders_in(username, &folder, MAX_LISTING + 1)
            .await?
        {
            if names.insert(name.clone()) {
                files.push(File::new(name, folder_attrs(false)));
            }
        }
        for job in self
            .state
            .receipt_jobs_in(username, &folder, MAX_LISTING + 1)
            .await?
        {
            let upload = job.path.rsplit('/').next().unwrap_or_default();
            let name = receipts::receipt_name(upload);
            if names.insert(name.clone()) {
                files.push(File::new(
                    name,
                    file_attrs(&self.receipt_entry(&job), false),
                ));
            }
        }
        Ok(())
    }

    async fn list_in(
        &self,
        bucket: &Bucket,
        key: ObjectPath,
        writable: bool,
        names: &mut std::collections::BTreeSet<String>,
        files: &mut Vec<File>,
    ) -> Result<(), SftpError> {
        let prefix = if key_is_bucket_root(bucket, &key) {
            None
        } else {
            Some(&key)
        };
        let listing = match bucket.store().list_with_delimiter(prefix).await {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        for folder in listing.common_prefixes {
            if let Some(name) = folder.filename()
                && names.insert(name.to_string())
            {
                files.push(File::new(name, folder_attrs(writable)));
            }
            if files.len() > MAX_LISTING {
                break;
            }
        }
        for object in listing.objects {
            if let Some(name) = object.location.filename()
                && !crate::storage::is_staging_name(name)
                && names.insert(name.to_string())
            {
                files.push(File::new(name, file_attrs(&file_entry(&object), writable)));
            }
            if files.len() > MAX_LISTING {
                break;
            }
        }
        Ok(())
    }

    pub async fn mkdir(&self, path: &VirtualPath) -> Result<(), SftpError> {
        let home = self.writable(path)?;
        self.check_name(&home)?;
        self.require_folder(&path.parent()).await?;
        if self.stat(path).await.is_ok() {
            return Err(SftpError::failure(format!("{path} already exists")));
        }
        let (parent, name) = Self::folder_row(&home);
        self.state
            .create_folder(&self.user.username, &parent, &name)
            .await?;
        Ok(())
    }

    pub async fn rmdir(&self, path: &VirtualPath) -> Result<(), SftpError> {
        let home = self.writable(path)?;
        let (parent, name) = Self::folder_row(&home);
        if !self
            .state
            .folder_exists(&self.user.username, &parent, &name)
            .await?
        {
            return match self.stat(path).await? {
                Entry::File { .. } => Err(SftpError::failure(format!("{path} is a file; use rm"))),
                Entry::Folder => Err(SftpError::failure(format!("{path} is not empty"))),
            };
        }
        if self.list(path).await?.len() > 2 {
            return Err(SftpError::failure(format!("{path} is not empty")));
        }
        self.state
            .remove_folder(&self.user.username, &parent, &name)
            .await?;
        Ok(())
    }

    /// Removes a file. Removing an interrupted upload discards it: returns the bytes it held.
    pub async fn remove(&self, path: &VirtualPath) -> Result<Option<u64>, SftpError> {
        let home = self.writable(path)?;
        if let Some(partial) = self.partial(&home).await? {
            discard_partial(&self.state, &self.landing, &partial, None).await?;
            return Ok(Some(partial.size));
        }
        match self.stat(path).await? {
            Entry::Folder => Err(SftpError::failure(format!("{path} is a folder; use rmdir"))),
            Entry::File { .. } => {
                self.hold_or_refuse(&home, path).await?;
                if let Err(error) = self.landing.store().delete(&self.home_key(&home)).await {
                    self.release(&home.relative()).await;
                    return Err(error.into());
                }
                self.state
                    .remove_landed(&self.user.username, &home.relative(), &self.holder)
                    .await?;
                Ok(None)
            }
        }
    }

    /// Renames a file, or an empty folder. `overwrite` is POSIX rename (posix-rename@openssh.com).
    pub async fn rename(
        &self,
        from: &VirtualPath,
        to: &VirtualPath,
        overwrite: bool,
    ) -> Result<(), SftpError> {
        let from_home = self.writable(from)?;
        let to_home = self.writable(to)?;
        if from_home == to_home {
            // Renaming onto itself changes nothing (and must not drop the file's job).
            self.stat(from).await?;
            return Ok(());
        }
        self.check_name(&to_home)?;
        for (home, shown) in [(&from_home, from), (&to_home, to)] {
            if self.partial(home).await?.is_some() {
                return Err(SftpError::failure(format!(
                    "{shown} is an interrupted upload; finish it (reput) or remove it first"
                )));
            }
        }
        if to.is_inside(from) {
            return Err(SftpError::failure(format!(
                "cannot move {from} inside itself"
            )));
        }
        let entry = self.stat(from).await?;
        self.require_folder(&to.parent()).await?;
        match self.stat(to).await {
            Ok(Entry::File { .. }) if overwrite && matches!(entry, Entry::File { .. }) => {}
            Ok(_) => return Err(SftpError::failure(format!("{to} already exists"))),
            Err(error) if error.code == StatusCode::NoSuchFile => {}
            Err(error) => return Err(error),
        }
        self.hold_or_refuse(&from_home, from).await?;
        if let Err(error) = self.hold_or_refuse(&to_home, to).await {
            self.release(&from_home.relative()).await;
            return Err(error);
        }
        // Checked again under the holds: an upload may have completed at the target meanwhile.
        if !overwrite && self.stat(to).await.is_ok() {
            self.release(&from_home.relative()).await;
            self.release(&to_home.relative()).await;
            return Err(SftpError::failure(format!("{to} already exists")));
        }
        let moved = self.move_entry(&entry, &from_home, &to_home, from).await;
        if moved.is_ok() {
            if overwrite {
                self.state
                    .remove_landed(&self.user.username, &to_home.relative(), &self.holder)
                    .await?;
            }
            self.state
                .rename_landed(
                    &self.user.username,
                    &from_home.relative(),
                    &to_home.relative(),
                    &self.holder,
                    self.is_temporary(&to_home.relative()),
                )
                .await?;
        }
        self.release(&from_home.relative()).await;
        self.release(&to_home.relative()).await;
        moved
    }

    async fn move_entry(
        &self,
        entry: &Entry,
        from_home: &VirtualPath,
        to_home: &VirtualPath,
        from: &VirtualPath,
    ) -> Result<(), SftpError> {
        match entry {
            Entry::File { .. } => {
                self.landing
                    .store()
                    .rename(&self.home_key(from_home), &self.home_key(to_home))
                    .await?;
            }
            Entry::Folder => {
                if self.list(from).await?.len() > 2 {
                    return Err(SftpError::failure(format!(
                        "{from} holds files; renaming a folder that is not empty is not supported, \
                         rename the files instead"
                    )));
                }
                let (from_parent, from_name) = Self::folder_row(from_home);
                let (to_parent, to_name) = Self::folder_row(to_home);
                self.state
                    .rename_folder(
                        &self.user.username,
                        (&from_parent, &from_name),
                        (&to_parent, &to_name),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Names a home cannot hold: object_store stages uploads as `name#<digits>`, and `.receipts` at
    /// the top of the home would be hidden behind `/.receipts`.
    fn check_name(&self, home: &VirtualPath) -> Result<(), SftpError> {
        let name = home.name().unwrap_or_default();
        if crate::storage::is_staging_name(name) {
            return Err(SftpError::failure(format!(
                "names ending in `#` and digits are reserved for uploads in progress; rename `{name}`"
            )));
        }
        if name == RECEIPTS_DIR && home.parent().is_root() {
            return Err(SftpError::denied(format!(
                "`{RECEIPTS_DIR}` is reserved for /.receipts, which holds receipts of your uploads; \
                 choose another name"
            )));
        }
        Ok(())
    }

    /// Opens a file: writing into the home (upload), or reading from `/download` or `/.receipts`.
    pub async fn open(&self, path: &VirtualPath, flags: OpenFlags) -> Result<Opened, SftpError> {
        let writing = flags.intersects(
            OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::CREATE | OpenFlags::TRUNCATE,
        );
        let reading = flags.contains(OpenFlags::READ);
        match self.area(path)? {
            Area::Download(rest) => {
                if writing {
                    return Err(SftpError::denied(format!(
                        "{path}: /download is read-only; upload into /upload"
                    )));
                }
                let bucket = self.download_bucket()?;
                match self.stat(path).await? {
                    Entry::Folder => Err(SftpError::failure(format!("{path} is a folder"))),
                    Entry::File { size, .. } => Ok(Opened::Download(
                        bucket.download(bucket.key(rest.parts()), size),
                    )),
                }
            }
            Area::Receipts(_) if writing => Err(SftpError::denied(receipts::READ_ONLY)),
            Area::Receipts(rest) => match self.receipt(&rest, path).await? {
                Receipt::Folder => Err(SftpError::failure(format!("{path} is a folder"))),
                Receipt::Of(job) => Ok(Opened::Receipt(self.receipt_text(&job).into())),
            },
            Area::Home(_) | Area::Root if reading => Err(SftpError::denied(format!(
                "{path}: uploaded files cannot be read back (this account is upload-only)"
            ))),
            Area::Home(_) | Area::Root if !writing => Err(SftpError::denied(format!(
                "{path}: open the file for writing to upload it"
            ))),
            Area::Home(_) | Area::Root => self.open_upload(path, flags).await,
        }
    }

    /// Opens a home path for upload: a new upload, or the resume of an interrupted one when it is
    /// opened without truncation.
    async fn open_upload(&self, path: &VirtualPath, flags: OpenFlags) -> Result<Opened, SftpError> {
        let home = self.writable(path)?;
        self.check_name(&home)?;
        let truncate = flags.contains(OpenFlags::TRUNCATE);
        let target = Target {
            state: &self.state,
            landing: &self.landing,
            username: &self.user.username,
            home: &home,
            key: self.home_key(&home),
            max_size: self.limits.max_file_size,
        };
        let (parent, name) = Self::folder_row(&home);
        let (grandparent, parent_name) = Self::folder_row(&home.parent());
        let relative = home.relative();
        let left_behind_ms = crate::state::ms_ago(super::partial::LEFT_BEHIND_AFTER);
        // The state database and the landing bucket are asked at once. What the bucket holds at
        // this path matters only when the database knows nothing of it.
        let (known, existing) = tokio::join!(
            self.state.upload_target(
                &self.user.username,
                &relative,
                (&parent, &name),
                (&grandparent, &parent_name),
                left_behind_ms,
            ),
            Self::stored_entry(&self.landing, self.home_key(&home), path)
        );
        let known = known?;
        if !home.parent().is_root() && !known.parent_is_made_folder {
            // Not a folder made with mkdir: an error, or a folder because objects are stored below.
            self.require_folder(&path.parent()).await?;
        }
        if known.partial.is_none()
            && known.left_behind >= u64::try_from(self.limits.max_partials).unwrap_or(u64::MAX)
        {
            return Err(SftpError::failure(format!(
                "{path}: you have {} interrupted uploads waiting to be resumed (at most {} may \
                 wait); resume them (reput), remove the ones you no longer need (rm), or wait until \
                 they expire",
                known.left_behind, self.limits.max_partials
            )));
        }
        if let Some(partial) = known.partial {
            if flags.contains(OpenFlags::EXCLUDE) {
                return Err(SftpError::failure(format!("{path} already exists")));
            }
            if !truncate {
                let upload = LandingUpload::resume(target, &partial)
                    .await
                    .map_err(SftpError::failure)?;
                return Ok(Opened::Upload {
                    upload: Box::new(upload),
                    replaced_partial: None,
                });
            }
            discard_partial(&self.state, &self.landing, &partial, None).await?;
            return Ok(Opened::Upload {
                upload: Box::new(LandingUpload::start(target)),
                replaced_partial: Some(partial.size),
            });
        }
        // Not `stat`: what it would look for in the state database is known.
        let existing = if known.is_made_folder {
            Ok(Entry::Folder)
        } else {
            existing
        };
        match existing {
            Ok(Entry::Folder) => return Err(SftpError::failure(format!("{path} is a folder"))),
            Ok(Entry::File { .. }) if flags.contains(OpenFlags::EXCLUDE) => {
                return Err(SftpError::failure(format!("{path} already exists")));
            }
            Ok(Entry::File { .. }) if !truncate => {
                return Err(SftpError::new(
                    StatusCode::OpUnsupported,
                    format!(
                        "{path} was uploaded completely and cannot be appended to; upload the whole \
                         file again (put, not reput)"
                    ),
                ));
            }
            Ok(Entry::File { .. }) => {}
            Err(error) if error.code == StatusCode::NoSuchFile => {}
            Err(error) => return Err(error),
        }
        Ok(Opened::Upload {
            upload: Box::new(LandingUpload::start(target)),
            replaced_partial: None,
        })
    }

    /// The home-relative path of a path in the upload area (for job records).
    pub fn home_relative(&self, path: &VirtualPath) -> String {
        match self.area(path) {
            Ok(Area::Home(home)) => home.relative(),
            _ => path.relative(),
        }
    }
}

fn key_is_bucket_root(bucket: &Bucket, key: &ObjectPath) -> bool {
    let empty: [&str; 0] = [];
    *key == bucket.key(&empty)
}

fn file_entry(meta: &ObjectMeta) -> Entry {
    Entry::File {
        size: meta.size,
        modified: u32::try_from(meta.last_modified.timestamp()).unwrap_or(0),
    }
}

fn partial_entry(partial: &Partial) -> Entry {
    Entry::File {
        size: partial.size,
        modified: u32::try_from(partial.updated_ms / 1000).unwrap_or(0),
    }
}

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Folder attributes: `drwx------` where the user may write, `dr-x------` where not.
pub fn folder_attrs(writable: bool) -> FileAttributes {
    FileAttributes {
        size: Some(0),
        permissions: Some(if writable { 0o40700 } else { 0o40500 }),
        atime: Some(unix_now()),
        mtime: Some(unix_now()),
        ..FileAttributes::empty()
    }
}

/// File attributes: uploads show as write-only (`--w-------`), downloads as read-only.
pub fn file_attrs(entry: &Entry, uploaded: bool) -> FileAttributes {
    match entry {
        Entry::Folder => folder_attrs(uploaded),
        Entry::File { size, modified } => FileAttributes {
            size: Some(*size),
            permissions: Some(if uploaded { 0o100200 } else { 0o100400 }),
            atime: Some(*modified),
            mtime: Some(*modified),
            ..FileAttributes::empty()
        },
    }
}

/// Whether `path` is inside a read-only area, `/download` or `/.receipts` (for attributes of `stat`
/// results).
pub fn in_read_only_area(view: &UserView, path: &VirtualPath) -> bool {
    matches!(view.area(path), Ok(Area::Download(_) | Area::Receipts(_)))
}
