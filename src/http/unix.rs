//! The daemon's Unix domain socket (`--unix-socket`): HTTP for clients on the same host
//! without TCP. A request over it costs both sides less of the kernel than one over
//! loopback TCP (benches/README.md, "Over a Unix socket"), and who may connect is the
//! socket file's permissions, as for Postgres's own socket.

use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tokio::net::UnixListener;

/// A listening Unix socket and its file, which is removed when this is dropped (unless
/// another socket has taken its path since).
#[derive(Debug)]
pub struct SocketFile {
    listener: UnixListener,
    path: PathBuf,
    /// The file's device and inode, as bound.
    identity: (u64, u64),
}

impl SocketFile {
    /// Listens on `path` with the accept queue of the TCP listener. A socket file left
    /// there by a process that is gone (killed, say) is replaced; one that a live process
    /// listens on, or a file that is not a socket, is an error. The file's permissions
    /// are `mode`, else the umask's: with the usual 022, only its owner may connect
    /// (connecting needs write permission on the file).
    pub fn bind(path: &Path, mode: Option<u32>) -> anyhow::Result<Self> {
        let listen = || format!("listen on the Unix socket {}", path.display());
        clear_stale(path).with_context(listen)?;
        let socket = tokio::net::UnixSocket::new_stream().with_context(listen)?;
        socket.bind(path).with_context(listen)?;
        // Before it listens: until then nobody can connect, whatever the bits say.
        if let Some(mode) = mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("set the mode of the Unix socket {}", path.display()))?;
        }
        let listener = socket.listen(crate::LISTEN_BACKLOG).with_context(listen)?;
        let bound = std::fs::symlink_metadata(path).with_context(listen)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            identity: (bound.dev(), bound.ino()),
        })
    }

    /// The socket's path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|now| (now.dev(), now.ino()) == self.identity);
        if ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), %error, "could not remove the Unix socket");
            }
        }
    }
}

/// Removes a socket file at `path` that nothing listens on any more; errs when something
/// does, or when the file is not a socket.
fn clear_stale(path: &Path) -> anyhow::Result<()> {
    let found = match std::fs::symlink_metadata(path) {
        Ok(found) => found,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).context("look at the path"),
    };
    if !found.file_type().is_socket() {
        bail!("the path exists and is not a socket (it was left as it is)");
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("another process is listening on it"),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    Err(error).context("remove the socket left by a process that is gone")
                }
                _ => Ok(()),
            }
        }
        Err(error) => Err(error).context("find whether another process listens on it"),
    }
}
