//! The read-time half of the location check: a file inside an allowed location is opened
//! beneath that location, following no link out of it.
//!
//! Admission checks a source's canonical path, but a worker opens the file later. Whoever can
//! write inside an allowed directory could, in between, replace a checked file or directory
//! with a link to `/etc` or another tenant's data. So a process whose policy restricts
//! locations ([`confine_local_reads`], from the cluster configuration) opens every local file
//! that lies inside an allowed location with `openat2(RESOLVE_BENEATH)` from that location's
//! directory: the kernel resolves the path and refuses any link, absolute or `..`, that would
//! leave the directory, at the moment of opening. There is no check-then-open window.
//!
//! Files outside every allowed location are the engine's own (warehouse, scratch, spill): a
//! submission cannot name them (admission refuses it), so they are opened as they are.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, RwLock};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The local directories (or single files) this process confines reads to; empty: none.
static CONFINED_ROOTS: LazyLock<RwLock<Arc<Vec<PathBuf>>>> =
    LazyLock::new(|| RwLock::new(Arc::new(Vec::new())));

/// From now on, this process opens the local files inside `roots` beneath them (see the
/// module's documentation). `roots` are the canonical local paths of the allowed locations.
pub fn confine_local_reads(roots: Vec<PathBuf>) {
    *CONFINED_ROOTS.write().expect("confined roots lock") = Arc::new(roots);
}

fn confined_roots() -> Arc<Vec<PathBuf>> {
    CONFINED_ROOTS.read().expect("confined roots lock").clone()
}

/// How a local path is opened.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// Inside no allowed location: an engine file, opened as it is.
    AsItIs,
    /// Opened from `dir` by `relative`, never leaving `dir`. `no_links`: the allowed location
    /// is this very file, so no link is followed at all.
    Beneath {
        dir: PathBuf,
        relative: PathBuf,
        no_links: bool,
    },
}

/// How `path` is opened under `roots`: beneath the outermost allowed location that holds it
/// (whole segments, as admission compares), so a link between two places inside that
/// location still resolves.
pub(crate) fn opening(roots: &[PathBuf], path: &Path) -> Opening {
    let Some(root) = roots
        .iter()
        .filter(|root| path.starts_with(root))
        .min_by_key(|root| root.components().count())
    else {
        return Opening::AsItIs;
    };
    let relative = path.strip_prefix(root).unwrap_or(path).to_path_buf();
    if !relative.as_os_str().is_empty() {
        return Opening::Beneath {
            dir: root.clone(),
            relative,
            no_links: false,
        };
    }
    // The allowed location is the file itself: open its name from its directory.
    match (root.parent(), root.file_name()) {
        (Some(dir), Some(name)) => Opening::Beneath {
            dir: dir.to_path_buf(),
            relative: PathBuf::from(name),
            no_links: true,
        },
        _ => Opening::AsItIs,
    }
}

/// Opens the local file at `path` for reading: beneath its allowed location when this process
/// confines reads, as it is otherwise. A directory is `NotFound` (as `object_store` reports
/// it); a named pipe or device is refused rather than waited on.
pub fn open_local(path: &Path) -> io::Result<File> {
    open_within(&confined_roots(), path)
}

/// [`open_local`] with these `roots` (admission checks a listing with its policy's).
pub(crate) fn open_within(roots: &[PathBuf], path: &Path) -> io::Result<File> {
    match opening(roots, path) {
        Opening::AsItIs => File::open(path),
        Opening::Beneath {
            dir,
            relative,
            no_links,
        } => open_beneath(path, &dir, &relative, no_links),
    }
}

fn open_beneath(path: &Path, dir: &Path, relative: &Path, no_links: bool) -> io::Result<File> {
    let dir_fd = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display())))?;
    let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    if no_links {
        resolve |= ResolveFlags::NO_SYMLINKS;
    }
    // The kernel answers EAGAIN when a rename elsewhere raced the lookup; try again then.
    let mut attempts = 0;
    let fd = loop {
        match rustix::fs::openat2(
            &dir_fd,
            relative,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
            resolve,
        ) {
            Err(rustix::io::Errno::AGAIN) if attempts < 8 => attempts += 1,
            Err(e) => return Err(refusal(path, dir, e)),
            Ok(fd) => break fd,
        }
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "is a directory"));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// The error of a refused or failed opening, saying which rule refused it.
fn refusal(path: &Path, dir: &Path, errno: rustix::io::Errno) -> io::Error {
    use rustix::io::Errno;
    let why = match errno {
        Errno::XDEV | Errno::LOOP => format!(
            "a link on the way leads out of the allowed location {} (links out of an allowed location, and absolute links, are not followed)",
            dir.display()
        ),
        Errno::NOSYS => {
            "this kernel has no openat2 (Linux 5.6 or later confines reads to the allowed locations)"
                .to_string()
        }
        other => return io::Error::from(other),
    };
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} is not read: {why}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Vec<PathBuf> {
        vec![
            PathBuf::from("/data/landing"),
            PathBuf::from("/data/landing/orders"),
            PathBuf::from("/data/one.csv"),
        ]
    }

    #[test]
    fn a_file_inside_an_allowed_location_opens_beneath_the_outermost_one() {
        assert_eq!(
            opening(&roots(), Path::new("/data/landing/orders/2026/a.csv")),
            Opening::Beneath {
                dir: PathBuf::from("/data/landing"),
                relative: PathBuf::from("orders/2026/a.csv"),
                no_links: false,
            }
        );
    }

    #[test]
    fn an_allowed_single_file_opens_by_name_following_no_link() {
        assert_eq!(
            opening(&roots(), Path::new("/data/one.csv")),
            Opening::Beneath {
                dir: PathBuf::from("/data"),
                relative: PathBuf::from("one.csv"),
                no_links: true,
            }
        );
    }

    #[test]
    fn paths_sharing_only_a_prefix_of_a_name_are_not_inside() {
        for path in [
            "/data/landing-other/a.csv",
            "/data/one.csv.bak",
            "/warehouse/t/data/x.parquet",
        ] {
            assert_eq!(
                opening(&roots(), Path::new(path)),
                Opening::AsItIs,
                "{path}"
            );
        }
        assert_eq!(
            opening(&[], Path::new("/data/landing/a.csv")),
            Opening::AsItIs
        );
    }

    /// Links inside the allowed directory: one to a file inside (relative) is followed; one to
    /// a file outside, an absolute one, and a directory swapped for a link out are not; a
    /// named pipe is refused at once rather than waited on.
    #[test]
    fn opening_beneath_refuses_every_link_out_and_follows_links_within() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let allowed = base.join("allowed");
        let outside = base.join("outside");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("sub/ok.csv"), "a\n1\n").unwrap();
        std::fs::write(outside.join("secret.csv"), "a\n42\n").unwrap();
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, allowed.join(name)).unwrap()
        };
        link(Path::new("sub/ok.csv"), "within.csv");
        link(&outside.join("secret.csv"), "out.csv");
        link(Path::new("../outside/secret.csv"), "up.csv");
        link(&allowed.join("sub/ok.csv"), "absolute_within.csv");
        link(&outside, "swapped");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            allowed.join("pipe.csv"),
            Mode::from_raw_mode(0o600),
        )
        .unwrap();

        let open = |name: &str| open_beneath(&allowed.join(name), &allowed, Path::new(name), false);
        let read = |name: &str| std::io::read_to_string(open(name).unwrap()).unwrap();
        assert_eq!(read("sub/ok.csv"), "a\n1\n");
        assert_eq!(read("within.csv"), "a\n1\n");
        for name in [
            "out.csv",
            "up.csv",
            "absolute_within.csv",
            "swapped/secret.csv",
        ] {
            let error = open(name).unwrap_err();
            assert_eq!(
                error.kind(),
                io::ErrorKind::PermissionDenied,
                "{name}: {error}"
            );
            assert!(
                error
                    .to_string()
                    .contains("leads out of the allowed location"),
                "{error}"
            );
        }
        assert_eq!(
            open("pipe.csv").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(open("sub").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(
            open("missing.csv").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );

        // An allowed single file that became a link is not followed either.
        let file_root = [allowed.join("within.csv")];
        let Opening::Beneath {
            dir,
            relative,
            no_links,
        } = opening(&file_root, &file_root[0])
        else {
            panic!("an allowed file opens beneath its directory");
        };
        let error = open_beneath(&file_root[0], &dir, &relative, no_links).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
    }
}
